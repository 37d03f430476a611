"""Predict the labels of new images with a trained run or an ensemble.

CPU:     python -m mlic_dist.predict --run-dir runs/NAME photos/ extra.png [--format jsonl|csv] \\
             [--out preds.jsonl] [--batch-size 32] [--top-k 3]
one GPU: python -m mlic_dist.predict --run-dir runs/NAME photos/ --device cuda
MLflow:  python -m mlic_dist.predict --run RUN_ID [--tracking-uri URI] photos/
TTA:     python -m mlic_dist.predict --run-dir runs/NAME --tta sizes=384,448,512,flip photos/

INPUT: image files or directories (searched recursively for image suffixes, sorted). Each image
is converted as the shard command converts (EXIF rotation, transparency, grayscale / CMYK /
palette -> RGB) and goes through the run's own evaluation transform (data/transforms.py: squash
to data.size, bilinear, antialias; data.normalize) into its best_model.pt (weights_only load).
An ensemble directory predicts with each member (at the member's own size) and fuses the
probabilities with the ensemble's weights, exactly as `mlic_dist.ensemble` fused them.
--tta SPEC (mlic_dist/ensemble/tta.py: `flip`, `sizes=384,448,512`, `sizes=384,448,512,flip`)
predicts each view of the run (of each member, for an ensemble: a member's views share its
weight) and fuses their probabilities by the mean; a TTA directory (`mlic_dist.ensemble
--run-dirs RUN --tta SPEC`) predicts with its views the same way (a view resizes as evaluation
does, then mirrors the resized image when it flips).

Output (stdout, or --out FILE), one record per image in input order:
  jsonl: {"file", "labels": [names with score >= the run's tuned per-class threshold],
          "top_k": [[name, score], ...], "scores": {name: probability}}
         {"file", "error": "why it could not be read"}
  csv:   file, labels (;-separated), top_k, error, then one probability column per class
Exit status 0; 1 when some image could not be read (its record says why, the rest are
predicted); 2 for a user error (no such run, no images, an --out that cannot be written:
checked before any image is read), with one line on stderr.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from . import rundir
from .atomic import check_file, replace_with
from .cli import entry_point
from .data.normalize import Normalizer
from .data.transforms import eval_resize, load_rgb
from .ensemble.members import EnsembleError, fuse
from .ensemble.tta import TTASpec, ViewSpecError, check_sizes, parse_spec, view_from_dict
from .errors import UserError
from .models import create_model
from .tracking import query as mq

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}


class PredictError(UserError, ValueError):
    """A user error: the run cannot predict, or the inputs name no image."""


@dataclass
class MemberModel:
    model: torch.nn.Module
    size: int
    normalizer: object            # data.normalize.Normalizer of the member's data.normalize
    weight: float
    name: str
    flip: bool = False            # a TTA view: mirrored left-right after the resize


def load_member(path: Path, device: torch.device, weight: float = 1.0) -> tuple[MemberModel, list[str]]:
    """A training run's best weights in its registry model, ready for eval; and its classes."""
    run = rundir.load_run(path, splits=())
    weights = run.path / rundir.BEST_MODEL
    if not weights.is_file():
        raise PredictError(f"{run.path} has no {rundir.BEST_MODEL}: it is not a finished training run")
    cfg = run.cfg()
    model = create_model(cfg.model.backbone, len(run.classes), pretrained="none", dropout=cfg.model.dropout,
                         image_size=cfg.data.size)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, EOFError) as e:   # a truncated file, another model's weights
        raise PredictError(f"{weights} cannot be loaded into {cfg.model.backbone} with "
                           f"{len(run.classes)} classes: {str(e).splitlines()[0][:200]}") from None
    # NHWC like the Normalizer's output (and the trainer's model.channels_last): measured 3x
    # faster than NCHW for resnet50 on this project's CPU, where the formats would mix otherwise
    model = model.eval().to(device, memory_format=torch.channels_last)
    return MemberModel(model, cfg.data.size, Normalizer(cfg.data.normalize, device), weight, run.name), run.classes


