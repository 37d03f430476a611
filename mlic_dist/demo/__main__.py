"""CLI: `python -m mlic_dist.demo` (`make demo`; what it does: mlic_dist/demo/run.py)."""
from __future__ import annotations

import argparse
import subprocess
import sys

from ..cli import entry_point
from ..errors import UserError
from .run import __doc__ as DOC, prepare_data, run_demo_sweep, run_single


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.demo", description=DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/scenes", help="where the scene images are built [data/scenes]")
    p.add_argument("--shards", default="data/shards/scenes", help="where the shards are written [data/shards/scenes]")
    p.add_argument("--config", help="the sweep file [configs/sweeps/demo.yaml]; with --single, a training "
                   "config [configs/demo/scenes.yaml]")
    p.add_argument("--name", help="the sweep's name [demo, or demo-N when that one exists; with --resume the "
                   "newest demo]")
    p.add_argument("--resume", action="store_true", help="continue the named (or newest) demo sweep")
    p.add_argument("--single", action="store_true", help="train one MobileNetV2 run instead of the sweep")
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("overrides", nargs="*", help="sweep-file overrides (train.epochs=2, grid.data.size=[96], "
                   "sweep.max_concurrent=1); with --single, training-config overrides")
    return p



@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        shards = prepare_data(args.root, args.shards, args.n_train, args.n_val, args.n_test)
    except subprocess.CalledProcessError as e:
        raise UserError(f"sharding the scenes failed (exit {e.returncode}); its message is above") from None
    return run_single(args, shards) if args.single else run_demo_sweep(args, shards)


if __name__ == "__main__":
    sys.exit(main())
