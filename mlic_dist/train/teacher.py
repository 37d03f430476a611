"""Distillation targets: a teacher's cached probabilities on the training images, the file they
live in, its check against the shards, and the blend the trainer trains on.

`python -m mlic_dist.distill` (mlic_dist/distill/) computes the cache once per (teacher, shards)
and trains with `distill.teacher_scores` naming it; the trainer only reads it. The cache is three
files side by side (`OUT/teacher/train.npy` by default):

    train.npy        (N_train, C) float32 probabilities, row i = the sample whose `.id` is i
                     (the ordinal `Batch.ids` carries), columns in the manifest's class order
    train.keys.txt   the N_train sample keys, one a line, in row order (the split's keys file)
    train.json       {"format_version", "teacher", "teacher_run_id", "teacher_kind", "members",
                      "classes", "split", "num_samples", "manifest_sha256", "teacher_digest"}

Blend, per (image, class) entry the loss sees (mask 1): (1 - alpha) * label + alpha * teacher;
ignored entries (mask 0) keep the label (the loss drops them anyway). Under OR-mixup (M3) row i
is images i and partner[i] mixed, its labels OR-ed (the elementwise max, mixup.py); the teacher's
rows are OR-ed the same way (the soft OR: max(t_i, t_partner)) before the blend.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import atomic
from ..config.schema import ConfigError

FORMAT_VERSION = 1


def keys_path(scores: str | Path) -> Path:
    """train.npy -> train.keys.txt"""
    return Path(scores).with_suffix(".keys.txt")


def meta_path(scores: str | Path) -> Path:
    """train.npy -> train.json"""
    return Path(scores).with_suffix(".json")


@dataclass
class TeacherCache:
    probs: np.ndarray      # (N, C) float32
    keys: list[str]        # (N,)
    meta: dict


def npy_sha256(scores: str | Path) -> str:
    return hashlib.sha256(Path(scores).read_bytes()).hexdigest()


def write_cache(scores: str | Path, probs: np.ndarray, keys: list[str], meta: dict) -> Path:
    """The three files, each replaced atomically: the keys and the .npy first, the .json last as
    the commit record, holding the .npy's sha256 (`npy_sha256`); an overwrite cut between two
    files leaves a .json that does not name the .npy beside it, which a reader refuses."""
    scores = Path(scores)
    scores.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(keys_path(scores), "".join(k + "\n" for k in keys))
    with atomic.replace_with(scores) as tmp:   # the temporary keeps .npy: np.save adds none
        np.save(tmp, np.ascontiguousarray(probs, np.float32))
    atomic.write_text(meta_path(scores), json.dumps({"format_version": FORMAT_VERSION, **meta,
                                                     "npy_sha256": npy_sha256(scores)}, indent=1))
    return scores


def _problem(key: str, scores: Path, what: str) -> ConfigError:
    return ConfigError(f"{key}={str(scores)!r}: {what}; recompute it for these shards with python -m "
                       f"mlic_dist.distill --teacher DIR --config FILE data.shards=..., or set {key}=null")


def read_cache(scores: str | Path, key: str = "distill.teacher_scores") -> TeacherCache:
    """The cache's files, or ConfigError naming the file that is missing or unreadable."""
    scores = Path(scores)
    for f in (scores, keys_path(scores), meta_path(scores)):
        if not f.is_file():
            raise _problem(key, scores, f"{f} does not exist")
    try:
        probs = np.load(scores, allow_pickle=False)
        meta = json.loads(meta_path(scores).read_text())
        keys = keys_path(scores).read_text().splitlines()
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise _problem(key, scores, f"cannot be read ({str(e).splitlines()[0][:200]})") from None
    return TeacherCache(probs, keys, meta if isinstance(meta, dict) else {})


def check_cache(scores: str | Path, manifest, split: str, key: str = "distill.teacher_scores") -> TeacherCache:
    """The cache fits `split` of the shards (`data.Manifest`): shape (N, C), the manifest's classes,
    the split's keys in id order, probabilities in [0, 1]. Raises ConfigError (one line: the file,
    what differs, the fix). Reads files only: every rank calls it before the process group."""
    cache = read_cache(scores, key)
    scores = Path(scores)
    n, classes = manifest.split(split).num_samples, list(manifest.classes)
    if cache.probs.dtype != np.float32 or cache.probs.shape != (n, len(classes)):
        raise _problem(key, scores, f"holds a {cache.probs.dtype} {cache.probs.shape} matrix, the {split!r} split of "
                                    f"{manifest.root} needs float32 ({n}, {len(classes)})")
    if cache.meta.get("classes") != classes:
        raise _problem(key, scores, f"was computed for the classes {cache.meta.get('classes')}, {manifest.root} "
                                    f"has {classes}")
    split_keys_file = Path(manifest.root) / f"{split}-keys.txt"
    want = split_keys_file.read_text().splitlines() if split_keys_file.is_file() else None
    if want is not None and cache.keys != want:
        i = next((i for i, (a, b) in enumerate(zip(cache.keys, want)) if a != b), min(len(cache.keys), len(want)))
        got = cache.keys[i] if i < len(cache.keys) else "nothing"
        raise _problem(key, scores, f"row {i} is sample {got!r}, {split_keys_file} has "
                                    f"{want[i] if i < len(want) else 'nothing'!r} there (other shards)")
    if not np.isfinite(cache.probs).all() or cache.probs.min(initial=0) < 0 or cache.probs.max(initial=0) > 1:
        raise _problem(key, scores, "holds values outside [0, 1]; it is not a matrix of probabilities")
    return cache


def blend_targets(targets: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, partner: Optional[torch.Tensor],
                  teacher: torch.Tensor, alpha: float) -> torch.Tensor:
    """(B, C) float32 training targets: (1 - alpha) * targets + alpha * teacher rows, on the
    entries with mask 1 and a real id (padding, id -1, keeps its labels). targets/mask (B, C) as
    the loader made them (OR-mixed when `partner` is given); teacher (N, C) on their device."""
    real = ids >= 0                                          # (B,)
    t = teacher.index_select(0, ids.clamp_min(0))            # (B, C)
    if partner is not None:                                  # the soft OR of the pair, as the labels
        t = torch.maximum(t, t.index_select(0, partner))
        real = real & real.index_select(0, partner)
    blended = (1.0 - alpha) * targets + alpha * t
    return torch.where((mask > 0) & real[:, None], blended, targets)


def tracking_tags(meta: dict) -> dict:
    """What a student's MLflow run says about its teacher (docs/contracts.md, "MLflow")."""
    members = meta.get("members") or []
    return {"mlic.derived": "distill",
            "mlic.teacher": meta.get("teacher_run_id") or str(meta.get("teacher", "")),
            "mlic.teacher_members": ",".join(m.get("run_id") or str(m.get("run_dir", "")) for m in members)}
