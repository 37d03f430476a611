"""Turn a multi-label dataset (VOC, COCO, NUS-WIDE, CSV) into indexed WebDataset shards.

CPU only (no GPU involved); 2 processes shown, any N gives byte-identical tars:
    python -m mlic_dist.shard voc     VOCdevkit/VOC2007 --out shards/voc2007 --workers 2
    python -m mlic_dist.shard coco    coco --split train=annotations/instances_train2014.json \\
        --split test=annotations/instances_val2014.json --out shards/coco2014
    python -m mlic_dist.shard nuswide NUS-WIDE --out shards/nuswide --max-reject-fraction 0.5
    python -m mlic_dist.shard csv     labels.csv --images photos/ --out shards/mine
    python -m mlic_dist.shard csv     VOC2007/trainval.csv --split test=VOC2007/classification_test.csv \
        --images VOCdevkit/VOC2007/JPEGImages --csv-values voc --out shards/voc2007
    python -m mlic_dist.shard verify  shards/mine --decode    # every file and image checked
Python: `shard("csv", "labels.csv", "out/", images="photos/", workers=2)` returns the manifest.

Output: docs/contracts.md "Shards". Datasets without a val split get one carved from train
(iterative stratification, --val-fraction, --seed); test is never touched for model selection.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

from .classes import read_classes_file
from .records import SourceDataset, SourceError
from .sources import read_source
from .split import carve_val, distribution_report
from .writer import ShardError, ShardOptions, check_rejects, options_dict, summary, write_shards

__all__ = ["shard", "ShardError", "SourceError", "ShardOptions", "read_source", "write_shards",
           "carve_val_split"]


def carve_val_split(ds: SourceDataset, fraction: float, seed: int) -> Optional[dict]:
    """Move a stratified `fraction` of train to val when the source has no val; return the report."""
    if "val" in ds.splits_present:
        return None
    train = [r for r in ds.records if r.split == "train"]
    if not train:
        rejected = (f" ({len(ds.rejects)} of {ds.num_inputs} inputs rejected, by reason "
                    f"{dict(Counter(r.reason for r in ds.rejects).most_common())})" if ds.rejects else "")
        raise SourceError(f"{ds.root}: no train samples to carve a validation split from{rejected}")
    labels = np.stack([r.labels for r in train])
    train_idx, val_idx = carve_val(labels, fraction, seed)
    for i in val_idx:
        train[i].split = "val"
    report = {"from": "train", "fraction": fraction, "seed": seed}
    report.update(distribution_report(ds.classes, labels[train_idx], labels[val_idx]))
    return report


def shard(kind: str, root, out, *, splits: Optional[dict] = None,
          images_dir: Optional[dict] = None, images=None, path_column: Optional[str] = None,
          classes_file=None, keep_empty: bool = False, val_fraction: float = 0.1, seed: int = 0,
          shard_size_mb: float = 256.0, samples_per_shard: int = 0, max_side: int = 0,
          quality: int = 90, workers: int = 1, max_reject_fraction: float = 0.05,
          overwrite: bool = False, progress: bool = True, verbose: bool = True,
          csv_values: str = "default", header: bool = True, voc_val: str = "carve",
          args: Optional[dict] = None) -> dict:
    """Read `root` as `kind`, carve val if needed, write shards to `out`; return the manifest.

    `args` is recorded in the manifest (the CLI passes its parsed arguments); by default the
    keyword arguments of this call are recorded.
    """
    opts = ShardOptions(out=Path(out), shard_size_mb=shard_size_mb,
                        samples_per_shard=samples_per_shard, max_side=max_side, quality=quality,
                        workers=workers, max_reject_fraction=max_reject_fraction, seed=seed,
                        overwrite=overwrite, progress=progress)
    if Path(out).exists() and not overwrite:  # fail before reading a large dataset
        raise ShardError(f"output directory {out} already exists; pass --overwrite to replace it "
                         "or choose another --out")
    classes = None
    if classes_file is not None:
        if kind in ("coco", "nuswide"):
            raise SourceError(f"--classes applies to csv and voc; {kind} takes its classes from the "
                              "dataset's own list: drop --classes")
        classes = read_classes_file(classes_file)
    if kind != "csv" and (csv_values != "default" or not header):
        raise SourceError(f"--csv-values and --no-header apply to csv files; {kind} has its own format: "
                          "drop them")
    if kind != "voc" and voc_val != "carve":
        raise SourceError(f"--voc-val applies to voc; drop it for {kind}")
    ds = read_source(kind, Path(root), splits=splits, images_dir=images_dir, images=images,
                     path_column=path_column, classes=classes, keep_empty=keep_empty,
                     csv_values=csv_values, header=header, voc_val=voc_val)
    # the reject summary first: when every image is rejected, the carve would hide why
    check_rejects(ds.rejects, ds.num_inputs, opts, final=False)
    carved = carve_val_split(ds, val_fraction, seed)
    if args is None:
        args = {"kind": kind, "root": str(root), "splits": splits, "images_dir": images_dir,
                "images": None if images is None else str(images), "path_column": path_column,
                "classes_file": None if classes_file is None else str(classes_file),
                "keep_empty": keep_empty, "val_fraction": val_fraction, "csv_values": csv_values,
                "header": header, "voc_val": voc_val}
        args.update(options_dict(opts))
    manifest = write_shards(ds, opts, args, carved)
    if verbose:
        print(summary(manifest, Path(out)), flush=True)
    for w in manifest["class_warnings"]:   # also when quiet: a typo costs a whole training run
        print(f"warning: {w['message']}", file=sys.stderr, flush=True)
    return manifest
