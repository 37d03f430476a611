"""CLI: `python -m mlic_dist.shard {voc,coco,nuswide,csv} ROOT --out DIR [options]`, and
`python -m mlic_dist.shard verify DIR [--decode] [--split S] [--workers N]`.

Examples (CPU only; --workers N processes decode/re-encode, the output is identical for any N):
    python -m mlic_dist.shard voc     VOCdevkit/VOC2007 --out shards/voc2007 --workers 8
    python -m mlic_dist.shard voc     my_cvat_export --classes classes.txt --out shards/mine
    python -m mlic_dist.shard coco    data/coco --split train=annotations/instances_train2014.json \\
        --split test=annotations/instances_val2014.json --out shards/coco2014
    python -m mlic_dist.shard coco    roboflow_export --split train=train/_annotations.coco.json \\
        --split val=valid/_annotations.coco.json --out shards/rf
    python -m mlic_dist.shard nuswide data/NUS-WIDE --out shards/nuswide --max-reject-fraction 0.5
    python -m mlic_dist.shard csv     labels.csv --images photos/ --out shards/mine --max-side 512
    python -m mlic_dist.shard csv     VOC2007/trainval.csv --split test=VOC2007/classification_test.csv \
        --images VOCdevkit/VOC2007/JPEGImages --csv-values voc --out data/shards/voc2007
    python -m mlic_dist.shard csv     MSCOCO/trainAnnotation.csv --split test=MSCOCO/testAnnotation.csv \
        --no-header --classes coco80.txt --images COCO/train2014 --images-dir test=COCO/val2014 \
        --out data/shards/coco2014
    python -m mlic_dist.shard verify  shards/voc2007 --decode      # exit 0 clean, 1 bad, 2 usage

User errors (bad input files, bad options, too many rejects) print one `error: ...` line and exit
with status 2.
"""
from __future__ import annotations

import argparse
import sys

from ..cli import entry_point
from ..errors import UserError
from . import ShardError, shard, verify as verify_module
from .verify import verify


def _pairs(flag: str):
    def parse(text: str):
        name, sep, value = text.partition("=")
        if not sep:  # a bare DIR applies to every split
            return ("all", text)
        if not name or not value:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected SPLIT=PATH")
        return (name, value)
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mlic_dist.shard", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["voc", "coco", "nuswide", "csv"],
                   help="input format (or `verify`: see `python -m mlic_dist.shard verify --help`)")
    p.add_argument("root", help="dataset root (csv: the CSV file)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    src = p.add_argument_group("input")
    src.add_argument("--split", action="append", type=_pairs("--split"), default=[],
                     metavar="SPLIT=FILE", help="coco: annotation JSON per split; csv: a CSV whose "
                     "rows are all SPLIT, beside the positional one (repeat)")
    src.add_argument("--images-dir", action="append", type=_pairs("--images-dir"), default=[],
                     metavar="[SPLIT=]DIR", help="coco/nuswide/csv: image folder override (repeat; coco "
                     "default: the folder that holds the first file_names, see sources.py; csv "
                     "default: --images)")
    src.add_argument("--images", help="csv: folder the image paths are relative to "
                     "(default: the CSV's folder)")
    src.add_argument("--path-column", help="csv: image path column (default: first of "
                     "image/path/filename/name); a path without extension finds ID.jpg/.jpeg/.png")
    src.add_argument("--csv-values", choices=["default", "voc"], default="default",
                     help="csv class columns: default = 1 positive / 0 negative / -1 ignore; voc = "
                     "1 positive / -1 negative / 0 difficult (-> ignore), the VOC2007 CSVs of Wang et "
                     "al.; a file contradicting the choice is refused")
    src.add_argument("--no-header", dest="header", action="store_false",
                     help="csv without a header row: the image, then one column per class in "
                     "--classes FILE's order (the MS-COCO CSVs of Wang et al.)")
    src.add_argument("--classes", dest="classes_file", help="csv with a 'labels' column or --no-header, and voc: "
                     "class names one per line, in order; names not in it are rejected as "
                     "'unknown class' (default: sorted union of the names found)")
    src.add_argument("--keep-empty", action="store_true",
                     help="keep images without any label (default: reject as 'no labels')")
    sp = p.add_argument_group("validation split")
    sp.add_argument("--val-fraction", type=float, default=0.1,
                    help="share of train carved (stratified) into val when there is no val split")
    sp.add_argument("--seed", type=int, default=0, help="val carve and train shuffle seed")
    sp.add_argument("--voc-val", choices=["carve", "official"], default="carve",
                    help="voc: carve = train on trainval with val carved from it (the paper's "
                    "protocol, default); official = the devkit's train.txt / val.txt")
    out = p.add_argument_group("output")
    out.add_argument("--shard-size", dest="shard_size_mb", type=float, default=256.0,
                     help="target tar size in MB")
    out.add_argument("--samples-per-shard", type=int, default=0,
                     help="max samples per tar (0 = size limit only)")
    out.add_argument("--max-side", type=int, default=0, help="re-encode images whose longer "
                     "side exceeds this, resized to it (0 = keep original sizes and bytes)")
    out.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    out.add_argument("--workers", type=int, default=1, help="image decode/encode processes")
    out.add_argument("--max-reject-fraction", type=float, default=0.05,
                     help="fail when more than this share of inputs is rejected")
    out.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="hide the progress bar")
    return p


def build_verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.shard verify", description=verify_module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="a directory written by `python -m mlic_dist.shard` (its --out)")
    p.add_argument("--decode", action="store_true", help="also decode every image")
    p.add_argument("--split", action="append", default=None, metavar="S",
                   help="check only this split (repeat; default: all)")
    p.add_argument("--workers", type=int, default=1, help="processes, one shard each at a time")
    return p


@entry_point
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:
        return verify_main(argv[1:])
    parser = build_parser()
    a = parser.parse_args(argv)
    args = dict(vars(a), split=dict(a.split), images_dir=dict(a.images_dir))  # for the manifest
    try:
        shard(a.kind, a.root, a.out, splits=dict(a.split) or None,
              images_dir=dict(a.images_dir) or None, images=a.images, path_column=a.path_column,
              classes_file=a.classes_file, keep_empty=a.keep_empty, val_fraction=a.val_fraction,
              seed=a.seed, shard_size_mb=a.shard_size_mb, samples_per_shard=a.samples_per_shard,
              max_side=a.max_side, quality=a.quality, workers=a.workers,
              max_reject_fraction=a.max_reject_fraction, overwrite=a.overwrite,
              progress=a.progress, csv_values=a.csv_values, header=a.header, voc_val=a.voc_val,
              args=args)
    except (ValueError, OSError) as e:   # a bad option value (ShardOptions), an unreadable/unwritable path
        if isinstance(e, UserError):
            raise
        raise ShardError(str(e)) from None
    return 0


def verify_main(argv) -> int:
    a = build_verify_parser().parse_args(argv)
    report = verify(a.dir, decode=a.decode, splits=a.split, workers=a.workers)
    print(report.text(), flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
