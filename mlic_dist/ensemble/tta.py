"""Test-time augmentation: one run seen through several views (input size, horizontal flip),
fused like ScaleEn (the mean of the views' probabilities) at the cost of one forward pass per view.

    python -m mlic_dist.ensemble --run-dirs runs/NAME --tta sizes=384,448,512,flip [--name NAME] \\
        [--out DIR] [--experiment NAME] [--tracking-uri URI] [--no-tracking] [--device cpu|cuda]
    python -m mlic_dist.predict --run-dir runs/NAME --tta flip photos/        # the same views, live
    python -m mlic_dist.export --run-dir runs/NAME --tta flip --format onnx --out model.onnx

THE SPEC (one grammar for ensemble, predict and export): comma-separated items, each `flip`, a
size in px (>= 16), or `sizes=S` (the same, for readability: `sizes=384,448,512,flip`). The
views are every listed size (none listed: the run's own data.size), each as given and, with
`flip`, mirrored left-right: `flip` = 2 views, `sizes=384,448,512` = 3, `sizes=384,448,512,flip` = 6.
A view resizes exactly as evaluation does (data/transforms.eval_resize, squash to S x S) and then
mirrors the resized image (width axis), so the loaders' scoring here, predict and the exported
graph compute the same thing.

`build_tta` scores the run's best_model.pt on its shards' val and test splits once per view with
the trainer's scoring (train/scoring.predict_split, float32, every sample once, in id order;
the loader of the run's config at the view's size, the batch flipped), and writes an ordinary
ensemble directory through `build.build_ensemble`: ensemble.json kind "tta", the run once per
view with its "view"; thresholds tuned on the fused validation scores; the test split scored
once per view and used for no choice; metrics.json "forward_passes" = the number of views.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import rundir
from ..data import build_loader
from ..data.labels import read_split_labels
from ..errors import UserError
from ..losses import build_loss
from ..models import create_model
from ..train.scoring import predict_split
from .build import build_ensemble
from .members import AlignedSplit, EnsembleError, Member

MIN_SIZE = 16   # data.size's own lower bound (config/schema.py)
GRAMMAR = "comma-separated items: flip, a size in px, or sizes=S; e.g. flip, sizes=384,448,512, sizes=384,448,512,flip"


class ViewSpecError(UserError, ValueError):
    """A TTA spec that does not parse; the message names the value and the grammar."""


@dataclass(frozen=True)
class View:
    size: int        # the square input side the image is resized to
    flip: bool       # mirrored left-right after the resize

    def to_dict(self) -> dict:
        return {"size": self.size, "flip": self.flip}

    @property
    def label(self) -> str:
        return f"{self.size}" + ("+flip" if self.flip else "")


@dataclass(frozen=True)
class TTASpec:
    sizes: tuple = ()     # () = the run's own data.size
    flip: bool = False

    def views(self, own_size: int) -> list[View]:
        """Every size (or `own_size`), as given then mirrored when `flip`."""
        return [View(int(s), f) for s in (self.sizes or (own_size,)) for f in ((False, True) if self.flip else (False,))]


def parse_spec(text: str, option: str = "--tta") -> TTASpec:
    """`flip`, `sizes=384,448`, `384,448,flip`, ... -> TTASpec; ViewSpecError names the fault."""
    sizes, flip = [], False
    items = [t.strip() for t in str(text).split(",")]
    for i, item in enumerate(items):
        if item.startswith("sizes="):
            item = item[len("sizes="):].strip()
        if item.lower() == "flip":
            if flip:
                raise ViewSpecError(f"{option} {text!r}: 'flip' is given twice; give it once ({GRAMMAR})")
            flip = True
            continue
        try:
            size = int(item)
        except ValueError:
            raise ViewSpecError(f"{option} {text!r}: item {item!r} is neither 'flip' nor a size in px; "
                                f"use {GRAMMAR}") from None
        if size < MIN_SIZE:
            raise ViewSpecError(f"{option} {text!r}: size {size} is below {MIN_SIZE} px; use sizes of at least "
                                f"{MIN_SIZE} ({GRAMMAR})")
        if size in sizes:
            raise ViewSpecError(f"{option} {text!r}: size {size} is given twice; list each size once ({GRAMMAR})")
        sizes.append(size)
    spec = TTASpec(tuple(sizes), flip)
    if len(spec.views(0)) < 2:
        raise ViewSpecError(f"{option} {text!r} makes one view, the run itself; add flip or a second size "
                            f"({GRAMMAR})")
    return spec


def view_from_dict(entry: dict, where: str) -> View:
    """A member's "view" entry of ensemble.json ({"size": S, "flip": bool})."""
    try:
        size, flip = entry["size"], entry["flip"]
        if not isinstance(size, int) or isinstance(size, bool) or size < MIN_SIZE or not isinstance(flip, bool):
            raise TypeError
    except (KeyError, TypeError):
        raise EnsembleError(f"{where}: view {entry!r} must be {{\"size\": int >= {MIN_SIZE}, \"flip\": true|false}}; "
                            f"rebuild the TTA directory") from None
    return View(size, flip)


