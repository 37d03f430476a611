"""Score-level fusion: the member runs of an ensemble, their rows aligned by sample key, and the
weighted mean of their probabilities (the paper's eq. 3). Pure NumPy on saved score matrices;
`mlic_dist.ensemble` (building ensembles) and `mlic_dist.predict` (fusing live predictions)
both fuse with `fuse`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .. import rundir
from ..errors import UserError
from ..tracking import query as mq


class EnsembleError(UserError, ValueError):
    """The members cannot be fused (or the request is malformed); the message names the fix."""


Member = mq.FinishedRun   # an ensemble's member: a finished training run (never an ensemble)


def member_from_dir(path, tracked: Optional[mq.TrackedRun] = None) -> Member:
    """A training run as a member (see `tracking.query.finished_run`)."""
    m = mq.finished_run(path, tracked)
    if m.is_ensemble:
        raise EnsembleError(f"{m.run.path} is an ensemble ({rundir.ENSEMBLE}); ensembles are never members "
                            f"of ensembles: pass the runs it fused instead")
    return m


def _first_difference(a: Sequence, b: Sequence) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"position {i}: {x!r} vs {y!r}"
    return f"lengths {len(a)} vs {len(b)}"


@dataclass
class AlignedSplit:
    keys: list[str]                 # (N,) row order: the first member's
    targets: np.ndarray             # (N, C) int8
    scores: list[np.ndarray]        # M x (N, C) float32 probabilities, rows in `keys` order


def align(members: Sequence[Member]) -> tuple[list[str], dict[str, AlignedSplit]]:
    """(classes, {split: AlignedSplit}) with every member's rows put in the first member's key
    order. Raises EnsembleError naming two runs and the first difference."""
    if len(members) < 1:
        raise EnsembleError("an ensemble needs at least one member run")
    ref = members[0]
    for m in members[1:]:
        if m.run.classes != ref.run.classes:
            raise EnsembleError(f"members have different classes: {ref.label} and {m.label} differ at "
                                f"{_first_difference(ref.run.classes, m.run.classes)}; fuse only runs "
                                f"trained on the same shards")
    out = {}
    for split in rundir.SPLITS:
        have = [m for m in members if split in m.run.splits]
        if not have:
            if split == "val":
                raise EnsembleError(f"{ref.label} has no validation scores ({rundir.scores_file('val')}); "
                                    f"ensembles are selected and thresholded on validation")
            continue
        if len(have) != len(members):
            lacking = next(m for m in members if split not in m.run.splits)
            raise EnsembleError(f"{have[0].label} has {split} scores but {lacking.label} has none "
                                f"({rundir.scores_file(split)}); fuse runs that scored the same splits")
        first = ref.run.split(split)
        keys = first.keys
        if len(set(keys)) != len(keys):
            raise EnsembleError(f"{ref.label}: {rundir.keys_file(split)} repeats a key; the run's outputs are broken")
        aligned = AlignedSplit(keys, first.targets, [first.scores.astype(np.float32, copy=False)])
        for m in members[1:]:
            s = m.run.split(split)
            row = {k: i for i, k in enumerate(s.keys)}
            missing = next((k for k in keys if k not in row), None)
            extra = next((k for k in s.keys if k not in set(keys)), None) if missing is None else None
            if missing is not None or extra is not None or len(row) != len(s.keys):
                what = (f"key {missing!r} is in {ref.label} but not in {m.label}" if missing is not None else
                        f"key {extra!r} is in {m.label} but not in {ref.label}" if extra is not None else
                        f"{m.label} repeats a key")
                raise EnsembleError(f"members do not cover the same {split} samples ({len(keys)} vs "
                                    f"{len(s.keys)} keys): {what}; fuse runs scored on the same {split} split")
            idx = np.fromiter((row[k] for k in keys), np.int64, len(keys))
            targets = s.targets[idx]
            if not np.array_equal(targets, first.targets):
                r = int(np.argwhere(targets != first.targets)[0][0])
                raise EnsembleError(f"members disagree on the labels of {split} sample {keys[r]!r}: "
                                    f"{ref.label} has {first.targets[r].tolist()}, {m.label} has "
                                    f"{targets[r].tolist()}; they were scored on different shards")
            aligned.scores.append(s.scores[idx].astype(np.float32, copy=False))
        out[split] = aligned
    return list(ref.run.classes), out


def check_weights(weights: Optional[Sequence[float]], num_members: int) -> np.ndarray:
    if weights is None:
        return np.ones(num_members)
    w = np.asarray(list(weights), np.float64)
    if w.shape != (num_members,):
        raise EnsembleError(f"--weights has {w.size} values for {num_members} member runs; give one per run")
    if not np.isfinite(w).all() or (w <= 0).any():
        raise EnsembleError(f"--weights {w.tolist()} must all be > 0 (drop a run instead of weighting it 0)")
    return w


def fuse(scores: Sequence[np.ndarray], weights: Optional[Sequence[float]] = None) -> np.ndarray:
    """(N, C) float32: sum_i w_i S_i / sum_i w_i over M aligned (N, C) probability matrices
    (equal weights: the paper's eq. 3). Accumulates in float64, one member at a time."""
    w = check_weights(weights, len(scores))
    acc = np.zeros(np.shape(scores[0]), np.float64)
    for wi, s in zip(w, scores):
        acc += wi * np.asarray(s, np.float64)   # exact for float32 x small integer weights
    return (acc / w.sum()).astype(np.float32)
