"""Score-level fusion of trained runs (the paper's eq. 3), written and logged like a run.

CPU only (NumPy on the saved score matrices; no model runs, no GPU, any machine that sees the
run directories):

    python -m mlic_dist.ensemble --run-dirs runs/a runs/b runs/c [--weights 2 1 1] [--name NAME] [--out DIR]
    python -m mlic_dist.ensemble --runs RUN_ID RUN_ID [--tracking-uri URI]          # MLflow run ids
    python -m mlic_dist.ensemble --experiment mlic --select scale distr greedy \\
        [--tracking-uri URI] [--parent-run-id ID] [--greedy-init 3] [--greedy-steps 20]
Python (the sweep, at its end): `build_ensembles("mlic", ["scale", "distr", "greedy"], uri, parent_id)`.

- Members are aligned by sample key; they must cover the same val (and test) keys with the same
  labels and the same classes in the same order, else one error line names the two runs and the
  first difference. Fusion = the weighted mean of the members' probabilities (equal weights
  unless given; greedy: selection counts).
- Kinds: `scale` (ScaleEn: runs that differ only in data.size), `distr` (DistrEn: only in
  data.augment), `greedy` (Caruana's ensemble selection over every finished run), `manual` (the
  runs given). Grouping rules: `mlic_dist.ensemble.selection`. `soup` is not a fusion: a greedy
  weight soup, one model (mlic_dist/ensemble/soup.py; --soup-bn-batches, --device).
- Every choice (members, greedy steps, per-class thresholds) uses the validation split; the test
  split is fused with the chosen weights and scored once.
- Output: a run directory (default runs/ensembles/NAME) with the files of a training run
  (classes, scores / targets / keys per split, thresholds, metrics) plus ensemble.json
  (docs/contracts.md "Run directory"), so evaluate / report / predict take it like a run; and an
  MLflow run in the members' experiment (tags mlic.kind=ensemble, mlic.ensemble_kind, mlic.members,
  a note linking the members; the metric names of a training run), nested under the members'
  common parent run (a sweep) or --parent-run-id.
User errors exit with status 2 and one line on stderr.
"""
from __future__ import annotations

import datetime
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import metrics, rundir
from ..atomic import check_dir, replace_dir
from ..config import is_model_key
from ..tracking import derived, query as mq
from ..tracking.store import resolve_uri
from ..tracking.tracker import final_metrics
from .members import AlignedSplit, EnsembleError, Member, align, check_weights, fuse, member_from_dir  # noqa: F401
from .selection import VARY, EnsembleRule, Group, digest, find_groups, greedy_select
from .soup import DEFAULT_BN_BATCHES, build_soups

KINDS = ("scale", "distr", "greedy", "soup")   # soup: a weight average, one model (soup.py), not a fusion
FUSIONS = ("scale", "distr", "greedy")
TTA_VIEWS_TAG = "mlic.tta_views"   # a TTA ensemble's views, e.g. 32,32+flip,40,40+flip
ENSEMBLE_FORMAT_VERSION = 1
DEFAULT_OUT = Path("runs/ensembles")


@dataclass
class Target:
    """Where an ensemble is logged: an MLflow store and experiment."""
    uri: Optional[str]
    experiment: str


# --------------------------------------------------------------------------- one ensemble


def _distinct(values) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _params(members: Sequence[Member], weights: np.ndarray, kind: str) -> dict:
    """MLflow params: the ensemble's own, then every model-defining config key: its value when
    the members agree, else the list of member values (e.g. data.size = [384, 448, 512])."""
    params = {"ensemble.kind": kind, "ensemble.num_members": len(members),
              "ensemble.members": ", ".join(m.name for m in members),
              "ensemble.weights": ", ".join(f"{w:g}" for w in weights), "ensemble.selection_split": "val"}
    flats = [m.flat_config for m in members]
    for key in sorted({k for f in flats for k in f if is_model_key(k)}):
        values = [f.get(key) for f in flats]
        params[key] = values[0] if len(_distinct(values)) == 1 else json.dumps(values)
    return params


