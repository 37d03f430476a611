"""CLI: `python -m mlic_dist.train --config FILE key=value ...` (also under `accelerate launch -m`,
`torchrun -m`; the launch commands: mlic_dist/train/loop.py). User errors and damaged shards: one
line, status 2; divergence: one line, status 1 (mlic_dist/cli.py)."""
from __future__ import annotations

import argparse
import sys

import yaml

from ..cli import entry_point
from ..config import Config, load_config, to_dict
from .loop import __doc__ as LOOP_DOC, train


def parse_args(argv=None) -> tuple[Config, bool]:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.train", description=LOOP_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.size=512")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    return load_config(args.config, args.overrides), args.print_config


@entry_point
def main(argv=None) -> int:
    cfg, print_only = parse_args(argv)
    if print_only:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    else:
        train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
