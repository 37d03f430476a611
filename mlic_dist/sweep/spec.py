"""Sweep files: a training config plus `grid:`, `ensembles:` and `sweep:`; parsed, validated and
expanded into trials before anything starts.

    spec = load_sweep("configs/sweeps/voc2007.yaml", ["train.epochs=20", "grid.data.size=[448]"])
    for trial in spec.trials():          # one per grid point, in file order
        trial.name, trial.output_dir, trial.cfg

The file (its `base:` files merged first) minus the three sweep sections is the base training
config; `key=value` overrides apply to the whole file (`grid.KEY=[...]`, `sweep.KEY=...` and
`ensembles=[...]` included). `grid` maps dotted config keys to lists of values (nested mappings
are flattened to dotted keys). A grid entry whose values are mappings is a group: each value
sets several keys together (a backbone with its own recipe), labelled by its `name:`

    grid:
      model:
        - {name: mobilenet_v2, model.backbone: mobilenet_v2, model.pretrained: imagenet}
        - {name: advanced_cnn, model.backbone: advanced_cnn, model.pretrained: none, optim.name: adam}
      data.size: [384, 448]

Every grid point must build a valid `Config`, so a typo is an error naming the key before any
trial starts. A trial's name, and so its output directory
`SWEEP.root/SWEEP.name/NAME`, comes from its grid point (`size=448,augment=M2`): a retried or
resumed trial finds its own checkpoints.
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import Config, ConfigError, apply_overrides, build, config_from_dict, flatten, read_yaml, to_dict
from ..data import read_manifest
from ..ensemble.selection import EnsembleRule
from ..errors import UserError
from ..models import check_backbone, check_pretrained, is_timm, missing_pretrained
from ..train.optim import check_batch_policy

ENSEMBLE_KINDS = ("scale", "distr", "greedy", "soup", "all")  # mlic_dist.ensemble's KINDS, and "all" of them
# Keys the sweep sets for every trial itself: gridding over them would break tracking or resume.
RESERVED = {"train.output_dir": "the sweep derives each trial's output directory from its grid point; set sweep.root",
            "train.resume": "retried and resumed trials continue from their checkpoints (train.resume=auto)",
            "tracking.enabled": "the sweep tracks every trial in MLflow",
            "tracking.uri": "all trials log to the sweep's one tracking server",
            "tracking.experiment": "one sweep is one MLflow experiment",
            "tracking.run_name": "the sweep names each trial's run after its grid point",
            "tracking.parent_run_id": "the sweep nests every trial under its own parent run"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


class SweepError(UserError, ValueError):
    """A sweep file, override or option is wrong; the message names it and the fix (one line)."""


@dataclass(frozen=True)
class SweepSettings:
    """The `sweep:` section (CLI flags such as --workers-per-trial override it)."""
    name: str = ""
    """Sweep name: the MLflow parent run and the directory SWEEP.root/NAME; default the file's stem."""
    root: str = "runs/sweeps"
    """Directory that holds one folder per sweep (trials, Tune state); shared storage on a cluster."""
    workers_per_trial: int = 1
    """Ray Train workers (DDP processes) per trial."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves."""
    gpus_per_worker: Optional[float] = None
    """GPUs each worker reserves; null = 1 on a cluster with GPUs, 0 without."""
    max_concurrent: int = 0
    """Trials at once; 0 = as the cluster's resources allow (GPUs // GPUs per trial; on CPU, cores)."""
    max_failures: int = 2
    """Restarts of a trial's worker group after a worker dies (it resumes from its checkpoint)."""
    asha: bool = False
    """Stop weak trials early with ASHA on val_mAP (grace_period epochs first)."""
    grace_period: int = 1
    """ASHA: epochs every trial trains before it can be stopped."""
    reduction_factor: float = 4.0
    """ASHA: keep the top 1/reduction_factor of trials at each rung."""
    progress_every_s: float = 60.0
    """Print a progress line at least this often (and on every change)."""
    report: bool = True
    """Build the report (mlic_dist.report) of the trials and ensembles at the end."""

    def __post_init__(self):
        if self.name and not _NAME_OK.match(self.name):
            raise ConfigError(f"sweep.name={self.name!r} must be a plain directory name (letters, digits, . _ + -)")
        for key in ("workers_per_trial", "max_failures", "max_concurrent", "grace_period"):
            low = 1 if key in ("workers_per_trial", "grace_period") else 0
            if getattr(self, key) < low:
                raise ConfigError(f"sweep.{key}={getattr(self, key)!r} must be >= {low}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"sweep.cpus_per_worker={self.cpus_per_worker!r} must be > 0")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise ConfigError(f"sweep.gpus_per_worker={self.gpus_per_worker!r} must be >= 0")
        if self.progress_every_s <= 0:
            raise ConfigError(f"sweep.progress_every_s={self.progress_every_s!r} must be > 0")
        if self.reduction_factor <= 1:
            raise ConfigError(f"sweep.reduction_factor={self.reduction_factor!r} must be > 1")


@dataclass(frozen=True)
class Trial:
    name: str             # from the grid point: "size=448,augment=M2"
    point: dict           # dotted key -> value
    cfg: Config           # base + point + output_dir + run name (tracking uri/parent set at run time)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


@dataclass(frozen=True)
class SweepSpec:
    source: Optional[str]         # the sweep file (None when built from a dict)
    base: dict                    # nested training config without the sweep sections, paths absolute
    grid: dict                    # dotted key -> list of values, in file order
    ensembles: tuple
    settings: SweepSettings
    overrides: tuple = field(default=())

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def root_dir(self) -> Path:
        """SWEEP.root/NAME (absolute since loading): trial folders, Tune and Train state, sweep.json."""
        return Path(self.settings.root) / self.name

    @property
    def epochs(self) -> int:
        return max(t.cfg.train.epochs for t in self.trials())

    def points(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())]

    def trial_name(self, point: dict) -> str:
        return trial_name(list(self.grid), point)

    def trial(self, point: dict) -> Trial:
        name = self.trial_name(point)
        data = _with(self.base, expand(point))
        data = _with(data, {"train.output_dir": str(self.root_dir / name), "tracking.run_name": name})
        try:
            cfg = config_from_dict(data)
        except ConfigError as e:
            raise SweepError(f"{self._where()}: grid point {name}: {e}") from None
        return Trial(name, dict(point), cfg)

    def trials(self) -> list[Trial]:
        return [self.trial(p) for p in self.points()]

    def to_dict(self) -> dict:
        """What sweep.yaml / sweep.json record: enough to check a --resume is the same sweep."""
        return {"base": self.base, "grid": self.grid, "ensembles": ensemble_names(self.ensembles, dicts=True),
                "sweep": {f.name: getattr(self.settings, f.name) for f in fields(self.settings)}}

    def _where(self) -> str:
        return self.source or "sweep"


