"""Benchmark the training loaders (images/s) against the seed repo's PIL pipeline.

    python bench/loader.py                                   # builds bench/.cache shards, all loaders
    python bench/loader.py --shards DIR --split train --size 448 --augment M2 --loader dali --batches 60
    python bench/loader.py --record                          # also writes bench/results/loader-cpu.json

Loaders: `dali` / `torch` = mlic_dist.data.build_loader (Batch on the device: float32, normalised,
channels_last; with no GPU, device=cpu), `baseline` = the seed repo's pipeline on the same
images: PIL open, Resize((S, S)), RandomHorizontalFlip, ToTensor, Normalize, a DataLoader with one
worker per core (JPEG bytes read from the shards into memory first). Also printed: the
single-process PIL decode rate of those images (`Image.open(...).convert("RGB")`), the floor per
core; x cores = the machine's decode floor.

Timing: the first `--warmup` batches are skipped (start-up), then `--batches` batches are timed,
crossing epoch boundaries (set_epoch, pipeline rebuild / worker start) as training would.
Without --shards: 1,200 real-photo 500x375 JPEGs (bench/photos.py) sharded with
`python -m mlic_dist.shard csv` into bench/.cache/loader-shards (reused).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_shards(cache: Path, n: int) -> Path:
    out = cache / "loader-shards"
    if (out / "manifest.json").is_file():
        return out
    from photos import make_photo_jpegs

    photos = cache / "loader-photos"
    paths = make_photo_jpegs(photos, n)
    rng = np.random.default_rng(0)
    with open(photos / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "c0", "c1", "c2", "c3", "split"])
        for i, p in enumerate(paths):
            lab = (rng.random(4) < 0.4).astype(int)
            lab[i % 4] = 1
            w.writerow([p.name, *lab.tolist(), "val" if i % 20 == 0 else "train"])
    subprocess.run([sys.executable, "-m", "mlic_dist.shard", "csv", str(photos / "labels.csv"),
                    "--images", str(photos), "--out", str(out), "--samples-per-shard", "200",
                    "--no-progress"], check=True, cwd=ROOT)
    return out


def read_jpegs(shards: Path, split: str) -> list[bytes]:
    from mlic_dist.data import read_manifest

    blobs = []
    for s in read_manifest(shards).split(split).shards:
        with tarfile.open(s.path) as tar:
            blobs += [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    return blobs


def pil_decode_rate(blobs: list[bytes], n: int = 600) -> tuple[float, float]:
    """(images per wall second, per CPU second) of single-process PIL decoding."""
    from PIL import Image

    sample = (blobs * (1 + n // len(blobs)))[:n]
    for b in sample[:20]:
        Image.open(io.BytesIO(b)).convert("RGB")
    t0, c0 = time.perf_counter(), time.process_time()
    for b in sample:
        Image.open(io.BytesIO(b)).convert("RGB")
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


class _SeedDataset(torch.utils.data.Dataset):
    def __init__(self, blobs, size):
        from torchvision import transforms as T

        self.blobs = blobs
        self.tf = T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.ToTensor(),
                             T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        from PIL import Image

        return self.tf(Image.open(io.BytesIO(self.blobs[i])).convert("RGB")), torch.zeros(4)


def _cpu_seconds() -> float:
    """user+sys CPU of this process and its live children (DataLoader workers)."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total + sum(os.times()[2:4])   # + reaped children (workers of finished epochs)


def _time(make_epoch, batch_size: int, batches: int, warmup: int) -> dict:
    seen, t0, c0, t_first, start = 0, None, None, None, time.perf_counter()
    epoch = 0
    while True:
        for b in make_epoch(epoch):
            if t_first is None:
                t_first = time.perf_counter() - start
            seen += 1
            if seen == warmup:
                t0, c0 = time.perf_counter(), _cpu_seconds()
            if seen == warmup + batches:
                dt, dc = time.perf_counter() - t0, _cpu_seconds() - c0
                n = batches * batch_size
                return {"images_per_s": round(n / dt, 1), "images_per_cpu_s": round(n / dc, 1),
                        "first_batch_s": round(t_first, 2), "timed_batches": batches}
        epoch += 1


