"""Ground-truth labels of a split, read straight from its tars (no image decoding).

Evaluation scores every sample once by its id; the metrics need the original -1/0/1 labels
(VOC "difficult" = -1 stays out of the ranking even when training treats it as positive), so
they come from the shards, not from the training targets. The shards go through `read_manifest`
(sizes checked) and `integrity.iter_samples`, so a damaged tar is named, not a bare tarfile error.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .integrity import ShardDataError, iter_samples, shard_size_error, size_problem
from .manifest import read_manifest


def read_split_labels(shards_dir: str | Path, split: str) -> tuple[list[str], np.ndarray]:
    """(keys in id order, labels int8 (N, C) with 1 / 0 / -1) for `split`.
    Raises ValueError (no such split) or ShardDataError (a truncated or inconsistent shard)."""
    manifest = read_manifest(shards_dir)
    info = manifest.split(split)
    n, c = info.num_samples, manifest.num_classes
    labels = np.zeros((n, c), dtype=np.int8)
    keys: list[str | None] = [None] * n
    for shard in info.shards:
        count = 0
        for key, comps in iter_samples(shard.path, read=("lbl", "id")):
            count += 1
            if "lbl" not in comps or "id" not in comps:
                problem = size_problem(shard)
                if problem:   # a cut-off last sample: say the file is short, not the sample
                    raise shard_size_error(shard, problem)
                raise ShardDataError(f"{shard.path}: sample {key!r} lacks a .lbl or .id member; re-run "
                                     "`python -m mlic_dist.shard` for the dataset")
            idx = int(np.frombuffer(comps["id"], dtype="<i8")[0])
            if not 0 <= idx < n:
                raise ShardDataError(f"{shard.path}: sample {key!r} has id {idx}, outside 0..{n - 1}; "
                                     "re-run `python -m mlic_dist.shard` for the dataset")
            lbl = np.frombuffer(comps["lbl"], dtype=np.int8)
            if lbl.shape != (c,):
                raise ShardDataError(f"{shard.path}: sample {key!r} has {lbl.size} labels, the manifest "
                                     f"lists {c} classes; re-run `python -m mlic_dist.shard`")
            labels[idx] = lbl
            keys[idx] = key
        if count != shard.num_samples:
            problem = size_problem(shard) or (f"holds {count} samples but the manifest says "
                                              f"{shard.num_samples}")
            raise shard_size_error(shard, problem)
    missing = [i for i, k in enumerate(keys) if k is None]
    if missing:
        raise ShardDataError(f"split {split!r} of {manifest.root}: ids {missing[:5]} are in no shard "
                             f"(manifest says {n} samples); re-run `python -m mlic_dist.shard`")
    return keys, labels  # type: ignore[return-value]
