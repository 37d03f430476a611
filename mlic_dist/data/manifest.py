"""Read `DIR/manifest.json` (written by `mlic_dist.shard`): classes, splits, shard paths, counts.

Every loader starts here, so this is where a damaged shard directory is caught before training:
missing files, and (cheaply: a stat and the small .idx per shard, no hashing) tars whose size on
disk is not what the manifest recorded (`integrity.check_shard_size`).

    from mlic_dist.data import read_manifest
    m = read_manifest("shards/voc2007")
    m.classes, m.split("train").num_samples, m.split("train").tar_paths
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .integrity import check_shard_size


@dataclass(frozen=True)
class ShardInfo:
    path: Path        # the .tar
    index_path: Path  # its DALI wds2idx index
    num_samples: int
    first_id: int     # ids in this shard are first_id .. first_id + num_samples - 1 (written order)
    bytes: Optional[int] = None   # the tar's size when written (None: a manifest from before "bytes")


@dataclass(frozen=True)
class SplitInfo:
    name: str
    num_samples: int
    shards: tuple[ShardInfo, ...]

    @property
    def tar_paths(self) -> list[str]:
        return [str(s.path) for s in self.shards]

    @property
    def index_paths(self) -> list[str]:
        return [str(s.index_path) for s in self.shards]


@dataclass(frozen=True)
class Manifest:
    root: Path
    kind: str
    classes: tuple[str, ...]
    splits: dict

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ValueError(f"split {name!r} is not in {self.root / 'manifest.json'}; it has "
                             f"{sorted(self.splits)} (set data.train_split/val_split/test_split, "
                             f"or re-shard with that split)")
        return self.splits[name]


def read_manifest(shards_dir) -> Manifest:
    """Parse and check `shards_dir/manifest.json`; every tar and index file must exist, and every
    tar have the recorded size. Raises FileNotFoundError (missing), ValueError (not a manifest) or
    ShardDataError (a truncated or changed tar, a stale index)."""
    if shards_dir is None:
        raise ValueError("data.shards is not set; point it at a directory written by "
                         "`python -m mlic_dist.shard` (it holds manifest.json)")
    root = Path(shards_dir)
    path = root / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: data.shards={str(root)!r} must be a directory "
                                f"written by `python -m mlic_dist.shard`")
    try:
        doc = json.loads(path.read_text())
        classes = tuple(doc["classes"])
        raw_splits = doc["splits"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid shard manifest ({e!r}); re-run mlic_dist.shard") from None
    splits = {}
    for name, info in raw_splits.items():
        shards, first = [], 0
        for s in info.get("shards", []):
            tar, idx = root / s["file"], root / s["index"]
            for f, what in ((tar, "shard"), (idx, "index")):
                if not f.is_file():
                    raise FileNotFoundError(f"{what} file {f} of split {name!r} (listed in {path}) is missing; "
                                            f"re-run mlic_dist.shard")
            n = int(s["num_samples"])
            size = s.get("bytes")
            shard = ShardInfo(tar, idx, n, first, None if size is None else int(size))
            check_shard_size(shard)
            shards.append(shard)
            first += n
        if first != int(info["num_samples"]):
            raise ValueError(f"{path}: split {name!r} says num_samples={info['num_samples']} but its shards "
                             f"hold {first}; re-run mlic_dist.shard")
        splits[name] = SplitInfo(name, first, tuple(shards))
    return Manifest(root, doc.get("kind", ""), classes, splits)


def content_digest(shards_dir) -> Optional[str]:
    """A digest of the data itself: sha256 over the manifest's classes and, per split, its shards'
    sha256 and sample counts (not the manifest's timings, arguments or paths: re-sharding the
    same data elsewhere gives the same digest). Runs record it (MLflow tag and dataset input) and
    a resume compares it. None without a manifest."""

    path = Path(shards_dir) / "manifest.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        content = {"classes": doc["classes"],
                   "splits": {name: [[s.get("sha256"), s.get("num_samples")] for s in info["shards"]]
                              for name, info in sorted(doc["splits"].items())}}
    except (json.JSONDecodeError, KeyError, TypeError):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