def _note(kind: str, members: Sequence[Member], weights: np.ndarray, member_map: Sequence[float]) -> str:
    """Markdown for the run's description in the MLflow UI, linking every member run."""
    title = {"scale": "ScaleEn (members differ only in data.size)",
             "distr": "DistrEn (members differ only in data.augment)",
             "greedy": "Greedy ensemble selection (Caruana et al. 2004) on validation",
             "tta": "Test-time augmentation: one run, each member a view (size, flip)",
             "manual": "Ensemble of the given runs"}[kind]
    lines = [f"**{title}**: weighted mean of the members' probabilities.", "",
             "| member | weight | val mAP |", "|---|---|---|"]
    for m, w, v in zip(members, weights, member_map):
        link = f"[{m.name}]({mq.run_link(m.experiment_id, m.run_id)})" if m.run_id and m.experiment_id else m.name
        lines.append(f"| {link} | {w:g} | {v:.4f} |")
    return "\n".join(lines)


def _check_out(out: Path) -> None:
    """Before any fusing: `out` can be written (atomic.check_dir) and is not another run."""
    check_dir(out, "--out", EnsembleError)
    if out.exists() and not (out / rundir.ENSEMBLE).is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise EnsembleError(f"--out {out} exists and is not an ensemble directory (no {rundir.ENSEMBLE}); "
                                f"choose a new directory (an ensemble never overwrites a training run)")


def _write_dir(out: Path, classes, splits: dict[str, AlignedSplit], fused: dict, thresholds, result: dict,
               doc: dict) -> None:
    """All files into a temporary directory swapped in whole: a rebuilt ensemble never keeps a
    stale file of its previous version (a test split it no longer has, say)."""
    with replace_dir(out) as tmp:
        rundir.write_classes(tmp, classes)
        for split, a in splits.items():
            rundir.write_split(tmp, split, fused[split], a.targets, a.keys)
        rundir.write_thresholds(tmp, thresholds, classes)
        rundir.write_metrics(tmp, result)
        rundir.write_json(tmp, rundir.ENSEMBLE, doc)


def _previous_run(out: Path, uri: str, experiment: str, doc: dict) -> Optional[str]:
    """The MLflow run of this directory's previous build, if it fused the same members with the
    same weights in the same store (rebuilding then updates it instead of adding a twin)."""
    try:
        old_doc = json.loads((out / rundir.ENSEMBLE).read_text())
    except (OSError, ValueError):
        return None
    same = [(m["run_dir"], m["weight"], m.get("view")) for m in old_doc.get("members", [])] == \
           [(m["run_dir"], m["weight"], m.get("view")) for m in doc["members"]]
    return derived.previous_run(out, uri, experiment, "ensemble") if same else None


def _fill_from_mlflow(members: Sequence[Member], client) -> None:
    """Experiment, parent and name of dir-given members whose tracking.json names a run."""
    for m in members:
        if m.run_id and not m.experiment_id:
            try:
                info = mq.get_run(client, m.run_id)
            except mq.TrackingQueryError:
                continue
            m.experiment_id, m.parent_run_id, m.name = info.experiment_id, info.parent_run_id, info.name


def log_ensemble(out: Path, target: Target, members: Sequence[Member], weights: np.ndarray, kind: str,
                 name: str, result: dict, member_map, parent_run_id: Optional[str],
                 previous: Optional[str], views: Optional[Sequence] = None) -> Optional[str]:
    """The ensemble as an MLflow run in `target.experiment`, nested under the members' common
    parent (a sweep) or `parent_run_id`; returns its id (None when MLflow was unreachable)."""
    parents = {m.parent_run_id for m in members}
    parent = parent_run_id or (parents.pop() if len(parents) == 1 else None)
    tags = {mq.ENSEMBLE_KIND_TAG: kind, mq.MEMBERS_TAG: ",".join(m.run_id or str(m.run.path) for m in members),
            mq.NOTE_TAG: _note(kind, members, weights, member_map)}
    for tag, key in (("backbone", "model.backbone"), ("augment", "data.augment"), ("size", "data.size")):
        tags[tag] = ",".join(str(v) for v in _distinct(m.flat_config.get(key) for m in members))
    params = _params(members, weights, kind)
    if views is not None:   # TTA: the run once, and its views (mlic_dist/ensemble/tta.py)
        tags[mq.MEMBERS_TAG] = ",".join(_distinct(m.run_id or str(m.run.path) for m in members))
        tags[TTA_VIEWS_TAG] = params["tta.views"] = ",".join(v.label for v in views)
        tags["size"] = ",".join(_distinct(str(v.size) for v in views))
    return derived.log_derived(out, uri=target.uri, experiment=target.experiment, run_name=name, kind="ensemble",
                               params=params, tags=tags,
                               metrics=final_metrics(result),   # the names of a training run's final metrics
                               artifacts=rundir.artifact_files(out), parent_run_id=parent, previous=previous)


