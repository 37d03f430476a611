"""Prediction throughput: `mlic_dist.predict` (decode threads + batched model) on real-photo JPEGs.

    python bench/predict.py                                          # CPU: tiny_cnn 32 px, resnet50 224 px
    python bench/predict.py --out bench/results/predict-cpu.json
    python bench/predict.py --models resnet101:448 --device cuda     # one GPU

Each model gets a run directory like a trainer's (config.yaml, classes.json, thresholds.json,
best_model.pt with random weights: speed does not depend on their values) and predicts 500x375
photos (bench/photos.py) through `predict_files`, the CLI's loop: decode on `--workers` threads
two batches ahead, the shared eval transform, the model, thresholds, top-k. A warm-up batch is
left out of the timing. CPU seconds (all threads) are recorded beside the wall time: on a
shared, loaded machine images per CPU second is the figure that carries over.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402

from mlic_dist import rundir  # noqa: E402
from mlic_dist.config import load_config, to_dict  # noqa: E402
from mlic_dist.models import create_model  # noqa: E402
from mlic_dist.predict import Predictor, predict_files  # noqa: E402
from photos import make_photo_jpegs  # noqa: E402
from trainer import machine_info, now_iso  # noqa: E402


def fake_run(out: Path, backbone: str, size: int, num_classes: int = 80) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    classes = [f"class_{i}" for i in range(num_classes)]
    cfg = load_config(None, [f"model.backbone={backbone}", f"data.size={size}", "model.pretrained=none"])
    rundir.write_config(out, to_dict(cfg))
    rundir.write_classes(out, classes)
    rundir.write_thresholds(out, [0.5] * num_classes, classes)
    torch.save(create_model(backbone, num_classes).state_dict(), out / rundir.BEST_MODEL)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["tiny_cnn:32", "resnet50:224"], help="BACKBONE:SIZE")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / ".cache" / "predict")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    machine = machine_info()
    photos = sorted(make_photo_jpegs(args.cache / "photos", args.images))
    results = []
    for spec in args.models:
        backbone, size = spec.split(":")
        run = fake_run(args.cache / f"run-{backbone}-{size}", backbone, int(size))
        predictor = Predictor(run, args.device)
        list(predict_files(predictor, photos[:args.batch_size], args.batch_size, workers=args.workers))  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        n = sum(1 for r in predict_files(predictor, photos, args.batch_size, workers=args.workers) if "error" not in r)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        results.append({"model": backbone, "size": int(size), "images": n, "seconds": round(seconds, 2),
                        "images_per_s": round(n / seconds, 1), "cpu_seconds": round(cpu, 2),
                        "images_per_cpu_s": round(n / cpu, 1)})
        print(json.dumps(results[-1]), flush=True)
    result = {"benchmark": "predict_throughput", "date": now_iso(), "machine": machine,
              "loadavg_after": [round(x, 2) for x in os.getloadavg()],
              "settings": {"batch_size": args.batch_size, "workers": args.workers, "device": args.device,
                           "photo_size": [500, 375], "classes": 80},
              "results": results}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
