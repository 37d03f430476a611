"""Export a trained run (or an ensemble) as one model file that carries its own preprocessing,
class names and tuned thresholds; or log it to MLflow as a servable pyfunc model.

    python -m mlic_dist.export --run-dir runs/NAME --format onnx --out model.onnx
    python -m mlic_dist.export --run-dir runs/NAME --format torchscript --out model.pt
    python -m mlic_dist.export --run RUN_ID [--tracking-uri URI] --format onnx --out model.onnx
    python -m mlic_dist.export --run-dir runs/NAME --format mlflow [--register NAME]
    (then: mlflow models serve -m models:/MODEL_ID --env-manager local --host 127.0.0.1 -p 5001;
     the command prints the URIs; mlic_dist/serving.py describes the request and the answer)

THE MODEL (onnx, torchscript): input `images`, uint8 (B, 3, H, W), RGB, 0..255, any H and W (the
image as decoded, e.g. `mlic_dist.data.transforms.load_rgb`, which also applies EXIF rotation and
converts grayscale / CMYK / palette / alpha as the shard command does); output `probabilities`,
float32 (B, C) in the order of the class names. Inside, for each member (one for a run, the
ensemble's members otherwise, each at its own data.size): squash-resize to S x S (bilinear,
antialiased, on uint8: the kernel of `transforms.eval_resize`, which predict and the loaders'
evaluation use), normalise (the member's data.normalize), the network, sigmoid; then the weighted
mean of the members' probabilities (`fusion.fuse`'s weights). A class is predicted when its
probability >= its threshold (tuned on validation).

Metadata (`read_metadata(path)` reads both formats): a JSON object under the key `mlic_dist`
(ONNX `metadata_props`; TorchScript `_extra_files["mlic_dist.json"]`) with format_version, input,
output, classes, thresholds, kind (run | ensemble), source, run_id and members [{name, backbone,
size, normalize, weight}]; ONNX also gets `classes` and `thresholds` as their own JSON props.

Each export is checked before the command returns: the written file (onnxruntime / torch.jit)
is run on the tracing example and two images of other sizes and must match the in-memory model
within 1e-4 (TorchScript) / 2e-3 (ONNX) in probability; otherwise the file is removed (--format
mlflow: nothing is logged) and the command exits 1 with one line.
Exit status 0; 2 with one line on stderr for a user error (no such run, unfinished run, no MLflow
run for --format mlflow, an --out that cannot be written: checked before the model is loaded).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import rundir
from .destination import check_file
from .errors import ExportCheckError, UserError

FORMAT_VERSION = 1
META_KEY = "mlic_dist"
INPUT_DOC = ("uint8 (B, 3, H, W) RGB 0..255, any H and W (decoded as mlic_dist.data.transforms.load_rgb "
             "decodes; resized inside to each member's size: squash, bilinear, antialiased)")
OUTPUT_DOC = "float32 (B, C) probabilities in `classes` order; a class is present when its probability >= its threshold"
FORMATS = ("onnx", "torchscript", "mlflow")


# The largest |probability difference| the written file may show against the in-memory model on
# the check images. TorchScript runs the same kernels (measured 0.0); onnxruntime's
# antialiased resize rounds differently (measured 5e-5 and 2e-4 on the tests' 32 / 40 px runs).
TORCHSCRIPT_TOLERANCE = 1e-4
ONNX_TOLERANCE = 2e-3


class ExportError(UserError, ValueError):
    """The run cannot be exported as asked; the message names the fix."""


def _enforce(fmt: str, diff: float, tolerance: float) -> float:
    if not diff <= tolerance:   # NaN fails too
        raise ExportCheckError(f"the exported {fmt} model differs from the trained model by up to {diff:.3g} "
                               f"in probability on the check images (allowed {tolerance:g}); it was not "
                               f"kept. Report this with the run and the torch / onnx / onnxruntime versions")
    return diff


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
        self.nets = nn.ModuleList([m.model for m in members])
        self.sizes = [int(m.size) for m in members]
        w = torch.tensor([float(m.weight) for m in members], dtype=torch.float64)
        self.register_buffer("weights", (w / w.sum()).float())                     # (M,)
        for k, m in enumerate(members):   # x * (1 / std) + (-mean / std), the Normalizer's affine map
            self.register_buffer(f"scale{k}", m.normalizer.scale.detach().cpu().float().view(1, 3, 1, 1).clone())
            self.register_buffer(f"shift{k}", m.normalizer.shift.detach().cpu().float().view(1, 3, 1, 1).clone())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        probs = None
        for k, net in enumerate(self.nets):
            x = resize(images, self.sizes[k]).float()                                  # (B, 3, S, S)
            x = x * getattr(self, f"scale{k}") + getattr(self, f"shift{k}")
            p = torch.sigmoid(net(x.contiguous(memory_format=torch.channels_last)).float()) * self.weights[k]
            probs = p if probs is None else probs + p                                 # (B, C)
        return probs


def load(run_dir: Path) -> tuple[ExportedModel, dict]:
    """The exportable module of a run or ensemble directory, and its metadata."""
    from .predict import PredictError, Predictor

    try:
        predictor = Predictor(Path(run_dir), "cpu")      # the members exactly as predict loads them
        run = rundir.load_run(run_dir, splits=())
    except (PredictError, rundir.RunDirError) as e:
        raise ExportError(str(e)) from None
    member_dirs = ([Path(m["run_dir"]) for m in run.ensemble.get("members", [])] if run.is_ensemble
                   else [run.path])
    members = []
    for d, m in zip(member_dirs, predictor.members):
        cfg = rundir.load_run(d, splits=()).cfg()
        members.append({"name": m.name, "backbone": cfg.model.backbone, "size": int(m.size),
                        "normalize": cfg.data.normalize, "weight": float(m.weight)})
    meta = {"format_version": FORMAT_VERSION, "input": INPUT_DOC, "output": OUTPUT_DOC,
            "classes": list(run.classes), "thresholds": [float(t) for t in predictor.thresholds],
            "kind": "ensemble" if run.is_ensemble else "run", "source": str(run.path.resolve()),
            "run_id": (run.tracking or {}).get("run_id"), "members": members}
    return ExportedModel(predictor.members).eval(), meta


def _examples(meta: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A tracing example and two checks of other batch sizes and shapes (uint8 RGB)."""
    g = torch.Generator().manual_seed(0)
    s = max(m["size"] for m in meta["members"])
    make = lambda *shape: torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    return make(2, 3, s + 7, s + 3), [make(1, 3, s // 2 + 5, s + 11), make(3, 3, 2 * s + 1, s - 3)]


def export_torchscript(module: ExportedModel, meta: dict, out: Path) -> float:
    """torch.jit.trace (the ops do not depend on the input's values) + _extra_files metadata.
    Returns the largest |difference| of the file (loaded back) to the in-memory model on the
    example and check images; raises ExportCheckError above TORCHSCRIPT_TOLERANCE."""
    import warnings

    example, checks = _examples(meta)
    with torch.no_grad(), warnings.catch_warnings():
        # torch.jit says it is deprecated; it is still the format asked for (and what serving loads)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        traced = torch.jit.trace(module, (example,), check_inputs=[(c,) for c in checks])
        torch.jit.save(traced, str(out), _extra_files={META_KEY + ".json": json.dumps(meta)})
        loaded = torch.jit.load(str(out), map_location="cpu")
    with torch.no_grad():
        diff = max(float((loaded(c) - module(c)).abs().max()) for c in [example, *checks])
    return _enforce("TorchScript", diff, TORCHSCRIPT_TOLERANCE)


def export_onnx(module: ExportedModel, meta: dict, out: Path) -> float:
    """torch.onnx.export (dynamo) with a dynamic batch, height and width, weights inside the
    file, then the metadata_props. The file run by onnxruntime is compared with the in-memory
    model on the example and check images: returns the largest |difference|, raises
    ExportCheckError above ONNX_TOLERANCE."""
    import onnx
    import onnxruntime as ort

    example, checks = _examples(meta)
    dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=2),
            3: torch.export.Dim("width", min=2)}
    with torch.no_grad():
        torch.onnx.export(module, (example,), str(out), dynamo=True, external_data=False,
                          input_names=["images"], output_names=["probabilities"],
                          dynamic_shapes=(dims,), verbose=False)
    model = onnx.load(str(out))
    del model.metadata_props[:]
    for key, value in ((META_KEY, json.dumps(meta)), ("classes", json.dumps(meta["classes"])),
                       ("thresholds", json.dumps(meta["thresholds"]))):
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        diff = max(float(np.abs(session.run(None, {"images": c.numpy()})[0] - module(c).numpy()).max())
                   for c in [example, *checks])
    return _enforce("ONNX", diff, ONNX_TOLERANCE)


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