def build_ensemble(members: Sequence[Member], kind: str, *, name: str, weights=None,
                   out: Optional[Path] = None, out_dir: Path = DEFAULT_OUT, target: Optional[Target] = None,
                   parent_run_id: Optional[str] = None, group: Optional[Group] = None,
                   greedy_init: int = 3, greedy_steps: int = 20, scored: Optional[dict] = None,
                   views: Optional[Sequence] = None) -> rundir.RunDir:
    """Fuse `members` (all of them, with `weights`; greedy: the selected ones with their counts),
    write the ensemble directory, log it to `target`; returns the directory as `load_run` reads it.
    TTA (kind "tta", ensemble/tta.py): `members` is the run once per view, `views` the views and
    `scored` {split: AlignedSplit} their scores, computed live instead of read from the members."""
    if kind not in (*FUSIONS, "manual", "tta"):
        raise EnsembleError(f"ensemble kind {kind!r} is not one of {[*FUSIONS, 'manual', 'tta']}")
    members = list(members)
    out = Path(out) if out is not None else Path(out_dir) / name
    _check_out(out)
    classes, splits = align(members) if scored is None else (list(members[0].run.classes), scored)
    val = splits["val"]
    candidate_map = [metrics.mean_average_precision(s, val.targets) for s in val.scores]
    greedy_doc = None
    if kind == "greedy":
        g = greedy_select(val.scores, val.targets, init=greedy_init, steps=greedy_steps)
        greedy_doc = {"init": greedy_init, "steps": greedy_steps, "best_step": g.best_step,
                      "candidates": [{"name": m.name, "run_id": m.run_id, "run_dir": str(m.run.path.resolve()),
                                      "val_mAP": v} for m, v in zip(members, candidate_map)],
                      "trajectory": [{"step": p["step"], "size": p["size"], "added": p["added"],
                                      "added_name": members[p["added"]].name, "val_mAP": p["val_mAP"]}
                                     for p in g.trajectory]}
        keep = np.flatnonzero(g.counts)
        members = [members[i] for i in keep]
        weights = g.counts[keep].astype(np.float64)
        candidate_map = [candidate_map[i] for i in keep]
        splits = {s: AlignedSplit(a.keys, a.targets, [a.scores[i] for i in keep]) for s, a in splits.items()}
    w = check_weights(weights, len(members))
    fused = {split: fuse(a.scores, w) for split, a in splits.items()}
    thresholds = metrics.tune_thresholds(fused["val"], val.targets)      # validation only
    result = {"kind": "ensemble", "ensemble_kind": kind, "num_members": len(members), "selection_split": "val",
              "forward_passes": len(members)}   # one network pass per member (TTA: per view) and image
    for split, a in splits.items():
        result[split] = metrics.evaluate(fused[split], a.targets, classes=classes, thresholds=thresholds)
    doc = {"format_version": ENSEMBLE_FORMAT_VERSION, "kind": kind, "name": name,
           "fusion": "weighted mean of the members' probabilities: sum_i w_i S_i / sum_i w_i",
           "selection_split": "val",
           "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "members": [{"run_dir": str(m.run.path.resolve()), "run_id": m.run_id, "name": m.name,
                        "weight": float(wi), "val_mAP": v} for m, wi, v in zip(members, w, candidate_map)]}
    for entry, view in zip(doc["members"], views or ()):
        entry["view"] = view.to_dict()
    if group is not None:
        doc["group"] = {"vary": group.vary, "config": json.loads(group.key),
                        "values": [m.flat_config.get(group.vary) for m in members]}
        if group.rule is not None:
            doc["group"]["rule"] = group.rule.to_dict()
    if greedy_doc is not None:
        doc["greedy"] = greedy_doc
    previous = None
    if target is not None:
        previous = _previous_run(out, resolve_uri(target.uri), target.experiment, doc)
    _write_dir(out, classes, splits, fused, thresholds, result, doc)
    if target is not None:
        _fill_from_mlflow(members, mq.connect(target.uri))
        log_ensemble(out, target, members, w, kind, name, result, candidate_map, parent_run_id, previous, views)
    return rundir.load_run(out)


