"""Read `DIR/manifest.json` (written by `mlic_dist.shard`): classes, splits, shard paths, counts.

    from mlic_dist.data import read_manifest
    m = read_manifest("shards/voc2007")
    m.classes, m.split("train").num_samples, m.split("train").tar_paths
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ShardInfo:
    path: Path        # the .tar
    index_path: Path  # its DALI wds2idx index
    num_samples: int
    first_id: int     # ids in this shard are first_id .. first_id + num_samples - 1 (written order)


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
    """Parse and check `shards_dir/manifest.json`; every tar and index file must exist."""
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
    except (json.JSONDecodeError, KeyError, TypeError) as e:
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
            shards.append(ShardInfo(tar, idx, n, first))
            first += n
        if first != int(info["num_samples"]):
            raise ValueError(f"{path}: split {name!r} says num_samples={info['num_samples']} but its shards "
                             f"hold {first}; re-run mlic_dist.shard")
        splits[name] = SplitInfo(name, first, tuple(shards))
    return Manifest(root, doc.get("kind", ""), classes, splits)
