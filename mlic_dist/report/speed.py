"""Images per second of `predict` for a run, soup, student, ensemble or TTA directory, measured on
this machine: the report's inference-cost column.

What is timed is what `python -m mlic_dist.predict` does per image after reading the file: decode
(data.transforms.load_rgb), each member's (or view's) resize and normalisation, its network in
fp32, the fusion (predict.Predictor on batches of `batch_size`). The images are the first
`num_images` JPEGs of the run's validation shards (the split every choice is made on, so no test
image is touched). One warm-up batch is not timed; decoding runs on the calling thread, so the
figure is the per-process cost, comparable between rows of one report on one machine.
"""
from __future__ import annotations

import tarfile
import time
from pathlib import Path

import torch

from .. import rundir
from ..data.manifest import read_manifest
from ..data.transforms import load_rgb
from ..predict import Predictor


def _shards_of(run: rundir.RunDir) -> tuple[Path, str]:
    """The shards and validation split a directory's model was trained on (an ensemble's: its
    first member's; every member reads the same keys)."""
    source = run
    if run.is_ensemble:
        source = rundir.load_run(run.ensemble["members"][0]["run_dir"], splits=())
    cfg = source.cfg()
    return Path(cfg.data.shards), cfg.data.val_split


def validation_jpegs(run_dir: Path, num_images: int) -> list[bytes]:
    shards, split = _shards_of(rundir.load_run(run_dir, splits=()))
    out: list[bytes] = []
    for shard in read_manifest(shards).split(split).shards:
        with tarfile.open(shard.path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    out.append(tar.extractfile(member).read())
                    if len(out) >= num_images:
                        return out
    return out


def predict_images_per_s(run_dir: Path, num_images: int = 64, batch_size: int = 32, device: str = "cpu") -> float:
    """Images/s of predict's decode + models + fusion on `num_images` validation images."""
    predictor = Predictor(Path(run_dir), device)
    data = validation_jpegs(Path(run_dir), num_images + batch_size)
    if len(data) < 2:
        raise ValueError(f"{run_dir}: its validation shards hold {len(data)} image(s); timing predict needs 2")
    warm_n = min(batch_size, len(data) // 2)       # a small split: half warms up, half is timed
    warm, timed = data[:warm_n], data[warm_n:]
    with torch.inference_mode():
        predictor([load_rgb(b) for b in warm])
        start = time.perf_counter()
        for i in range(0, len(timed), batch_size):
            predictor([load_rgb(b) for b in timed[i:i + batch_size]])
        seconds = time.perf_counter() - start
    return len(timed) / seconds
