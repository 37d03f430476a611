"""CLI: `python -m mlic_dist.export` (the formats and their checks: mlic_dist/export/formats.py).

Exit status 0; 2 with one line on stderr for a user error (no such run, unfinished run, no MLflow
run for --format mlflow, an --out that cannot be written: checked before the model is loaded);
1 with one line when the written file fails its check (it is removed; nothing is logged).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..cli import entry_point
from ..tracking import query as mq
from .formats import FILE_FORMATS, __doc__ as FORMATS_DOC, export_file
from ..predict import parse_tta
from .model import ExportError, load

FORMATS = (*FILE_FORMATS, "mlflow")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.export", description=FORMATS_DOC + __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mq.add_run_arguments(p, "the MLflow tracking URI (with --run, or to log --format mlflow)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", type=Path, help="the file to write (onnx, torchscript)")
    p.add_argument("--register", metavar="NAME", help="--format mlflow: also register the model under NAME")
    p.add_argument("--tta", metavar="SPEC", help="test-time augmentation views in the model (as predict --tta): "
                                                 "flip, sizes=384,448,512 or sizes=384,448,512,flip")
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    mq.fail_fast_http()
    tta = parse_tta(args.tta)   # a bad spec: one line, before anything is loaded
    run_dir = mq.resolve_run_dir(args.run_dir, args.run, args.tracking_uri)
    if args.format == "mlflow":
        from .pyfunc import log_model  # imports mlflow's model flavours (seconds), only for this format

        module, meta = load(run_dir, tta)
        result = log_model(module, meta, run_dir, tracking_uri=args.tracking_uri, run_id=args.run,
                           register=args.register)
    elif args.out is None:
        raise ExportError(f"--format {args.format} writes a file: give --out FILE")
    else:
        result = export_file(run_dir, args.format, args.out, tta)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
