"""The MLflow pyfunc model of a run or ensemble: `mlflow models serve` answers with labels and scores.

    python -m mlic_dist.export --run-dir runs/NAME --format mlflow [--register NAME]
    mlflow models serve -m models:/MODEL_ID --env-manager local --host 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"image": "<base64 of a JPEG/PNG file>"}]}'
    # files on the serving machine, by path: opt in, naming the one directory the server may read
    MLIC_SERVE_PATHS_UNDER=/data/images mlflow models serve -m models:/MODEL_ID --env-manager local \\
        --host 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"path": "/data/images/x.jpg"}]}'

REQUEST: a DataFrame (MLflow's `dataframe_records` / `dataframe_split` JSON, or a pandas
DataFrame to `pyfunc.load_model(...).predict`), one row per image, with
  `image`  the image file's bytes, base64-encoded (any format PIL reads: JPEG, PNG, ...), or
  `path`   a file on the serving machine: only where the server's environment sets
           MLIC_SERVE_PATHS_UNDER=DIR, and only files inside DIR (symlinks and `..` resolved
           first). Otherwise any client could make the server read (and probe for) its files;
           without it a `path` row is answered with an error. Either column may be absent;
           `image` wins in a row that has both.
Each image is decoded as `mlic_dist.data.transforms.load_rgb` decodes for predict (EXIF
rotation, grayscale / CMYK / palette / alpha -> RGB) and goes through the exported TorchScript
model (mlic_dist/export/model.py: resize, normalise, network(s), fused probabilities).
ANSWER: one row per image: `labels` (the class names whose probability >= the run's tuned
threshold, in class order), `scores` ({class: probability}), `error` ("" when the image was
read, else why it could not be: the other rows are still answered).

The model is logged to the run it came from (tracking.json of the run directory, or --run) as
an MLflow 3 LoggedModel named "model": artifacts = that TorchScript file (weights, preprocessing,
classes and thresholds in one file), model code = pyfunc_model.py (MLflow's "models from code":
nothing is unpickled at load), code = this package (so `--env-manager local` needs no installed
mlic_dist), pip requirements = the torch, pillow, numpy and pandas versions it ran with. The MLflow calls of model logging live here: `tracking.tracker.Tracker` logs runs, not models.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd  # the predict type hint (MLflow validates DataFrame input against the signature)
import PIL
import sklearn
import torch
import yaml
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema

from .. import rundir
from ..data.transforms import load_rgb
from ..tracking.store import resolve_uri
from .formats import export_torchscript
from .model import META_KEY, ExportError

MODEL_NAME = "model"
ARTIFACT = "model_torchscript"
PATHS_ENV = "MLIC_SERVE_PATHS_UNDER"   # the directory `path` rows may read; unset: no files are read
NEITHER = "the row has neither 'image' (base64 file bytes) nor 'path'"


class MlicPyfunc(mlflow.pyfunc.PythonModel):
    """DataFrame of `image` (base64) / `path` -> DataFrame of labels, scores, error."""

    def load_context(self, context):
        extra = {META_KEY + ".json": ""}
        self.model = torch.jit.load(context.artifacts[ARTIFACT], map_location="cpu", _extra_files=extra)
        self.model.eval()
        meta = json.loads(extra[META_KEY + ".json"])
        self.classes, self.thresholds = meta["classes"], meta["thresholds"]

    @staticmethod
    def _image_bytes(row, paths_under: Optional[Path]) -> bytes:
        """The row's image file bytes; `paths_under`: the directory `path` rows may read (None: off)."""
        image, path = row.get("image"), row.get("path")
        if isinstance(image, str) and image:
            try:
                return base64.b64decode(image, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("column 'image' is not valid base64 (send the file's bytes base64-encoded)") from None
        if isinstance(path, str) and path:
            if paths_under is None:
                raise ValueError(f"column 'path' is off: this server reads no files unless {PATHS_ENV}=DIR is "
                                 f"set where it runs; send the file's bytes base64-encoded in 'image'")
            target = Path(path).resolve()            # symlinks and .. first: no way out of the directory
            if not target.is_relative_to(paths_under):
                raise ValueError(f"path {path!r} is outside {paths_under} ({PATHS_ENV}); send the file's bytes "
                                 f"base64-encoded in 'image'")
            try:
                return target.read_bytes()
            except OSError as e:
                raise ValueError(f"cannot read path {path!r}: {e.strerror or e}") from None
        raise ValueError(NEITHER)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        if not rows and getattr(model_input, "shape", (0, 1))[1] == 0:
            # MLflow's schema check turns records with neither column ([{}]) into a frame with no
            # rows and no columns before this runs: answer it rather than with nothing
            return pd.DataFrame([{"labels": [], "scores": {}, "error": NEITHER}], columns=["labels", "scores", "error"])
        under = os.environ.get(PATHS_ENV)
        paths_under = Path(under).resolve() if under else None
        out = []
        for row in rows:
            try:
                image = load_rgb(self._image_bytes(row, paths_under))               # (3, H, W) uint8
            except ValueError as e:
                out.append({"labels": [], "scores": {}, "error": str(e)})
                continue
            with torch.no_grad():
                probs = self.model(image.unsqueeze(0))[0].tolist()                   # (C,)
            out.append({"labels": [c for c, p, t in zip(self.classes, probs, self.thresholds) if p >= t],
                        "scores": dict(zip(self.classes, probs)), "error": ""})
        return pd.DataFrame(out, columns=["labels", "scores", "error"])


@contextlib.contextmanager
def _tracking_uri(uri: str):
    """MLflow's fluent API for a moment, then the caller's tracking URI and environment back:
    `mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI, which every process started later
    (a sweep's trials, a trainer) would inherit and log to."""
    previous = os.environ.get("MLFLOW_TRACKING_URI")   # set_tracking_uri keeps the two equal
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)                # None unsets both


