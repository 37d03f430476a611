"""Benchmark `mlic_dist.shard` throughput (images/s) with 1 and 2 workers, with and without
re-encoding, on 500 distinct real-photo 500x375 JPEGs (bench/photos.py).

    python bench/shard.py                          # prints JSON, writes bench/results/shard-cpu.json
    python bench/shard.py --n 2000 --workers 1 2 4 --out /tmp/r.json

CPU only (sharding never uses a GPU). Each configuration runs `--repeats` times in fresh output
dirs; "images_per_s" is the best of the writer's own rate (images / seconds of the encode+write
loop, incl. process-pool start-up (~1 s for spawn on 2 cores: it dominates at 500 images), wds2idx
and sha256); "end_to_end_images_per_s" is the best over the whole `shard()` call (CSV reading,
stratified val carve, manifest).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import numpy as np  # noqa: E402

from mlic_dist.shard import shard  # noqa: E402
from photos import make_photo_jpegs  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500, help="number of images")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-side", type=int, default=448, help="the re-encoding configuration")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (best kept)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "shard-cpu.json"))
    a = p.parse_args()

    load_start = os.getloadavg()  # other jobs on the box skew the numbers: record it
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        paths = make_photo_jpegs(tmp / "photos", a.n, size=(500, 375), seed=0)
        make_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        classes = [f"class{i}" for i in range(20)]
        with open(tmp / "labels.csv", "w") as f:
            f.write("image,labels\n")
            for pth in paths:
                k = rng.integers(1, 4)
                names = rng.choice(classes, size=k, replace=False)
                f.write(f"photos/{pth.name},{'|'.join(names)}\n")
        runs = []
        for max_side in (0, a.max_side):
            for workers in a.workers:
                rates, walls = [], []
                for rep in range(a.repeats):
                    out = tmp / f"out-{max_side}-{workers}-{rep}"
                    t = time.perf_counter()
                    m = shard("csv", tmp / "labels.csv", out, images=tmp, workers=workers,
                              max_side=max_side, progress=False, verbose=False)
                    walls.append(time.perf_counter() - t)
                    rates.append(m["stats"]["images_per_s"])
                runs.append({
                    "workers": workers,
                    "max_side": max_side,
                    "re_encoded": m["converted"]["count"],
                    "images": m["stats"]["images"],
                    "images_per_s": max(rates),
                    "images_per_s_all": rates,
                    "end_to_end_images_per_s": round(m["stats"]["images"] / min(walls), 1),
                    "output_mb": round(m["stats"]["bytes"] / 1e6, 1),
                })
                print(f"workers={workers} max_side={max_side}: {rates} images/s", file=sys.stderr)
    result = {
        "benchmark": "mlic_dist.shard csv -> webdataset tars + wds2idx",
        "dataset": f"{a.n} distinct real-photo JPEGs 500x375 q90 (bench/photos.py), "
                   "20 classes, 1-3 labels each",
        "photo_generation_s": round(make_s, 2),
        "runs": runs,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(),
                    "loadavg_1_5_15min_start": [round(x, 2) for x in load_start],
                    "loadavg_1_5_15min_end": [round(x, 2) for x in os.getloadavg()],
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds")},
    }
    text = json.dumps(result, indent=2)
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