# --------------------------------------------------------------------------- scoring views


class _Local:
    """The `accelerator` predict_split asks of a run: one process on `device`."""
    num_processes = 1
    is_main_process = True

    def __init__(self, device: torch.device):
        self.device = device

    def autocast(self):   # unused: the scores are float32 (fp32=True)
        return torch.autocast(self.device.type, enabled=False)


@dataclass
class _Scorer:
    """What train.scoring.predict_split takes: `.model`, `.accelerator`, `.loss_fn`."""
    model: torch.nn.Module
    accelerator: _Local
    loss_fn: object


class _Flipped:
    """A loader whose batches are mirrored left-right (the width axis of (B, 3, S, S))."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield dataclasses.replace(batch, images=batch.images.flip(3))


def load_model(run: rundir.RunDir, device: torch.device) -> torch.nn.Module:
    """The run's best_model.pt in its registry model (weights_only), eval mode, channels_last."""
    weights = run.path / rundir.BEST_MODEL
    if not weights.is_file():
        raise EnsembleError(f"{run.path} has no {rundir.BEST_MODEL}: TTA needs a finished training run's weights")
    cfg = run.cfg()
    model = create_model(cfg.model.backbone, len(run.classes), pretrained="none", dropout=cfg.model.dropout,
                         image_size=cfg.data.size)
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, EOFError) as e:
        raise EnsembleError(f"{weights} cannot be loaded into {cfg.model.backbone} with {len(run.classes)} "
                            f"classes: {str(e).splitlines()[0][:200]}") from None
    return model.eval().to(device, memory_format=torch.channels_last)


def check_sizes(model: torch.nn.Module, backbone: str, native: int, sizes, error=EnsembleError) -> None:
    """A model built for one input size (a timm ViT, LeViT, ...) refuses others: find out with one
    blank image per other size before any scoring, and say so in one line."""
    device = next(model.parameters()).device
    for size in sorted(set(sizes) - {native}):
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size, device=device).contiguous(memory_format=torch.channels_last))
        except (AssertionError, RuntimeError, ValueError) as e:
            raise error(f"--tta size {size}: {backbone} takes only its data.size={native} px input "
                        f"({str(e).splitlines()[0][:150]}); give only that size (with flip)") from None


def score_views(member: Member, views: Sequence[View], device: str = "cpu") -> dict[str, AlignedSplit]:
    """{split: AlignedSplit(keys, targets, [scores of each view])} for the splits the run scored
    (val, and test when it has one), each view scored on the run's shards with its own loader."""
    run = member.run
    if run.is_ensemble:
        raise EnsembleError(f"{run.path} is an ensemble: TTA takes one training run (its views are the members)")
    cfg = run.cfg()
    dev = torch.device(device)
    model = load_model(run, dev)
    check_sizes(model, cfg.model.backbone, cfg.data.size, [v.size for v in views])
    scorer = _Scorer(model, _Local(dev), build_loss(cfg.loss))
    names = {"val": cfg.data.val_split, "test": cfg.data.test_split}
    out = {}
    for split in (s for s in rundir.SPLITS if s in run.splits):
        keys, labels = read_split_labels(cfg.data.shards, names[split])
        saved = run.split(split)
        if list(saved.keys) != list(keys):
            raise EnsembleError(f"{run.path}: its {split} keys differ from the shards' {cfg.data.shards} "
                                f"{names[split]} split; the shards changed since the run was scored")
        scores = []
        for v in views:
            built = build_loader(dataclasses.replace(cfg.data, size=v.size), names[split], train=False, device=dev)
            try:
                loader = _Flipped(built) if v.flip else built
                probs, _ = predict_split(scorer, loader, len(labels), desc=f"{split} {v.label}", fp32=True)
            finally:
                built.close()             # DALI's pipelines and threads: one view's at a time
            scores.append(probs)                                                     # (N, C) float32
        out[split] = AlignedSplit(list(keys), saved.targets, scores)
    return out


def tta_name(member: Member, views: Sequence[View]) -> str:
    return f"tta-{member.run.name}-" + "_".join(v.label.replace("+", "f") for v in views)


def build_tta(member: Member, spec: TTASpec, *, name: Optional[str] = None, out: Optional[Path] = None,
              target=None, parent_run_id: Optional[str] = None, device: str = "cpu") -> rundir.RunDir:
    """The TTA directory of one training run (see the module docstring), logged to `target`."""
    views = spec.views(member.run.cfg().data.size)
    splits = score_views(member, views, device)
    return build_ensemble([member] * len(views), "tta", name=name or tta_name(member, views), out=out,
                          target=target, parent_run_id=parent_run_id, scored=splits, views=views)