def trial_name(keys: list[str], point: dict) -> str:
    """`size=448,augment=M2`: each key's last part (the full dotted key where two would clash)."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    parts = []
    for k, short in zip(keys, last):
        label = short if last.count(short) == 1 else k
        parts.append(f"{label}={_fmt(point[k])}")
    return ",".join(parts)


def expand(point: dict) -> dict:
    """A grid point as dotted config keys: groups contribute their keys (their `name` is a label)."""
    out = {}
    for key, value in point.items():
        if isinstance(value, dict):
            out.update({k: v for k, v in value.items() if k != "name"})
        else:
            out[key] = value
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, dict):  # a group's value: its name, else its first value
        return _fmt(value.get("name", next(iter(value.values()), "")))
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        text = "-".join(_fmt(v) for v in value)
    else:
        text = str(value)
    return _UNSAFE.sub("_", text).strip("_") or "_"


def _with(data: dict, dotted: dict) -> dict:
    """A copy of the nested dict `data` with dotted keys set to (typed) values."""
    out = _copy(data)
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.get(p)
            node[p] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[leaf] = value
    return out


def _copy(d: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in d.items()}


# --------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: list[str] | tuple = ()) -> SweepSpec:
    """Read, override, validate and expand a sweep file; raises SweepError (one line) on bad input."""
    where = str(path)
    try:
        raw = read_yaml(path)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    grid_over = [o for o in overrides if o.split("=", 1)[0].strip().startswith("grid.")]
    other = [o for o in overrides if o not in grid_over]
    try:
        raw = apply_overrides(raw, other)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    grid = raw.pop("grid", None)
    if grid is not None and not isinstance(grid, dict):
        raise SweepError(f"{where}: grid: must map dotted config keys to lists of values, got {grid!r}; "
                         f"write e.g. `grid: {{data.size: [384, 448]}}`")
    grid = flatten(grid) if grid else {}
    for item in grid_over:
        key, value = _grid_override(item)
        grid[key] = value
    settings_raw = raw.pop("sweep", None)
    if settings_raw is not None and not isinstance(settings_raw, dict):
        raise SweepError(f"{where}: sweep: must be a mapping of sweep settings, got {settings_raw!r}; write "
                         f"e.g. `sweep: {{name: demo, max_concurrent: 2}}` (keys: "
                         f"{[f.name for f in fields(SweepSettings)]})")
    settings_raw = dict(settings_raw or {})
    settings_raw.setdefault("name", Path(path).stem)
    ensembles = raw.pop("ensembles", None)
    return build_spec(raw, grid, ensembles, settings_raw, source=where, overrides=tuple(overrides))


def _grid_override(item: str) -> tuple[str, Any]:
    """`grid.KEY=[v1, v2]` -> (KEY, [v1, v2]); SweepError naming the override and the fix."""
    if "=" not in item:
        raise SweepError(f"override {item!r} has no value: write {item.strip()}=[v1,v2] (a YAML list of "
                         f"the values to sweep)")
    key, value = item.split("=", 1)
    try:
        return key.strip()[len("grid."):], yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise SweepError(f"override {item!r}: {value!r} is not valid YAML ({problem}); write a list such as "
                         f"{key.strip()}=[384,448], quoted in the shell") from None


def build_spec(base: dict, grid, ensembles, settings: dict, source: Optional[str] = None,
               overrides: tuple = ()) -> SweepSpec:
    where = source or "sweep"
    try:
        settings_obj = build(SweepSettings, settings, "sweep.")
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None
    if not settings_obj.name:
        raise SweepError(f"{where}: sweep.name is empty; set sweep.name=NAME")
    # Resolved here, on the sweep's machine: trial drivers and workers run in other directories.
    settings_obj = dataclasses.replace(settings_obj, root=str(Path(settings_obj.root).resolve()))
    grid = _check_grid(where, grid)
    ensembles = _check_ensembles(where, ensembles)
    _check_base(where, base)
    base, grid = _absolute_paths(base, grid)
    spec = SweepSpec(source, base, grid, ensembles, settings_obj, overrides)
    trials = spec.trials()  # every grid point builds a valid Config (SweepError names the key)
    names = [t.name for t in trials]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise SweepError(f"{where}: two grid points share the trial name {dup!r} (their values differ only in "
                         f"characters a directory name cannot hold); make the values distinct")
    _check_models(where, trials)
    _check_rules_match(where, ensembles, trials)
    _check_batches(where, trials, settings_obj.workers_per_trial)
    return spec


def _check_grid(where: str, grid) -> dict:
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{where} has no grid: add `grid:` mapping dotted config keys to lists of values, "
                         f"e.g. `data.size: [384, 448, 512]`")
    out = {}
    for key, values in grid.items():
        if not isinstance(values, list):
            raise SweepError(f"{where}: grid.{key}={values!r} must be a list of values, e.g. [{values!r}]")
        if not values:
            raise SweepError(f"{where}: grid.{key} is an empty list; give at least one value")
        if all(isinstance(v, dict) for v in values):  # a group of keys set together
            groups = [flatten(v) for v in values]
            for g in groups:
                for k in g:
                    if k != "name":
                        _check_key(where, f"grid.{key}", k)
            out[key] = groups
        else:
            _check_key(where, "grid", key)
            out[key] = values
    keys = [k for k, vs in out.items() if not isinstance(vs[0], dict)]
    for key, vs in out.items():
        if isinstance(vs[0], dict):
            twice = sorted({k for g in vs for k in g} & set(keys))
            if twice:
                raise SweepError(f"{where}: {twice[0]} is set by grid.{key} and by grid.{twice[0]}; keep one")
    return out


def _check_key(where: str, section: str, key: str) -> None:
    defaults = flatten(to_dict(Config()))
    if key in RESERVED:
        raise SweepError(f"{where}: {section}: {key} cannot be swept: {RESERVED[key]}")
    if key not in defaults:
        near = [k for k in defaults if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise SweepError(f"{where}: {section} key {key!r} is not a config key{hint}; grid keys are dotted "
                         f"config keys such as data.size, data.augment, model.backbone, seed")


def _check_ensembles(where: str, ensembles) -> tuple:
    """A tuple of kind names and EnsembleRules (a mapping {kind, name, where} in the file)."""
    if ensembles is None:
        return ()
    if isinstance(ensembles, str):
        ensembles = [ensembles]
    if not isinstance(ensembles, list):
        raise SweepError(f"{where}: ensembles={ensembles!r} is not valid; use a list of {list(ENSEMBLE_KINDS)} "
                         "or {kind, name, where} entries")
    out = []
    for i, e in enumerate(ensembles):
        if isinstance(e, dict):
            try:
                rule = EnsembleRule.from_dict(e)
            except ValueError as err:
                raise SweepError(f"{where}: ensembles[{i}]: {err}") from None
            for key, _ in rule.where:
                _check_key(where, f"ensembles[{i}].where", key)
            out.append(rule)
        elif e in ENSEMBLE_KINDS:
            out.append(e)
        else:
            raise SweepError(f"{where}: ensembles[{i}]={e!r} is not valid; use one of {list(ENSEMBLE_KINDS)} "
                             "or a {kind: scale|distr, name: NAME, where: {KEY: VALUE or [VALUES]}} entry")
    return tuple(out)


def _check_rules_match(where: str, ensembles: tuple, trials) -> None:
    """Every value an ensemble rule names occurs in some trial (else a typo builds nothing)."""
    flats = [flatten(to_dict(t.cfg)) for t in trials]
    for i, rule in enumerate(ensembles):
        if not isinstance(rule, EnsembleRule):
            continue
        for key, values in rule.where:
            seen = {str(f.get(key)) for f in flats}
            missing = [v for v in values if str(v) not in seen]
            if missing:
                raise SweepError(f"{where}: ensembles[{i}] ({rule.describe()}): {key}={missing} matches no trial "
                                 f"(the trials have {sorted(seen)}); fix the value or the grid")


def ensemble_names(ensembles, dicts: bool = False) -> list:
    """The entries as text (logs, MLflow params) or, with dicts, as the file's mappings."""
    return [e if isinstance(e, str) else (e.to_dict() if dicts else e.describe()) for e in ensembles]