def bench_baseline(blobs, size, batch_size, batches, warmup, workers) -> dict:
    ds = _SeedDataset(blobs, size)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                     drop_last=True)
    return _time(lambda e: (x for x, _ in dl), batch_size, batches, warmup)


def bench_loader(kind, shards, split, size, augment, batch_size, batches, warmup, workers) -> dict:
    from mlic_dist.config import DataConfig
    from mlic_dist.data import build_loader

    cfg = DataConfig(shards=str(shards), size=size, augment=augment, loader=kind,
                     batch_size_per_gpu=batch_size, num_workers=workers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loader = build_loader(cfg, split, train=True, rank=0, world_size=1, device=device, seed=0)

    def epoch(e):
        loader.set_epoch(e)
        for b in loader:
            if device == "cuda":
                torch.cuda.synchronize()
            yield b

    r = _time(epoch, batch_size, batches, warmup)
    r["device"] = device
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="a mlic_dist.shard directory (default: build bench/.cache)")
    p.add_argument("--split", default="train")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--augment", default="M2")
    p.add_argument("--loader", nargs="+", default=["dali", "torch", "baseline"],
                   choices=["dali", "torch", "baseline"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=60, help="timed batches per loader")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=0, help="threads/workers; 0 = one per core")
    p.add_argument("--n", type=int, default=1200, help="photos to build when --shards is omitted")
    p.add_argument("--repeats", type=int, default=2,
                   help="rounds over the loaders (interleaved, so a noisy neighbour hits all alike); best kept")
    p.add_argument("--record", action="store_true", help="write bench/results/loader-cpu.json")
    a = p.parse_args()

    shards = Path(a.shards) if a.shards else build_shards(ROOT / "bench" / ".cache", a.n)
    blobs = read_jpegs(shards, a.split)
    cores = len(os.sched_getaffinity(0))
    workers = a.workers or cores
    res = {"machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                       "cores": cores, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                       "torch": torch.__version__},
           "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "config": {"shards": str(shards), "split": a.split, "images": len(blobs), "size": a.size,
                      "augment": a.augment, "batch_size": a.batch_size, "workers": workers,
                      "batches": a.batches},
           }
    wall, cpu = pil_decode_rate(blobs)
    res["pil_decode_per_core"], res["pil_decode_per_cpu_s"] = round(wall, 1), round(cpu, 1)
    res["load_avg_before"] = [round(x, 2) for x in os.getloadavg()]
    runs: dict = {k: [] for k in a.loader}
    for _ in range(a.repeats):
        for kind in a.loader:
            if kind == "baseline":
                r = bench_baseline(blobs, a.size, a.batch_size, a.batches, a.warmup, workers)
            else:
                r = bench_loader(kind, shards, a.split, a.size, a.augment, a.batch_size, a.batches,
                                 a.warmup, a.workers)
            print(kind, r, file=sys.stderr, flush=True)
            runs[kind].append(r)
    for kind, rs in runs.items():
        res[kind] = dict(max(rs, key=lambda r: r["images_per_s"]),
                         all_runs=[r["images_per_s"] for r in rs])
    wall, cpu = pil_decode_rate(blobs)
    res["pil_decode_per_core_after"] = round(wall, 1)
    res["pil_decode_per_cpu_s"] = round(max(cpu, res["pil_decode_per_cpu_s"]), 1)
    res["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    # the floor: the better single-process PIL rate x cores (generous to the target)
    res["pil_decode_floor"] = round(max(res["pil_decode_per_core"], res["pil_decode_per_core_after"]) * cores, 1)
    if "baseline" in res:
        for kind in ("dali", "torch"):
            if kind in res:
                res[kind]["x_baseline"] = round(res[kind]["images_per_s"] / res["baseline"]["images_per_s"], 2)
                res[kind]["of_floor"] = round(res[kind]["images_per_s"] / res["pil_decode_floor"], 3)
                # CPU-time view: robust when other jobs share the cores
                res[kind]["cpu_x_baseline"] = round(res[kind]["images_per_cpu_s"] / res["baseline"]["images_per_cpu_s"], 2)
                res[kind]["cpu_of_pil_decode"] = round(res[kind]["images_per_cpu_s"] / res["pil_decode_per_cpu_s"], 3)
    print(json.dumps(res, indent=1))
    if a.record:
        out = ROOT / "bench" / "results" / "loader-cpu.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
