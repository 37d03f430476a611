"""Export a trained run (or an ensemble) as one model file that carries its own preprocessing,
class names and tuned thresholds (ONNX, TorchScript), each checked against the in-memory model;
or log it to MLflow as a servable pyfunc model (mlic_dist/export/pyfunc.py).

    python -m mlic_dist.export --run-dir runs/NAME --format onnx --out model.onnx
    python -m mlic_dist.export --run-dir runs/NAME --format torchscript --out model.pt
    python -m mlic_dist.export --run RUN_ID [--tracking-uri URI] --format onnx --out model.onnx
    python -m mlic_dist.export --run-dir runs/NAME --format mlflow [--register NAME]
    python -m mlic_dist.export --run-dir runs/NAME --tta sizes=384,448,512,flip --format onnx --out model.onnx
    (then: mlflow models serve -m models:/MODEL_ID --env-manager local --host 127.0.0.1 -p 5001;
     the command prints the URIs; mlic_dist/export/pyfunc.py describes the request and the answer)

THE MODEL (onnx, torchscript): input `images`, uint8 (B, 3, H, W), RGB, 0..255, any H and W (the
image as decoded, e.g. `mlic_dist.data.transforms.load_rgb`, which also applies EXIF rotation and
converts grayscale / CMYK / palette / alpha as the shard command does); output `probabilities`,
float32 (B, C) in the order of the class names. Inside, for each member (one for a run, the
ensemble's members otherwise, each at its own data.size): squash-resize to S x S (bilinear,
antialiased, on uint8: the kernel of `transforms.eval_resize`, which predict and the loaders'
evaluation use), normalise (the member's data.normalize), the network, sigmoid; then the weighted
mean of the members' probabilities (`ensemble.members.fuse`'s weights). A class is predicted when its
probability >= its threshold (tuned on validation). TTA (a TTA directory, or `--tta SPEC` on a
run or ensemble: mlic_dist/ensemble/tta.py): one member per view, each resizing to the view's
size and, when it flips, mirroring the resized image left-right; the views of a run share its
network in the file.

Metadata (`read_metadata(path)` reads both formats): a JSON object under the key `mlic_dist`
(ONNX `metadata_props`; TorchScript `_extra_files["mlic_dist.json"]`) with format_version, input,
output, classes, thresholds, kind (run | ensemble), source, run_id and members [{name, backbone,
size, normalize, weight, flip}]; ONNX also gets `classes` and `thresholds` as their own JSON props.

Each export is checked before the command returns: the written file (onnxruntime / torch.jit)
is run on the tracing example and two images of other sizes and must match the in-memory model
within 1e-4 in probability (the ONNX graph resizes bit for bit as evaluation does:
export/resize.py); otherwise the file is removed (--format
mlflow: nothing is logged) and the command exits 1 with one line.
Exit status 0; 2 with one line on stderr for a user error (no such run, unfinished run, no MLflow
run for --format mlflow, an --out that cannot be written: checked before the model is loaded).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from ..atomic import check_file, replace_with
from ..errors import ExportCheckError
from .model import META_KEY, ExportedModel, ExportError, load
from .resize import graph_resize

FILE_FORMATS = ("onnx", "torchscript")

# The largest |probability difference| the written file may show against the in-memory model on
# the check images. TorchScript runs the same kernels (measured 0.0). The ONNX graph resizes
# bit for bit as evaluation does (export/resize.py), so what remains is onnxruntime's float
# rounding in the network (measured below 1e-6 on the tests' runs; with onnxruntime's own Resize
# it was 1.7e-3, enough to flip a thresholded label).
TORCHSCRIPT_TOLERANCE = 1e-4
ONNX_TOLERANCE = 1e-4


def _enforce(fmt: str, diff: float, tolerance: float) -> float:
    if not diff <= tolerance:   # NaN fails too
        raise ExportCheckError(f"the exported {fmt} model differs from the trained model by up to {diff:.3g} "
                               f"in probability on the check images (allowed {tolerance:g}); it was not "
                               f"kept. Report this with the run and the torch / onnx / onnxruntime versions")
    return diff


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
        # the graph resizes with plain ops that reproduce aten's uint8 kernel exactly
        # (onnxruntime's own antialiased Resize rounds otherwise: up to 1.3e-3 in probability)
        torch.onnx.export(module.with_resize(graph_resize), (example,), str(out), dynamo=True,
                          external_data=False,
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


def export_file(run_dir: Path, fmt: str, out: Path, tta=None) -> dict:
    """Write the run's model as an `fmt` file at `out`, checked (see the module docstring);
    returns what was done. A failed export leaves no file behind. `tta`: a TTA spec (its views)."""
    if fmt not in FILE_FORMATS:
        raise ExportError(f"--format {fmt!r} is not a file format; choose one of {list(FILE_FORMATS)}")
    out = check_file(out, "--out", ExportError, example="model.onnx" if fmt == "onnx" else "model.pt")
    module, meta = load(run_dir, tta)   # after the --out check: a bad --out fails in a second, not at the end
    write = export_onnx if fmt == "onnx" else export_torchscript
    with replace_with(out) as tmp:
        diff = write(module, meta, tmp)
    return {"format": fmt, "out": str(out), "bytes": out.stat().st_size, "max_abs_diff": diff,
            "classes": len(meta["classes"]), "members": len(meta["members"])}
