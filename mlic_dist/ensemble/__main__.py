"""CLI: `python -m mlic_dist.ensemble` (the commands: mlic_dist/ensemble/build.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import rundir
from ..atomic import check_dir
from ..cli import entry_point
from ..tracking import query as mq
from .build import DEFAULT_OUT, KINDS, Target, __doc__ as DOC, build_ensemble, build_ensembles
from .members import EnsembleError, check_weights, member_from_dir
from .soup import DEFAULT_BN_BATCHES
from .selection import digest
from .tta import __doc__ as TTA_DOC, build_tta, parse_spec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.ensemble", description=DOC + "\n" + TTA_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dirs", nargs="+", type=Path, metavar="DIR", help="fuse these run directories")
    p.add_argument("--runs", nargs="+", metavar="RUN_ID", help="fuse these MLflow runs (their run_dir tags)")
    p.add_argument("--select", nargs="+", choices=[*KINDS, "all"],
                   help="with --experiment: build every ScaleEn / DistrEn / greedy ensemble (soup: greedy "
                        "weight soup, one model) among its runs")
    p.add_argument("--experiment", help="MLflow experiment: the runs to choose from (--select) or where "
                                        "to log a --run-dirs ensemble")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--parent-run-id", help="nest the ensemble run(s) under this MLflow run (and, with "
                                           "--select, choose among the runs nested under it)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per run (default: equal)")
    p.add_argument("--name", help="ensemble name (default: from the kind and the members)")
    p.add_argument("--out", type=Path, help=f"the ensemble directory (default {DEFAULT_OUT}/NAME); with "
                                            f"--select, the directory the ensembles go under")
    p.add_argument("--greedy-init", type=int, default=3, help="greedy: best runs that start the ensemble")
    p.add_argument("--greedy-steps", type=int, default=20, help="greedy: forward-selection steps")
    p.add_argument("--soup-bn-batches", type=int, default=DEFAULT_BN_BATCHES,
                   help=f"soup: training batches (evaluation transform) its BatchNorm statistics are recomputed "
                        f"on after averaging (default {DEFAULT_BN_BATCHES}; 0 keeps the averaged statistics)")
    p.add_argument("--no-tracking", action="store_true", help="write the directory only, log nothing to MLflow")
    p.add_argument("--tta", metavar="SPEC", help="test-time augmentation of the ONE run given (--run-dirs or "
                                                 "--runs): its views, e.g. flip, sizes=384,448,512,flip")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="--tta: where the views are scored; soup: where it is averaged, recomputed and scored")
    return p


def _with_chance(split: dict) -> str:
    chance = split.get("chance_mAP")
    return f"{split['mAP']:.4f}" + (f" (chance {chance:.4f})" if chance is not None else "")


def _summary(run: rundir.RunDir) -> str:
    test = run.metrics.get("test", {})
    run_id = (run.tracking or {}).get("run_id")
    if run.is_ensemble:
        kind, count = run.ensemble["kind"], len(run.ensemble["members"])
        what = "views of one run" if kind == "tta" else "runs"
    else:
        kind, what = run.metrics.get("kind"), "runs"
        count = f"{run.metrics.get('num_ingredients')} of {run.metrics.get('num_candidates')}"
    return (f"{kind:<7} {run.name}: {count} {what}, "
            f"val mAP {_with_chance(run.metrics['val'])}"
            + (f", test mAP {_with_chance(test)}" if test.get("mAP") is not None else "")
            + f" -> {run.path}" + (f" (MLflow run {run_id})" if run_id else " (not in MLflow)"))


def run_cli(args: argparse.Namespace) -> list[rundir.RunDir]:
    sources = [a for a in ("run_dirs", "runs", "select") if getattr(args, a)]
    if len(sources) != 1:
        raise EnsembleError("give exactly one of --run-dirs, --runs or --select (with --experiment)")
    if args.soup_bn_batches < 0:
        raise EnsembleError(f"--soup-bn-batches {args.soup_bn_batches} must be >= 0 (0: keep the averaged statistics)")
    if args.greedy_init < 1 or args.greedy_steps < 0:
        raise EnsembleError(f"--greedy-init {args.greedy_init} must be >= 1 and --greedy-steps "
                            f"{args.greedy_steps} >= 0")
    if args.out is not None:
        check_dir(args.out, "--out", EnsembleError)   # before reading any run
    spec = parse_spec(args.tta) if args.tta is not None else None
    if spec is not None and (args.select or args.weights):
        raise EnsembleError(f"--tta {args.tta!r} takes one run (--run-dirs DIR or --runs RUN_ID) and no "
                            f"--select or --weights: its views are the members")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EnsembleError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.select:
        if not args.experiment:
            raise EnsembleError("--select needs --experiment NAME (the MLflow experiment of the runs)")
        if args.weights or args.name:
            raise EnsembleError("--weights and --name apply to one ensemble; drop them with --select")
        return build_ensembles(args.experiment, args.select, args.tracking_uri, args.parent_run_id,
                               args.out or DEFAULT_OUT, greedy_init=args.greedy_init, greedy_steps=args.greedy_steps,
                               soup_bn_batches=args.soup_bn_batches, device=args.device)
    target = None
    if args.runs:
        client = mq.connect(args.tracking_uri)
        tracked = [mq.get_run(client, r) for r in args.runs]
        members = [member_from_dir(mq.run_dir_of(t), t) for t in tracked]
        target = Target(args.tracking_uri, client.get_experiment(tracked[0].experiment_id).name)
    else:
        members = [member_from_dir(d) for d in args.run_dirs]
        where = {(m.run.tracking or {}).get("tracking_uri"): (m.run.tracking or {}).get("experiment") for m in members}
        if args.experiment:
            target = Target(args.tracking_uri, args.experiment)
        elif len(where) == 1 and None not in where:
            uri, experiment = next(iter(where.items()))
            target = Target(uri, experiment)
    if spec is not None:
        if len(members) != 1:
            raise EnsembleError(f"--tta {args.tta!r} takes one run, got {len(members)}; its views are the members")
        return [build_tta(members[0], spec, name=args.name, out=args.out,
                          target=None if args.no_tracking else target, parent_run_id=args.parent_run_id,
                          device=args.device)]
    check_weights(args.weights, len(members))
    if args.no_tracking:
        target = None
    elif target is None:
        print("not logging to MLflow: the runs name no common experiment (tracking.json); pass "
              "--experiment to log the ensemble", file=sys.stderr)
    name = args.name or "manual-" + digest(json.dumps([str(m.run.path.resolve()) for m in members]
                                                      + list(args.weights or [])))
    return [build_ensemble(members, "manual", name=name, weights=args.weights, out=args.out, target=target,
                           parent_run_id=args.parent_run_id)]


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    mq.fail_fast_http()
    for run in run_cli(args):
        print(_summary(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