def export(run_dir: Path, fmt: str, out: Optional[Path] = None, tracking_uri: Optional[str] = None,
           run_id: Optional[str] = None, register: Optional[str] = None) -> dict:
    """Write (onnx, torchscript) or log (mlflow) the model; returns what was done."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not valid; choose one of {list(FORMATS)}")
    if fmt != "mlflow" and out is None:
        raise ExportError(f"--format {fmt} writes a file: give --out FILE")
    if fmt != "mlflow":   # before loading and tracing: a bad --out fails in a second, not at the end
        out = check_file(out, "--out", ExportError, example="model.onnx" if fmt == "onnx" else "model.pt")
    module, meta = load(run_dir)
    if fmt == "mlflow":
        from .serving import log_model

        return log_model(module, meta, run_dir, tracking_uri=tracking_uri, run_id=run_id, register=register)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        diff = export_onnx(module, meta, tmp) if fmt == "onnx" else export_torchscript(module, meta, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)   # a failed export leaves no half-written file behind
    return {"format": fmt, "out": str(out), "bytes": out.stat().st_size, "max_abs_diff": diff,
            "classes": len(meta["classes"]), "members": len(meta["members"])}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import mlflow_query as mq   # imports mlflow only when a function asks for it

    mq.add_run_arguments(p, "the MLflow tracking URI (with --run, or to log --format mlflow)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", type=Path, help="the file to write (onnx, torchscript)")
    p.add_argument("--register", metavar="NAME", help="--format mlflow: also register the model under NAME")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import mlflow_query as mq

    args = build_parser().parse_args(argv)
    mq.fail_fast_http()
    try:
        run_dir = mq.resolve_run_dir(args.run_dir, args.run, args.tracking_uri)
        result = export(run_dir, args.format, args.out, args.tracking_uri, args.run, args.register)
    except UserError as e:   # not ExportError: run as __main__, this module's class is another object
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportCheckError as e:   # from mlic_dist.errors: one class however this module runs
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
