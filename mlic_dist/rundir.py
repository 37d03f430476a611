"""The run directory: its file names, its writers and `load_run`, the one reader.

A training run (`mlic_dist.train`) and a fused ensemble (`mlic_dist.ensemble`) leave the same
files, so `evaluate`, `report`, `predict` and `export` treat both alike:

    RUN/config.yaml          resolved training config (ensembles: absent; see ensemble.json)
    RUN/classes.json         ["name", ...], the column order of every score matrix
    RUN/history.jsonl        one JSON object per epoch (ensembles: absent)
    RUN/scores_{split}.npy   (N, C) float32 probabilities, rows in sample-id order
    RUN/targets_{split}.npy  (N, C) int8 labels 1 / 0 / -1 (ignore)
    RUN/keys_{split}.txt     N sample keys, one a line, row order of the two arrays
    RUN/thresholds.json      {class: threshold}, per-class, tuned on validation
    RUN/metrics.json         {"val": evaluate(...), "test": ..., run facts}
    RUN/best_model.pt        best validation weights, a plain state dict (ensembles: absent)
    RUN/ensemble.json        ensembles only: {"kind", "members": [{"run_dir", "run_id", "weight"}], ...}
    RUN/tracking.json        {"tracking_uri", "experiment", "run_id", "tags", "inputs", "complete"}:
                             where MLflow has this run, what it was given, whether all arrived

Every writer replaces its file atomically (a temporary file, then `os.replace`), so a reader
never sees half a file and a killed writer leaves the previous version. The layout is written
down in docs/contracts.md ("Run directory").
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import yaml

from . import atomic, metrics
from .config import config_from_dict
from .errors import UserError

CONFIG = "config.yaml"
CLASSES = "classes.json"
HISTORY = "history.jsonl"
THRESHOLDS = "thresholds.json"
METRICS = "metrics.json"
BEST_MODEL = "best_model.pt"
ENSEMBLE = "ensemble.json"
SOUP = "soup.json"             # a weight soup's ingredients (mlic_dist/ensemble/soup.py)
TRACKING = "tracking.json"
CHECKPOINTS = "checkpoints"
SPLITS = ("val", "test")


def scores_file(split: str) -> str:
    return f"scores_{split}.npy"


def targets_file(split: str) -> str:
    return f"targets_{split}.npy"


def keys_file(split: str) -> str:
    return f"keys_{split}.txt"


class RunDirError(UserError, ValueError):
    """A run directory is missing, incomplete or inconsistent; the message names the file."""


# --------------------------------------------------------------------------- writers


def write_text(out: str | Path, name: str, text: str) -> Path:
    return atomic.write_text(Path(out) / name, text)


def write_json(out: str | Path, name: str, obj) -> Path:
    return write_text(out, name, json.dumps(obj, indent=2, default=float) + "\n")


def write_config(out: str | Path, config: dict) -> Path:
    """`config` as a nested plain dict (`config.to_dict(cfg)`)."""

    return write_text(out, CONFIG, yaml.safe_dump(config, sort_keys=False))


def write_classes(out: str | Path, classes: Sequence[str]) -> Path:
    return write_text(out, CLASSES, json.dumps(list(classes)))


def best_val_map(records: Sequence[dict]) -> Optional[float]:
    """The best validation mAP over history records (or Tune results, which carry the same
    keys): of the raw weights (`val_mAP`) or their EMA (`val_mAP_ema`), whichever was better,
    as best_model.pt may hold either. None when no record has a finite value."""
    values = [v for r in records for v in (r.get("val_mAP"), r.get("val_mAP_ema"))
              if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return float(max(values)) if values else None


def write_history(out: str | Path, records: Sequence[dict]) -> Path:
    """Rewritten whole from the trainer state, so a resumed run never duplicates lines."""
    return write_text(out, HISTORY, "".join(json.dumps(r) + "\n" for r in records))


def write_split(out: str | Path, split: str, scores: np.ndarray, targets: np.ndarray,
                keys: Sequence[str]) -> list[Path]:
    """scores (N, C) probabilities, targets (N, C) int8 and N keys for one split."""
    scores, targets, keys = np.asarray(scores, np.float32), np.asarray(targets, np.int8), list(keys)
    if scores.shape != targets.shape or scores.ndim != 2 or len(keys) != scores.shape[0]:
        raise RunDirError(f"split {split!r}: scores {scores.shape}, targets {targets.shape} and "
                          f"{len(keys)} keys must describe the same (N, C) rows")
    out = Path(out)
    paths = []
    for name, arr in ((scores_file(split), scores), (targets_file(split), targets)):
        with atomic.replace_with(out / name) as tmp:   # keeps .npy: np.save would append it
            np.save(tmp, arr)
        paths.append(out / name)
    paths.append(write_text(out, keys_file(split), "".join(k + "\n" for k in keys)))
    return paths


def write_thresholds(out: str | Path, thresholds, classes: Sequence[str]) -> Path:
    path = Path(out) / THRESHOLDS
    with atomic.replace_with(path) as tmp:
        metrics.save_thresholds(tmp, thresholds, classes)
    return path


def write_metrics(out: str | Path, result: dict) -> Path:
    return write_json(out, METRICS, result)


def write_tracking(out: str | Path, tracking_uri: Optional[str], experiment: Optional[str],
                   run_id: Optional[str], **record) -> Path:
    """tracking.json: where MLflow has this run (`run_id` null until MLflow answered), plus what
    the tracker gave or meant to give it (`tags`, `inputs`), and `complete` (true once MLflow took
    everything, false when the tracker gave up, with `gave_up` saying why) -- so that `relog`
    completes the run a live run would have been."""
    return write_json(out, TRACKING, {"tracking_uri": tracking_uri, "experiment": experiment,
                                      "run_id": run_id, **record})


def load_tracking(out: str | Path) -> Optional[dict]:
    """tracking.json ({"tracking_uri", "experiment", "run_id", "tags", "inputs", "complete",
    "gave_up"}; all but the first three optional) or None."""
    path = Path(out) / TRACKING
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def artifact_files(out: str | Path) -> list[Path]:
    """The small files a tracker uploads (no checkpoints, no weights)."""
    out = Path(out)
    names = [CONFIG, CLASSES, HISTORY, METRICS, THRESHOLDS, ENSEMBLE, SOUP]
    for split in SPLITS:
        names += [scores_file(split), targets_file(split), keys_file(split)]
    return [out / n for n in names if (out / n).is_file()]


# --------------------------------------------------------------------------- reader


@dataclass
class SplitScores:
    scores: np.ndarray        # (N, C) float32 probabilities
    targets: np.ndarray       # (N, C) int8, 1 / 0 / -1
    keys: list[str]           # (N,) row keys

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class RunDir:
    path: Path
    classes: list[str]
    splits: dict[str, SplitScores]
    config: Optional[dict] = None            # nested plain dict (None for ensembles)
    thresholds: Optional[np.ndarray] = None  # (C,) in `classes` order
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    ensemble: Optional[dict] = None          # ensemble.json for ensembles, else None
    tracking: Optional[dict] = None          # tracking.json, when the run reached MLflow

    @property
    def is_ensemble(self) -> bool:
        return self.ensemble is not None

    @property
    def name(self) -> str:
        return self.path.name

    def cfg(self):
        """The run's config as a validated `Config` (raises ConfigError on an unknown key)."""

        if self.config is None:
            raise RunDirError(f"{self.path} has no {CONFIG} (an ensemble: see {ENSEMBLE})")
        return config_from_dict(self.config)

    def split(self, name: str) -> SplitScores:
        if name not in self.splits:
            raise RunDirError(f"{self.path} has no scores for split {name!r} (it has "
                              f"{sorted(self.splits)}): {scores_file(name)} is missing")
        return self.splits[name]


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunDirError(f"{path} ({what}) is not valid JSON: {e}") from None