def _signature():
    return ModelSignature(inputs=Schema([ColSpec("string", "image", required=False),
                                         ColSpec("string", "path", required=False)]))


def _tracking_target(run_dir: Path, tracking_uri: Optional[str], run_id: Optional[str]) -> tuple[str, str]:
    tracked = rundir.load_tracking(run_dir) or {}
    run_id = run_id or tracked.get("run_id")
    if not run_id:
        raise ExportError(f"{run_dir} has no MLflow run ({rundir.TRACKING} is missing): pass --run RUN_ID, or "
                          f"log the run first with python -m mlic_dist.relog {run_dir}")
    return resolve_uri(tracking_uri or tracked.get("tracking_uri")), run_id


def log_model(module, meta: dict, run_dir: Path, tracking_uri: Optional[str] = None,
              run_id: Optional[str] = None, register: Optional[str] = None) -> dict:
    """Export `module` (export.ExportedModel) as TorchScript and log it as a pyfunc model of the
    run; returns {"model_uri", "runs_uri", "model_id", "run_id", "tracking_uri", ...}."""
    uri, run_id = _tracking_target(Path(run_dir), tracking_uri, run_id)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise ExportError(f"MLflow at {uri} has no run {run_id} ({str(e).splitlines()[0][:200]}); check "
                          f"--tracking-uri / --run") from None
    package = Path(__file__).resolve().parents[1]   # mlic_dist/, shipped with the model
    with tempfile.TemporaryDirectory() as tmp:
        scripted = Path(tmp) / "model.pt"
        # checked against the in-memory model first: raises ExportCheckError, and nothing is logged
        diff = export_torchscript(module, meta, scripted)
        # log under the run (reopened: MLflow 3 links the LoggedModel to the active run), then
        # give the run back its status (start_run's exit marks it FINISHED)
        with _tracking_uri(uri), mlflow.start_run(run_id=run_id, experiment_id=run.info.experiment_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(Path(__file__).with_name("pyfunc_model.py")),   # models from code
                artifacts={ARTIFACT: str(scripted)},
                code_paths=[str(package)], signature=_signature(),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"pillow=={PIL.__version__}",
                                  f"numpy=={np.__version__}", f"pandas=={pd.__version__}",
                                  f"mlflow=={mlflow.__version__}", f"scikit-learn=={sklearn.__version__}",
                                  f"pyyaml=={yaml.__version__}"],   # the package imports them (metrics, rundir)
                metadata={"mlic_dist": meta}, registered_model_name=register)
        if run.info.status != "FINISHED":
            client.set_terminated(run_id, run.info.status)
    result = {"format": "mlflow", "model_uri": info.model_uri, "model_id": info.model_id,
              "runs_uri": f"runs:/{run_id}/{MODEL_NAME}", "run_id": run_id, "tracking_uri": uri,
              "max_abs_diff": diff, "serve": f"MLFLOW_TRACKING_URI={uri} mlflow models serve -m "
                                             f"{info.model_uri} --env-manager local --host 127.0.0.1 -p 5001"}
    if register:
        result["registered"] = {"name": register, "version": getattr(info, "registered_model_version", None)}
    return result
