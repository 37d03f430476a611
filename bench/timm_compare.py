"""mlic_dist's trainer vs timm's own multi-label training on the same timm backbone and data (issue 23).

    python bench/timm_compare.py                     # resnet10t from scratch, 96 px, 6 epochs, seeds 0 1 (~8 min, 2 cores)
    python bench/timm_compare.py --model test_convnext --epochs 1 --size 32 --scenes 64 32 32 --seeds 0   # seconds

timm 1.0.31 (the PyPI package) has the pieces its `train.py --task multilabel` uses
(`timm.task.MultiLabelClassificationTask`: BCE on dense targets, no smoothing by default;
`MultiLabelClassificationEvaluator`: exact macro AP), but not train.py itself, nor a multi-label
dataset reader. So the comparison is of the training, on the same input pipeline:

  ours  `python -m mlic_dist.train`, model.backbone=timm/MODEL from scratch, Adam, the torch loader
  timm  timm.create_model(MODEL, num_classes=C) + MultiLabelClassificationTask +
        timm.optim.create_optimizer_v2("adam"), fed the batches of the same torch loader (same
        shards, size, augmentation, batch and seed), one process, fp32

Both: the demo's scenes (mlic_dist.demo.scenes, real photos), the same epochs and learning rate,
no schedule. Reported per side: val mAP per epoch, the best one and the test mAP at that epoch
(our metrics.mean_average_precision; timm's evaluator's map on the last val scores beside ours), training
images/s (median over epochs, whole epochs, loading included; every epoch's is kept) and wall
time, each seed and mean / sd over seeds. Results: bench/results/timm-compare-cpu.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sota import build_data  # noqa: E402  (bench/sota.py: scenes + shards, reused when present)
from trainer import machine_info  # noqa: E402


def keys(a, shards: Path, out: Path) -> list[str]:
    return [f"data.shards={shards}", "data.loader=torch", f"data.size={a.size}", "data.augment=M1",
            f"data.batch_size_per_gpu={a.batch}", f"data.num_workers={a.workers}", "data.normalize=imagenet",
            f"model.backbone=timm/{a.model}", "model.pretrained=none", "optim.name=adam", f"optim.lr={a.lr}",
            f"optim.head_lr={a.lr}", "optim.weight_decay=0", "optim.lr_scaling=none", "schedule.name=none",
            f"train.epochs={a.epochs}", "train.mixed_precision=no", "train.early_stopping=0",
            "train.resume=never", f"train.output_dir={out}", "tracking.enabled=false", f"seed={a.seed}"]


def run_ours(a, shards: Path) -> dict:
    out = a.work / "runs" / f"ours-{a.model}-s{a.seed}"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mlic_dist.train", *keys(a, shards, out)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"mlic_dist.train failed:\n{p.stderr[-3000:]}")
    history = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    return {"val_mAP_best": metrics["val"]["mAP"], "best_epoch": metrics.get("best_epoch"),
            "test_mAP_at_best": metrics.get("test", {}).get("mAP"), "val_mAP_last": history[-1]["val_mAP"],
            "val_mAP_by_epoch": [round(h["val_mAP"], 4) for h in history],
            "train_loss_by_epoch": [round(h["train_loss"], 4) for h in history],
            "train_images_per_s_by_epoch": [round(h["images_per_s"], 1) for h in history],
            "train_images_per_s": round(float(np.median([h["images_per_s"] for h in history])), 1),
            "wall_s": round(wall, 1)}


def run_timm(a, shards: Path) -> dict:
    import timm
    from timm.optim import create_optimizer_v2
    from timm.task import MultiLabelClassificationTask

    from mlic_dist.config import load_config
    from mlic_dist.data import build_loader
    from mlic_dist.metrics import mean_average_precision

    cfg = load_config(None, keys(a, shards, a.work / "runs" / "timm-unused"))
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    train = build_loader(cfg.data, "train", train=True, rank=0, world_size=1, device="cpu", seed=a.seed)
    evals = {s: build_loader(cfg.data, s, train=False, rank=0, world_size=1, device="cpu", seed=a.seed)
             for s in ("val", "test")}
    model = timm.create_model(a.model, num_classes=train.num_classes).to(memory_format=torch.channels_last)
    task = MultiLabelClassificationTask(model, verbose=False)
    optimizer = create_optimizer_v2(model, "adam", lr=a.lr, weight_decay=0.0)

    def scores(split):
        model.eval()
        out, tgt = [], []
        with torch.no_grad():
            for b in evals[split]:
                keep = b.ids >= 0
                out.append(model(b.images[keep].contiguous(memory_format=torch.channels_last)))
                tgt.append(b.targets[keep])
        return torch.cat(out), torch.cat(tgt)

    per_epoch, tests, ips, losses, last_val = [], [], [], [], None
    for epoch in range(a.epochs):
        train.set_epoch(epoch)
        model.train()
        n, tot, t = 0, 0.0, time.perf_counter()
        for b in train:
            result = task(b.images.contiguous(memory_format=torch.channels_last), b.targets.float())
            optimizer.zero_grad(set_to_none=True)
            result["loss"].backward()
            optimizer.step()
            n += len(b.ids)
            tot += float(result["loss"].detach()) * len(b.ids)
        ips.append(n / (time.perf_counter() - t))
        losses.append(round(tot / n, 4))
        last_val = scores("val")
        per_epoch.append(mean_average_precision(torch.sigmoid(last_val[0]).numpy(), last_val[1].numpy()))
        test = scores("test")
        tests.append(mean_average_precision(torch.sigmoid(test[0]).numpy(), test[1].numpy()))
    evaluator = task.create_evaluator()
    evaluator.update(*last_val)
    best = int(np.argmax(per_epoch))
    return {"val_mAP_best": per_epoch[best], "best_epoch": best + 1, "test_mAP_at_best": tests[best],
            "val_mAP_last": per_epoch[-1], "val_mAP_last_timm_evaluator": evaluator.compute()["map"] / 100,
            "val_mAP_by_epoch": [round(x, 4) for x in per_epoch], "train_loss_by_epoch": losses,
            "train_images_per_s_by_epoch": [round(x, 1) for x in ips],
            "train_images_per_s": round(float(np.median(ips)), 1), "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet10t", help="a timm architecture (default resnet10t)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=2, help="torch loader workers (both sides)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads on the timm side")
    p.add_argument("--scenes", type=int, nargs=3, default=(800, 200, 200), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--work", type=Path, default=Path("/tmp/mlic_timm_compare"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "timm-compare-cpu.json")
    a = p.parse_args(argv)
    import timm

    shards = build_data(a.work, *a.scenes)
    load = os.getloadavg()[0]
    ours, theirs = [], []
    for seed in a.seeds:
        a.seed = seed
        ours.append({"seed": seed, **run_ours(a, shards)})
        theirs.append({"seed": seed, **run_timm(a, shards)})

    def stats(runs, key):
        v = [r[key] for r in runs]
        return {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else None}

    keys_ = ("val_mAP_best", "test_mAP_at_best", "val_mAP_last", "train_images_per_s")
    summary = {side: {k: stats(runs, k) for k in keys_} for side, runs in (("ours", ours), ("timm_task", theirs))}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "seed"}
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(), "load_at_start": round(load, 2), "timm": timm.__version__,
              "torch": torch.__version__, "settings": settings,
              "data": f"mlic_dist.demo.scenes {list(a.scenes)}", "summary": summary,
              "ours": ours, "timm_task": theirs}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    return record


if __name__ == "__main__":
    main()
