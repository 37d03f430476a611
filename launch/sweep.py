"""`python launch/sweep.py --config FILE [key=value ...] [flags]`: a Ray Tune grid of training runs,
then ensembles and a report, all in MLflow. The command itself: mlic_dist/sweep/__main__.py
(`python launch/sweep.py --help` prints its documentation); this file lets a checkout run it
without installing the package."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mlic_dist

from mlic_dist.sweep.__main__ import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