# --------------------------------------------------------------------------- many ensembles


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _by_dataset(members: Sequence[Member]) -> dict[str, list[Member]]:
    """{fingerprint: members} split by (classes, validation keys): greedy selection runs within
    one dataset."""
    parts: dict[str, list[Member]] = {}
    for m in members:
        fingerprint = json.dumps([m.run.classes, sorted(m.run.split("val").keys)])
        parts.setdefault(digest(fingerprint), []).append(m)
    return parts


def expand_kinds(select: Sequence[str]) -> list[str]:
    kinds = []
    for s in select:
        for k in (KINDS if s == "all" else [s]):
            if k not in KINDS:
                raise EnsembleError(f"--select {s!r} is not valid; choose from {[*KINDS, 'all']}")
            if k not in kinds:
                kinds.append(k)
    return kinds


def _selections(select: Sequence) -> list:
    """`select` in order, "all" expanded, repeated kinds once: kind names and EnsembleRules."""
    out = []
    for s in select:
        for item in ([s] if isinstance(s, EnsembleRule) else expand_kinds([s])):
            if item not in out:
                out.append(item)
    return out


def build_ensembles(experiment: str, select: Sequence, tracking_uri: Optional[str],
                    parent_run_id: Optional[str] = None, out_dir: Path = DEFAULT_OUT,
                    run_ids: Optional[list[str]] = None, greedy_init: int = 3,
                    greedy_steps: int = 20, soup_bn_batches: int = DEFAULT_BN_BATCHES,
                    device: str = "cpu") -> list[rundir.RunDir]:
    """Every ensemble of the `select`ed kinds (or `EnsembleRule`s: a ScaleEn / DistrEn of the runs
    a rule names, e.g. the paper's Table 3) among the FINISHED training runs of `experiment`
    (all of them, those nested under `parent_run_id`, or exactly `run_ids`), each written under
    `out_dir` and logged in the experiment (nested under `parent_run_id` when given). Runs whose
    directory is not on this machine are skipped with a warning (an error for `run_ids`), and so
    are runs made from other runs (tag mlic.derived: soups, distilled students). `soup` builds
    greedy weight soups (soup.py; `soup_bn_batches`, `device`) instead of fused ensembles."""
    selections = _selections(select)
    check_dir(out_dir, "--out", EnsembleError)   # before querying MLflow and loading every run
    client = mq.connect(tracking_uri)
    runs = mq.finished_runs(client, experiment, None if run_ids else parent_run_id, run_ids)
    members = []
    for r in runs:
        if r.run_dir is None and not run_ids:
            continue   # not a training run (a sweep's parent run, say): the trainer tags run_dir
        if r.derived:
            continue   # a soup or a student is never folded back into an ensemble or a soup
        try:
            members.append(member_from_dir(mq.run_dir_of(r), r))
        except (mq.TrackingQueryError, rundir.RunDirError, EnsembleError) as e:
            if run_ids:
                raise
            warnings.warn(f"skipping MLflow run {r.run_id} ({r.name}): {e}")
    members = [m for m in members if "val" in m.run.splits]
    target = Target(tracking_uri, experiment)
    # Names are stable for a group / dataset, so a rebuild replaces its directory; runs of two
    # sweeps (parents) never share one.
    suffix = f"-{parent_run_id[:8]}" if parent_run_id else ""
    built = []
    for selection in selections:
        rule = selection if isinstance(selection, EnsembleRule) else None
        kind = rule.kind if rule is not None else selection
        if kind == "soup":
            built += build_soups(members, out_dir, target, parent_run_id, suffix, soup_bn_batches, device)
            continue
        if kind in VARY:
            groups = find_groups(members, kind, lambda m: m.flat_config, lambda m: m.start_time,
                                 lambda m: m.label, rule=rule)
            jobs = [(g.items, g.name + suffix, g) for g in groups]
        else:
            jobs = [(part, f"greedy-{_safe(experiment)}-{fingerprint}{suffix}", None)
                    for fingerprint, part in _by_dataset(members).items() if len(part) >= 2]
        if not jobs:
            print(f"{rule.describe() if rule is not None else kind}: nothing to fuse among {len(members)} finished runs"
                  + (f" (no two differ only in {VARY[kind]})" if kind in VARY else " (fewer than 2)"))
        for items, name, group in jobs:
            built.append(build_ensemble(items, kind, name=name, out_dir=out_dir, target=target,
                                        parent_run_id=parent_run_id, group=group,
                                        greedy_init=greedy_init, greedy_steps=greedy_steps))
    return built