def _check_base(where: str, base: dict) -> None:
    try:
        cfg = config_from_dict(base)
    except ConfigError as e:
        raise SweepError(f"{where}: {e}") from None
    if not cfg.tracking.enabled:
        raise SweepError(f"{where}: tracking.enabled=false; a sweep records every trial and ensemble in MLflow, "
                         f"set tracking.enabled=true")
    if cfg.train.resume != "auto":
        raise SweepError(f"{where}: train.resume={cfg.train.resume!r}; a sweep resumes retried trials from their "
                         f"own checkpoints, set train.resume=auto")


def _absolute_paths(base: dict, grid: dict) -> tuple[dict, dict]:
    """Trials run in Ray workers whose working directory is not this one (and on a cluster, not
    this machine): data.shards and a model.pretrained file become absolute paths."""
    paths = ("data.shards", "model.pretrained")

    def absolute(key, value):
        if key not in paths or value is None or (key == "model.pretrained" and value in ("imagenet", "none")):
            return value
        return str(Path(str(value)).resolve())

    flat = flatten(base)
    fixes = {k: absolute(k, flat[k]) for k in paths if k in flat}
    out = {}
    for key, values in grid.items():
        out[key] = [{k: absolute(k, x) for k, x in v.items()} if isinstance(v, dict) else absolute(key, v)
                    for v in values]
    return _with(base, fixes), out


