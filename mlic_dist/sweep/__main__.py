"""Run a grid of training runs (sizes x augmentations x backbones x seeds ...) on Ray Tune, each
trial a Ray Train job of `mlic_dist.train.train(cfg)`, then ensembles and a report, all in MLflow.
`python launch/sweep.py` and `python -m mlic_dist.sweep` are the same command.

This machine (starts Ray here; CPU-only works, 1 worker per trial):
    python launch/sweep.py --config configs/sweeps/demo.yaml
    python launch/sweep.py --config configs/sweeps/demo.yaml --dry-run        # the trials, nothing run
One machine with 8 GPUs, 2 GPUs per trial (4 trials at once):
    python launch/sweep.py --config configs/sweeps/voc2007.yaml --workers-per-trial 2 optim.lr_scaling=linear
A cluster (`ray start --head` here, `ray start --address HEAD:6379` on the other nodes):
    mlflow server --backend-store-uri sqlite:////shared/mlflow.db \
        --artifacts-destination /shared/mlartifacts --host 0.0.0.0 --port 5000 &
    python launch/sweep.py --config configs/sweeps/coco2014.yaml --address auto \
        tracking.uri=http://HEAD:5000 data.shards=/shared/shards/coco2014 sweep.root=/shared/runs/sweeps
    On a cluster the shards and sweep.root must be on storage every node mounts at the same
    path (the sweep checks it on every node before it starts), and tracking.uri must be a
    server every node reaches (a local sqlite store is refused).
Continue a sweep that was killed (finished trials are kept, the others resume from their
checkpoints; failed trials are retried):
    python launch/sweep.py --config configs/sweeps/voc2007.yaml --resume

Trials land in SWEEP.root/SWEEP.name/<grid point> (default runs/sweeps/<file stem>/size=448,augment=M2,...).
Network: the Ray this command starts (no --address) listens on 127.0.0.1 only; a cluster from
`ray start` listens on every interface of its nodes (Ray's design), so allow its ports (GCS 6379,
the raylet, object manager and worker ports, dashboard 8265) only from the cluster's own machines
with a firewall.
"""
from __future__ import annotations

import argparse
import sys

from ..cli import entry_point
from .run import run_sweep
from .spec import load_sweep


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python launch/sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="sweep file: a training config plus grid:, ensembles:, sweep:")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the sweep file (data.shards=DIR, "
                   "train.epochs=2, grid.data.size=[384,448], sweep.name=NAME, ensembles=[scale])")
    p.add_argument("--address", help="join a Ray cluster (auto or HOST:PORT); default: start Ray on this machine. "
                   "Shards and sweep.root must then be on storage every node mounts, tracking.uri a server")
    p.add_argument("--workers-per-trial", type=int, help="Ray Train workers (DDP processes) per trial [1]")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker [1 on a GPU cluster, else 0]")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per worker [1]")
    p.add_argument("--max-concurrent", type=int, help="trials at once [GPUs // GPUs per trial; on CPU, cores]")
    p.add_argument("--max-failures", type=int, help="worker-group restarts per trial after a worker dies [2]")
    p.add_argument("--asha", action="store_true", help="stop weak trials early (ASHA on val_mAP)")
    p.add_argument("--resume", action="store_true", help="continue the sweep of the same name after a crash")
    p.add_argument("--dry-run", action="store_true", help="print the trials and their resources, start nothing")
    p.add_argument("--mlflow-port", type=int, default=0, metavar="PORT",
                   help="port of the sweep's own MLflow server on 127.0.0.1 (a local store only) [0: a free one]")
    return p.parse_args(argv)


@entry_point
def main(argv=None) -> int:
    args = parse_args(argv)
    flags = {"workers_per_trial": args.workers_per_trial, "gpus_per_worker": args.gpus_per_worker,
             "cpus_per_worker": args.cpus_per_worker, "max_concurrent": args.max_concurrent,
             "max_failures": args.max_failures, "asha": True if args.asha else None}
    overrides = list(args.overrides) + [f"sweep.{k}={v}" for k, v in flags.items() if v is not None]
    spec = load_sweep(args.config, overrides)
    return run_sweep(spec, address=args.address, resume=args.resume, dry_run=args.dry_run,
                     mlflow_port=args.mlflow_port)


if __name__ == "__main__":
    sys.exit(main())
