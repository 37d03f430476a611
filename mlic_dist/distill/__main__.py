"""CLI: `python -m mlic_dist.distill --teacher RUN_OR_ENSEMBLE_DIR --config FILE [key=value ...]`.

CPU, one process:  python -m mlic_dist.distill --teacher runs/ensembles/NAME --config FILE train.output_dir=runs/student
one GPU:           accelerate launch -m mlic_dist.distill --teacher runs/ensembles/NAME --config FILE ...
many:              torchrun --nproc_per_node 8 -m mlic_dist.distill --teacher ... --config ...
                   (accelerate launch --multi_gpu --num_processes 8 -m mlic_dist.distill ... alike)

The teacher's probabilities on the un-augmented training images are computed once (each member
at its own size, split across the processes), cached in train.output_dir/teacher/, and the
student trains with `mlic_dist.train`'s trainer on (1 - distill.alpha) x labels + distill.alpha x
teacher (docs/ensembles.md, "Distillation"). The config and overrides are a training run's;
the student is an ordinary run directory. User errors: one line, status 2 (mlic_dist/cli.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import entry_point
from ..config import load_config
from .teacher import distill


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", type=Path, required=True,
                   help="a finished run directory (best_model.pt) or an ensemble directory (ensemble.json)")
    p.add_argument("--config", help="the student's training config (YAML, see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. distill.alpha=0.7")
    return p


@entry_point
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    distill(args.teacher, load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