def _check_batches(where: str, trials: list[Trial], workers_per_trial: int) -> None:
    """Each trial's global batch against its recipe's (train.optim.check_batch_policy), before
    anything starts: a trial of 2 workers would otherwise stop in its first second, every trial."""
    for t in trials:
        try:
            check_batch_policy(t.cfg, workers_per_trial)
        except ConfigError as e:
            raise SweepError(f"{where}: trial {t.name} with {workers_per_trial} worker(s): {e} (as sweep-file "
                             f"overrides)") from None


def _check_models(where: str, trials: list[Trial]) -> None:
    for t in trials:
        try:
            check_backbone(t.cfg.model.backbone)
            if is_timm(t.cfg.model.backbone) and t.cfg.model.pretrained == "imagenet":
                check_pretrained(t.cfg.model.backbone, "imagenet")   # refused: timm weights come from a file
        except UserError as e:
            raise SweepError(f"{where}: trial {t.name}: {e}") from None
        p = t.cfg.model.pretrained
        if p not in ("imagenet", "none") and not Path(p).is_file():
            raise SweepError(f"{where}: model.pretrained={p!r} (trial {t.name}) is not a file; give a state dict "
                             f"path, imagenet or none")


def check_shards(spec: SweepSpec) -> list[str]:
    """Every distinct data.shards holds a readable manifest with the splits the trials use; returns
    the shard directories. Raises SweepError naming the trial and the fix."""

    seen: dict[str, str] = {}
    for t in spec.trials():
        d = t.cfg.data
        if d.shards is None:
            raise SweepError(f"{spec._where()}: data.shards is not set (trial {t.name}); pass data.shards=DIR, "
                             f"a directory written by `python -m mlic_dist.shard`")
        if d.shards in seen:
            continue
        try:
            manifest = read_manifest(d.shards)
            for split in (d.train_split, d.val_split):
                manifest.split(split)
        except (OSError, ValueError) as e:
            raise SweepError(f"{spec._where()}: trial {t.name}: {e}") from None
        seen[d.shards] = t.name
    return list(seen)