def _load_array(path: Path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise RunDirError(f"{path} ({what}) is not a readable .npy array: {e}") from None


def load_classes(path: Path) -> list[str]:
    names = _read_json(path, "class names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RunDirError(f"{path} must hold a JSON list of class names (strings)")
    return names


def load_split(path: str | Path, split: str, num_classes: Optional[int] = None) -> Optional[SplitScores]:
    """One split's scores, targets and keys, checked for agreement; None when not written."""
    path = Path(path)
    sfile, tfile, kfile = path / scores_file(split), path / targets_file(split), path / keys_file(split)
    if not sfile.is_file():
        return None
    scores = _load_array(sfile, "scores")
    if not tfile.is_file():
        raise RunDirError(f"{sfile} has no {tfile.name} beside it; the run's outputs are incomplete")
    targets = _load_array(tfile, "targets")
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise RunDirError(f"{path}: {sfile.name} has shape {scores.shape} and {tfile.name} "
                          f"{targets.shape}; both must be (N, C)")
    if num_classes is not None and scores.shape[1] != num_classes:
        raise RunDirError(f"{sfile} has {scores.shape[1]} columns, {CLASSES} lists {num_classes} classes")
    if not kfile.is_file():
        raise RunDirError(f"{sfile} has no {kfile.name} beside it; the run's outputs are incomplete")
    keys = kfile.read_text().splitlines()
    if len(keys) != scores.shape[0]:
        raise RunDirError(f"{kfile} lists {len(keys)} keys but {sfile.name} has {scores.shape[0]} "
                          "rows; the run's saved outputs are inconsistent")
    return SplitScores(scores, targets, keys)


def load_run(path: str | Path, splits: Sequence[str] = SPLITS) -> RunDir:
    """Read a run (or ensemble) directory. Raises RunDirError naming the file at fault."""

    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"run directory {path} does not exist")
    cfile = path / CLASSES
    if not cfile.is_file():
        raise RunDirError(f"{path} is not a finished run: {CLASSES} is missing (is training still "
                          "running, or did it stop before writing its outputs?)")
    classes = load_classes(cfile)
    loaded = {}
    for split in splits:
        s = load_split(path, split, len(classes))
        if s is not None:
            loaded[split] = s
    config = None
    if (path / CONFIG).is_file():
        try:
            config = yaml.safe_load((path / CONFIG).read_text())
        except yaml.YAMLError as e:
            raise RunDirError(f"{path / CONFIG} is not valid YAML: {e}") from None
    thresholds = None
    if (path / THRESHOLDS).is_file():
        try:
            thresholds = metrics.load_thresholds(path / THRESHOLDS, classes)
        except ValueError as e:
            raise RunDirError(str(e)) from None
    result = _read_json(path / METRICS, "metrics") if (path / METRICS).is_file() else {}
    history = []
    if (path / HISTORY).is_file():
        for i, line in enumerate((path / HISTORY).read_text().splitlines(), 1):
            if line.strip():
                try:
                    history.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RunDirError(f"{path / HISTORY}:{i} is not valid JSON: {e}") from None
    ensemble = _read_json(path / ENSEMBLE, "ensemble members") if (path / ENSEMBLE).is_file() else None
    tracking = _read_json(path / TRACKING, "tracking") if (path / TRACKING).is_file() else None
    return RunDir(path, classes, loaded, config, thresholds, result, history, ensemble, tracking)


# --------------------------------------------------------------------------- ownership


LOCK = ".lock"


class RunDirLocked(RunDirError):
    """Another live process owns the run directory; the message names it (pid, host, start)."""


class RunLock:
    """Exclusive ownership of a run directory for a training's life: a POSIX record lock
    (`lockf`) on OUT/.lock held by one process (rank 0), with the holder's pid, host and start
    time written in the file. The lock belongs to that process alone (forked DataLoader workers
    do not hold it, as they would an `flock`), and the kernel drops it when the process dies,
    also on kill -9: the next run takes the directory over and says whose it was. A second live
    run is refused with one line naming the holder. POSIX locks also reach other nodes through
    NFS (lockd / NFSv4) and Lustre. Within one process a second acquire does not conflict."""

    def __init__(self, out: str | Path):
        self.path = Path(out) / LOCK
        self._file = None
        self.previous: Optional[dict] = None   # the holder of a lock left by a dead process

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            f.seek(0)
            holder = _holder(f.read())
            f.close()
            raise RunDirLocked(f"{self.path.parent} is in use by another training ({describe_holder(holder)}); wait for "
                               f"it, stop it, or give this run another train.output_dir") from None
        f.seek(0)
        self.previous = _holder(f.read()) or None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()   # an empty lock file: nobody to report as a previous holder
            fcntl.lockf(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _holder(text: str) -> dict:
    try:
        doc = json.loads(text) if text.strip() else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
