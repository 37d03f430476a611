"""Ground-truth labels of a split, read straight from its tars (no image decoding).

Evaluation scores every sample once by its id; the metrics need the original -1/0/1 labels
(VOC "difficult" = -1 stays out of the ranking even when training treats it as positive), so
they come from the shards, not from the training targets.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np


def read_split_labels(shards_dir: str | Path, split: str) -> tuple[list[str], np.ndarray]:
    """(keys in id order, labels int8 (N, C) with 1 / 0 / -1) for `split`."""
    root = Path(shards_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} is not in {root / 'manifest.json'}; it has {sorted(manifest['splits'])}")
    info = manifest["splits"][split]
    n, c = int(info["num_samples"]), len(manifest["classes"])
    labels = np.zeros((n, c), dtype=np.int8)
    keys: list[str | None] = [None] * n
    for shard in info["shards"]:
        path = root / shard["file"]
        pending: dict[str, dict] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if ext not in ("lbl", "id"):
                    continue
                rec = pending.setdefault(key, {})
                rec[ext] = tar.extractfile(member).read()
                if len(rec) == 2:
                    idx = int(np.frombuffer(rec["id"], dtype="<i8")[0])
                    if not 0 <= idx < n:
                        raise ValueError(f"{path}: sample {key!r} has id {idx}, outside 0..{n - 1}")
                    labels[idx] = np.frombuffer(rec["lbl"], dtype=np.int8)
                    keys[idx] = key
                    del pending[key]
        if pending:
            raise ValueError(f"{path}: samples {sorted(pending)[:3]} lack a .lbl or .id member")
    missing = [i for i, k in enumerate(keys) if k is None]
    if missing:
        raise ValueError(f"split {split!r} of {root}: ids {missing[:5]} are in no shard "
                         f"(manifest says {n} samples); re-run mlic_dist.shard")
    return keys, labels  # type: ignore[return-value]