def pretrained_needed(spec: SweepSpec) -> list[tuple[str, str, str]]:
    """The distinct (model.backbone, model.pretrained, model.weights) of the trials that load weights."""
    triples = {(t.cfg.model.backbone, t.cfg.model.pretrained, t.cfg.model.weights) for t in spec.trials()}
    return sorted(p for p in triples if p[1] != "none")


def check_weights(spec: SweepSpec) -> None:
    """This machine has every pretrained weight file the grid needs (a sweep without --address
    trains here); one SweepError listing each missing file and the fix."""
    lines = [f"{path} (model.backbone={b} model.pretrained={p} model.weights={w})"
             for b, p, w in pretrained_needed(spec) for path in missing_pretrained(b, p, w)]
    if lines:
        raise SweepError(f"{spec._where()}: pre-flight: {len(lines)} pretrained weight file(s) missing, nothing "
                         f"started:\n  " + "\n  ".join(lines) + "\nfix: copy each file there "
                         f"(`python -m mlic_dist.models` lists the files and their URLs, see docs/weights.md), set "
                         f"TORCH_HOME to where they are, or use model.pretrained=none")


def describe_resources(spec: SweepSpec, gpus_per_worker: Optional[float]) -> str:
    s = spec.settings
    gpu = "1 if the cluster has GPUs, else 0" if gpus_per_worker is None else f"{gpus_per_worker:g}"
    return (f"{s.workers_per_trial} worker(s) x (CPU {s.cpus_per_worker:g}, GPU {gpu}) "
            f"+ 1 trial driver")


def dump(spec: SweepSpec) -> str:
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)
