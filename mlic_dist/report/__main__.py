"""CLI: `python -m mlic_dist.report` (what it writes: mlic_dist/report/tables.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import check_dir
from ..cli import entry_point
from ..tracking import query as mq
from .tables import ReportError, __doc__ as DOC, build_report, collect_from_dirs, markdown_table, write_report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.report", description=DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--experiment", help="MLflow experiment to report")
    src.add_argument("--run-dirs", nargs="+", type=Path, metavar="DIR", help="report these run / ensemble directories")
    p.add_argument("--out", type=Path, help="output directory (default reports/NAME)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--parent-run-id", help="only the runs nested under this MLflow run (a sweep); the report "
                                           "run is nested under it too")
    p.add_argument("--speed-images", type=int, default=64, metavar="N",
                   help="time predict on N validation images per model of the one-model table (0: skip)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where --speed-images times predict")
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.run_dirs and (args.tracking_uri or args.parent_run_id):
        p.error("--tracking-uri / --parent-run-id go with --experiment, not --run-dirs")
    if args.speed_images < 0:
        p.error(f"--speed-images {args.speed_images} must be >= 0")
    mq.fail_fast_http()
    if args.experiment:
        report = build_report(args.experiment, args.tracking_uri, args.out or Path("reports") / args.experiment,
                              args.parent_run_id, args.speed_images, args.device)
    else:
        out = check_dir(args.out or Path("reports") / "runs", "--out", ReportError)
        report = write_report(collect_from_dirs(args.run_dirs), out, f"Runs in {out}", args.speed_images, args.device)
    has_ensembles = any(not r["method"].startswith("Single best") for r in report.tables["ensembles"])
    main_table = report.tables["ensembles"] if has_ensembles else report.tables["single_models"]
    print(markdown_table(main_table))
    print(f"report: {report.paths[0]} ({len(report.paths)} files)"
          + (f"; MLflow run {report.run_id}" if report.run_id else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