def parse_tta(spec) -> Optional[TTASpec]:
    """--tta's text (or a TTASpec, or None) -> TTASpec; a bad spec is a PredictError."""
    if spec is None or isinstance(spec, TTASpec):
        return spec
    try:
        return parse_spec(spec)
    except ViewSpecError as e:
        raise PredictError(str(e)) from None


class Predictor:
    """Probabilities (B, C) of a run (one member), an ensemble (its weighted members) or a TTA
    directory (its views); `tta` (a spec, mlic_dist/ensemble/tta.py) adds views to each member."""

    def __init__(self, path: Path, device: str = "cpu", tta=None):
        self.device = torch.device(device)
        tta = parse_tta(tta)
        run = rundir.load_run(path, splits=())
        self.classes = run.classes
        if run.thresholds is None:
            raise PredictError(f"{run.path} has no {rundir.THRESHOLDS}; it is not a finished run")
        self.thresholds = run.thresholds                      # (C,) tuned on validation
        if run.is_ensemble:
            entries = run.ensemble.get("members", [])
            if not entries:
                raise PredictError(f"{run.path / rundir.ENSEMBLE} lists no members")
            if tta is not None and run.ensemble.get("kind") == "tta":
                raise PredictError(f"{run.path} is already a TTA ensemble (its members are views); drop --tta, "
                                   f"or give --tta with the run {entries[0]['run_dir']}")
            try:
                specs = [(Path(m["run_dir"]), float(m["weight"]),
                          view_from_dict(m["view"], str(run.path / rundir.ENSEMBLE)) if "view" in m else None)
                         for m in entries]
            except EnsembleError as e:
                raise PredictError(str(e)) from None
        else:
            specs = [(run.path, 1.0, None)]
        self.members = []
        loaded: dict = {}    # run directory -> (MemberModel, classes): a run's views share one network
        for member_dir, weight, view in specs:
            key = str(member_dir.resolve())
            if key not in loaded:
                loaded[key] = load_member(member_dir, self.device, weight)
            member, classes = loaded[key]
            if classes != self.classes:
                raise PredictError(f"member {member_dir} has classes {classes}, the ensemble {run.path} "
                                   f"has {self.classes}; rebuild the ensemble")
            if tta is not None:
                views = tta.views(member.size)
            else:
                views = [view] if view is not None else [None]
            for v in views:
                self.members.append(replace(member, weight=weight) if v is None else
                                    replace(member, size=v.size, flip=v.flip, weight=weight))
        for key, (member, _) in loaded.items():   # a fixed-size model (timm ViT) asked for other sizes
            check_sizes(member.model, member.name, member.size,
                        [m.size for m in self.members if m.model is member.model], PredictError)

    @torch.no_grad()
    def __call__(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """images: B uint8 (3, H, W) RGB -> (B, C) float32 fused probabilities."""
        probs = []
        resized: dict = {}   # size -> (B, 3, S, S) uint8: views of one size resize once
        for m in self.members:
            if m.size not in resized:
                resized[m.size] = torch.stack([eval_resize(img, m.size) for img in images])
            batch = resized[m.size].flip(3) if m.flip else resized[m.size]            # (B, 3, S, S) uint8
            logits = m.model(m.normalizer(batch)).float()                             # (B, C)
            probs.append(torch.sigmoid(logits).cpu().numpy())
        return fuse(probs, [m.weight for m in self.members])


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given (any suffix: a broken one gets an error record), directories recursively
    (image suffixes only, sorted)."""
    found = []
    for p in map(Path, inputs):
        if p.is_dir():
            found += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise PredictError(f"input {p} does not exist; give image files or directories")
    if not found:
        raise PredictError(f"no image found in {[str(p) for p in inputs]} (suffixes: {sorted(IMAGE_SUFFIXES)})")
    return found


def _read(path: Path):
    """(3, H, W) uint8, or the error text."""
    try:
        return load_rgb(path.read_bytes())
    except (OSError, ValueError) as e:
        return f"{path}: {e}"


def predict_files(predictor: Predictor, files: Sequence[Path], batch_size: int = 32, top_k: int = 3,
                  workers: int = 2) -> Iterable[dict]:
    """One record per file, in order. `workers` threads decode up to two batches ahead of the
    model (bounded: a million files never sit in memory at once)."""
    k = min(top_k, len(predictor.classes))
    todo = iter(files)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mlic-predict") as pool:
        pending: deque = deque()

        def fill():
            while len(pending) < 2 * batch_size:
                f = next(todo, None)
                if f is None:
                    return
                pending.append((f, pool.submit(_read, f)))

        fill()
        while pending:
            chunk = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
            fill()
            chunk = [(f, fut.result()) for f, fut in chunk]
            good = [i for i, (_, img) in enumerate(chunk) if not isinstance(img, str)]
            probs = predictor([chunk[i][1] for i in good]) if good else None      # (B_good, C)
            row = {i: r for r, i in enumerate(good)}
            for i, (f, img) in enumerate(chunk):
                if isinstance(img, str):
                    yield {"file": str(f), "error": img}
                    continue
                p = probs[row[i]]                                                     # (C,)
                order = np.argsort(-p, kind="stable")[:k]
                yield {"file": str(f),
                       "labels": [c for c, v, t in zip(predictor.classes, p, predictor.thresholds) if v >= t],
                       "top_k": [[predictor.classes[j], round(float(p[j]), 6)] for j in order],
                       "scores": {c: round(float(v), 6) for c, v in zip(predictor.classes, p)}}


def write_records(records: Iterable[dict], classes: list[str], fmt: str, out) -> tuple[int, int]:
    """Streams records as jsonl or csv to the text file `out`; returns (images, errors)."""
    n = errors = 0
    writer = None
    if fmt == "csv":
        writer = csv.writer(out)
        writer.writerow(["file", "labels", "top_k", "error", *classes])
    for r in records:
        n += 1
        errors += "error" in r
        if writer is None:
            out.write(json.dumps(r) + "\n")
        elif "error" in r:
            writer.writerow([r["file"], "", "", r["error"], *[""] * len(classes)])
        else:
            writer.writerow([r["file"], ";".join(r["labels"]), ";".join(f"{c}:{v:.4f}" for c, v in r["top_k"]),
                             "", *[r["scores"][c] for c in classes]])
    return n, errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mq.add_run_arguments(p)
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="image files or directories")
    p.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    p.add_argument("--out", type=Path, help="output file (default stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=2, help="image decoding threads")
    p.add_argument("--tta", metavar="SPEC", help="test-time augmentation views, fused by the mean: flip, "
                                                 "sizes=384,448,512 or sizes=384,448,512,flip")
    return p


@entry_point
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    mq.fail_fast_http()
    if args.batch_size < 1 or args.top_k < 1 or args.workers < 1:
        raise PredictError(f"--batch-size {args.batch_size}, --top-k {args.top_k} and --workers "
                           f"{args.workers} must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PredictError("--device cuda: no CUDA device is visible; use --device cpu")
    tta = parse_tta(args.tta)
    if args.out is not None:   # before any image is predicted
        check_file(args.out, "--out", PredictError, example=f"preds.{args.format}")
    files = find_images(args.inputs)
    predictor = Predictor(mq.resolve_run_dir(args.run_dir, args.run, args.tracking_uri), args.device, tta)
    start = time.perf_counter()
    records = predict_files(predictor, files, args.batch_size, args.top_k, args.workers)
    if args.out is None:
        n, errors = write_records(records, predictor.classes, args.format, sys.stdout)
    else:
        with replace_with(args.out) as tmp, open(tmp, "w", newline="") as f:   # interrupted: no partial file
            n, errors = write_records(records, predictor.classes, args.format, f)
    seconds = time.perf_counter() - start
    print(f"{n - errors} of {n} images predicted in {seconds:.2f} s ({(n - errors) / max(seconds, 1e-9):.1f} "
          f"images/s, {len(predictor.members)} forward pass(es) per image, {args.device})"
          + (f"; {errors} could not be read (see their error records)" if errors else ""), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
