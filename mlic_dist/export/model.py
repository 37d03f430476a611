"""The exportable model of a run or an ensemble and the metadata it carries.

`ExportedModel`: uint8 (B, 3, H, W) RGB 0..255, any H and W -> float32 (B, C) probabilities.
Inside, for each member (one for a run, the ensemble's members otherwise, each at its own
data.size): squash-resize to S x S (bilinear, antialiased, on uint8: the kernel of
`data.transforms.eval_resize`, which predict and the loaders' evaluation use), normalise (the
member's data.normalize), the network, sigmoid; then the weighted mean of the members'
probabilities. A TTA view (a TTA directory's members, or `--tta SPEC` on any run: one member
per view, sharing the run's network) mirrors the resized image left-right when it flips, as
predict does; its size is the view's (`ensemble.members.fuse`'s weights). A class is predicted when its probability >=
its threshold (tuned on validation).

Metadata (`read_metadata(path)` reads both file formats): a JSON object under the key `mlic_dist`
(ONNX `metadata_props`; TorchScript `_extra_files["mlic_dist.json"]`) with format_version, input,
output, classes, thresholds, kind (run | ensemble), source, run_id and members [{name, backbone,
size, normalize, weight, flip}]; ONNX also gets `classes` and `thresholds` as their own JSON props.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import rundir
from ..errors import UserError
from ..predict import PredictError, Predictor

FORMAT_VERSION = 1
META_KEY = "mlic_dist"
INPUT_DOC = ("uint8 (B, 3, H, W) RGB 0..255, any H and W (decoded as mlic_dist.data.transforms.load_rgb "
             "decodes; resized inside to each member's size: squash, bilinear, antialiased)")
OUTPUT_DOC = "float32 (B, C) probabilities in `classes` order; a class is present when its probability >= its threshold"
FORMATS = ("onnx", "torchscript", "mlflow")



class ExportError(UserError, ValueError):
    """The run cannot be exported as asked; the message names the fix."""


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B, 3, S, S): `transforms.eval_resize`'s operation (aten's
    _upsample_bilinear2d_aa, align_corners=False) in its functional form, which torch.export and
    tracing can record (eval_resize writes into an `out=` buffer). tests/test_export.py checks
    that the two agree bit for bit."""
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ExportedModel(nn.Module):
    """uint8 (B, 3, H, W) RGB -> (B, C) float32 probabilities (see the module docstring)."""

    def __init__(self, members):
        """`members`: predict.MemberModel list (model in eval mode, size, normalizer, weight)."""
        super().__init__()
        self.resize = resize   # aten's kernel; an ONNX graph gets export.resize.graph_resize
        nets: list = []        # each network once: the views of one run (TTA) share it
        for m in members:
            if not any(m.model is n for n in nets):
                nets.append(m.model)
        self.nets = nn.ModuleList(nets)
        self.net_of = [next(i for i, n in enumerate(nets) if n is m.model) for m in members]
        self.sizes = [int(m.size) for m in members]
        self.flips = [bool(getattr(m, "flip", False)) for m in members]
        w = torch.tensor([float(m.weight) for m in members], dtype=torch.float64)
        self.register_buffer("weights", (w / w.sum()).float())                     # (M,)
        for k, m in enumerate(members):   # x * (1 / std) + (-mean / std), the Normalizer's affine map
            self.register_buffer(f"scale{k}", m.normalizer.scale.detach().cpu().float().view(1, 3, 1, 1).clone())
            self.register_buffer(f"shift{k}", m.normalizer.shift.detach().cpu().float().view(1, 3, 1, 1).clone())

    def with_resize(self, fn) -> "ExportedModel":
        """The same networks and weights, resizing with `fn` (same values, other ops)."""
        other = copy.copy(self)
        other.resize = fn
        return other

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = None
        resized: dict = {}   # size -> (B, 3, S, S): the views of one size resize once
        for k, size in enumerate(self.sizes):
            if size not in resized:
                resized[size] = self.resize(images, size).float()
            x = resized[size].flip(3) if self.flips[k] else resized[size]             # (B, 3, S, S)
            x = x * getattr(self, f"scale{k}") + getattr(self, f"shift{k}")
            net = self.nets[self.net_of[k]]
            p = torch.sigmoid(net(x.contiguous(memory_format=torch.channels_last)).float()) * self.weights[k]
            probs = p if probs is None else probs + p                                 # (B, C)
        return probs


def load(run_dir: Path, tta=None) -> tuple[ExportedModel, dict]:
    """The exportable module of a run, ensemble or TTA directory, and its metadata; `tta` (a
    spec: mlic_dist/ensemble/tta.py) adds views to every member, as `predict --tta` does."""
    try:
        predictor = Predictor(Path(run_dir), "cpu", tta)   # the members exactly as predict loads them
        run = rundir.load_run(run_dir, splits=())
    except (PredictError, rundir.RunDirError) as e:
        raise ExportError(str(e)) from None
    member_dirs = ([Path(m["run_dir"]) for m in run.ensemble.get("members", [])] if run.is_ensemble
                   else [run.path])
    views = len(predictor.members) // len(member_dirs)    # --tta: each member's views, in member order
    members = []
    for i, m in enumerate(predictor.members):
        cfg = rundir.load_run(member_dirs[i // views], splits=()).cfg()
        members.append({"name": m.name, "backbone": cfg.model.backbone, "size": int(m.size),
                        "normalize": cfg.data.normalize, "weight": float(m.weight), "flip": bool(m.flip)})
    meta = {"format_version": FORMAT_VERSION, "input": INPUT_DOC, "output": OUTPUT_DOC,
            "classes": list(run.classes), "thresholds": [float(t) for t in predictor.thresholds],
            "kind": "ensemble" if run.is_ensemble else "run", "source": str(run.path.resolve()),
            "run_id": (run.tracking or {}).get("run_id"), "members": members}
    return ExportedModel(predictor.members).eval(), meta


def read_metadata(path: str | Path) -> dict:
    """The metadata of an exported .onnx or TorchScript file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return json.loads(props[META_KEY])
    extra = {META_KEY + ".json": ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[META_KEY + ".json"])
