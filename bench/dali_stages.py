"""Where DALI's CPU time goes: throughput of the DALI CPU pipeline cut after each stage.

    python bench/dali_stages.py [--shards bench/.cache/loader-shards] [--size 448] [--record]

Stages (train, M2): `decode` = webdataset reader + `decoders.image_random_crop` (+ pad);
`resize_u8` = + DALI `fn.resize` linear to S x S; `normalize_f32` / `normalize_f16` = +
`crop_mirror_normalize` (mirror, HWC). The first is the ceiling of any DALI CPU loader on this
machine: mlic_dist's loader decodes in DALI and resizes/normalises in torch (faster than DALI's
CPU resize), so it can at best approach `decode`. Build the shards with `python bench/loader.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path

STAGES = ("decode", "resize_u8", "normalize_f32", "normalize_f16")


def run_stage(stage: str, tars, idx, size: int, threads: int, batch: int, epochs: int = 2) -> dict:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=None, seed=1, prefetch_queue_depth=2)
    def pipe_def():
        jpegs, lbl = fn.readers.webdataset(paths=tars, index_paths=idx, ext=["jpg", "lbl"],
                                           dtypes=[types.UINT8, types.INT8], name="R",
                                           random_shuffle=True, initial_fill=512)
        im = fn.decoders.image_random_crop(jpegs, device="cpu", output_type=types.RGB,
                                           random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4 / 3])
        if stage == "decode":
            return fn.pad(im, axes=[0, 1]), lbl
        im = fn.resize(im, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=False)
        if stage == "resize_u8":
            return im, lbl
        dtype = types.FLOAT16 if stage == "normalize_f16" else types.FLOAT
        return fn.crop_mirror_normalize(im, dtype=dtype, output_layout="HWC", mean=[123.7, 116.3, 103.5],
                                        std=[58.4, 57.1, 57.4], mirror=fn.random.coin_flip()), lbl

    pipe = pipe_def()
    pipe.build()
    it = DALIGenericIterator([pipe], ["x", "y"], reader_name="R", auto_reset=True)
    n, t0, c0 = 0, None, None
    for _ in range(epochs):
        for b in it:
            if t0 is None:  # the first batch pays start-up: not timed
                t0, c0 = time.perf_counter(), time.process_time()
                continue
            n += b[0]["x"].shape[0]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1), "images": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="bench/.cache/loader-shards")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--record", action="store_true", help="write bench/results/dali-stages-cpu.json")
    args = p.parse_args()
    root = Path(args.shards)
    manifest = json.loads((root / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    tars = [str(root / s["file"]) for s in shards]
    idx = [str(root / s["index"]) for s in shards]
    result = {"machine": {"platform": platform.platform(), "cores": os.cpu_count(),
                          "loadavg": os.getloadavg()},
              "date": datetime.now().isoformat(timespec="seconds"),
              "settings": {"size": args.size, "batch": args.batch, "threads": args.threads, "augment": "M2"},
              "stages": {s: run_stage(s, tars, idx, args.size, args.threads, args.batch) for s in STAGES}}
    print(json.dumps(result, indent=1))
    if args.record:
        Path("bench/results/dali-stages-cpu.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
