"""mlic_dist.export and mlic_dist.export.pyfunc on REAL trained runs (tests/ensemble_runs.py): the ONNX
file run by onnxruntime and the TorchScript file run by torch give back the scores the trainer
saved for the validation images (a run, and a two-size ensemble), with the run's thresholds and
classes in their metadata; the MLflow pyfunc model served by `mlflow models serve` answers with
the labels `predict` gives."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_runs import isolated_store, train_small_runs
from mlic_dist.ensemble import build as ensemble
from mlic_dist import rundir
from mlic_dist.export.formats import export_file
from mlic_dist.export.model import read_metadata, resize
from mlic_dist.tracking.server import stop_group
from mlic_dist.predict import Predictor, predict_files
from processes import wait_http

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOLERANCE = 0.02   # |probability| vs the trainer's saved scores (its loader decodes with torchvision)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_runs(tmp_path_factory.getbasetemp() / "ensemble-runs")


@pytest.fixture(scope="module")
def val_files(trained, tmp_path_factory) -> dict:
    """key -> the val split's JPEG file, written out of the shard tars."""
    out = tmp_path_factory.mktemp("export-val")
    manifest = json.loads((trained.shards / "manifest.json").read_text())
    files = {}
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(trained.shards / shard["file"]) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    files[Path(member.name).stem] = out / Path(member.name).name
                    files[Path(member.name).stem].write_bytes(tar.extractfile(member).read())
    return files


@pytest.fixture(scope="module")
def pair(trained, tmp_path_factory):
    """A weighted ensemble of the 32 px and 40 px runs (each member resizes to its own size)."""
    members = [ensemble.member_from_dir(trained.runs[n]) for n in ("m1-32-s0", "m1-40-s0")]
    return ensemble.build_ensemble(members, "manual", name="pair", weights=[2, 1],
                                   out=tmp_path_factory.mktemp("export-ens") / "pair").path


def test_resize_is_the_eval_transform_bit_for_bit():
    from mlic_dist.data.transforms import eval_resize

    g = torch.Generator().manual_seed(0)
    for shape, size in (((2, 3, 48, 64), 32), ((1, 3, 375, 500), 128), ((3, 3, 20, 17), 40)):
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        assert torch.equal(resize(x, size), eval_resize(x, size))


def _photos(out: Path) -> list[Path]:
    """Real photographs (scikit-image's bundled ones) as JPEG files at several sizes, down and up."""
    import skimage.data as d
    from PIL import Image

    files = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        photo = Image.fromarray(getattr(d, name)()).convert("RGB")
        for k, scale in enumerate((1.0, 0.23, 0.61, 1.7)):
            size = (max(5, round(photo.width * scale)), max(5, round(photo.height * scale * (1 + 0.1 * k))))
            files.append(out / f"{name}-{size[0]}x{size[1]}.jpg")
            photo.resize(size, Image.Resampling.BICUBIC).save(files[-1], quality=92)
    return files


def test_graph_resize_is_eval_resize_bit_for_bit_on_real_photos(tmp_path):
    """The ONNX graph's resize (plain ops) against THE evaluation resize, in torch, on real photos."""
    from mlic_dist.data.transforms import eval_resize, load_rgb
    from mlic_dist.export.resize import graph_resize

    for f in _photos(tmp_path):
        img = load_rgb(f.read_bytes())[None]
        for size in (32, 40, 224, 448, img.shape[2], img.shape[3]):
            assert torch.equal(graph_resize(img, size), eval_resize(img, size).float()), (f.name, size)


def test_onnx_gives_predicts_probabilities_and_labels_on_real_photos(pair, tmp_path):
    """The exported graph resizes exactly as evaluation does, so the ONNX file's probabilities
    are predict's up to float rounding (docs/ensembles.md promises ONNX_TOLERANCE) and its
    thresholded labels are predict's, on real photos at several sizes, for both member sizes."""
    import onnxruntime as ort

    from mlic_dist.data.transforms import load_rgb
    from mlic_dist.export.formats import ONNX_TOLERANCE

    files = _photos(tmp_path)
    done = export_file(pair, "onnx", tmp_path / "model.onnx")
    assert done["max_abs_diff"] <= ONNX_TOLERANCE <= 1e-4
    meta = read_metadata(tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    records = predict_files(Predictor(pair), files)
    assert [r["file"] for r in records] == [str(f) for f in files]
    worst = 0.0
    for f, r in zip(files, records):
        probs = session.run(None, {"images": load_rgb(f.read_bytes())[None].numpy()})[0][0]
        expected = np.array([r["scores"][c] for c in meta["classes"]])
        worst = max(worst, float(np.abs(probs - expected).max()))
        labels = [c for c, p, t in zip(meta["classes"], probs, meta["thresholds"]) if p >= t]
        assert labels == r["labels"], f.name
    # onnxruntime's own Resize gave 3.8e-5 here (a 2-layer net on 32 / 40 px), 1.3e-3 on a real backbone
    assert worst <= 1e-5, worst
    print(f"ONNX vs predict on {len(files)} real photos: max |probability difference| {worst:.3g}")


def _onnx_scores(path: Path, images: list[torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"images": img[None].numpy()})[0] for img in images])


@pytest.mark.parametrize("which", ["run", "ensemble"])
def test_onnx_and_torchscript_reproduce_the_saved_scores(trained, pair, val_files, tmp_path, which):
    from mlic_dist.data.transforms import load_rgb

    run_dir = trained.runs["m1-32-s0"] if which == "run" else pair
    run = rundir.load_run(run_dir)
    val = run.split("val")
    images = [load_rgb(val_files[k].read_bytes()) for k in val.keys]                    # (3, H, W) uint8
    # predict's own scores for the same files: the reference the exports must equal
    predicted = {Path(r["file"]).stem: [r["scores"][c] for c in run.classes]
                 for r in predict_files(Predictor(run_dir), [val_files[k] for k in val.keys])}
    predicted = np.array([predicted[k] for k in val.keys])

    onnx_file, ts_file = tmp_path / "model.onnx", tmp_path / "model.pt"
    p = subprocess.run([sys.executable, "-m", "mlic_dist.export", "--run-dir", str(run_dir), "--format", "onnx",
                        "--out", str(onnx_file)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.splitlines()[-1])["max_abs_diff"] < 1e-3
    export_file(run_dir, "torchscript", ts_file)

    for path in (onnx_file, ts_file):
        meta = read_metadata(path)
        assert meta["classes"] == run.classes
        assert meta["thresholds"] == [float(t) for t in run.thresholds]             # exactly the run's
        assert [m["size"] for m in meta["members"]] == ([32] if which == "run" else [32, 40])
        assert meta["kind"] == which and "uint8 (B, 3, H, W)" in meta["input"]
    import onnx

    props = {q.key: q.value for q in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(props["thresholds"]) == [float(t) for t in run.thresholds]

    module = torch.jit.load(str(ts_file))
    with torch.no_grad():
        ts = torch.cat([module(img[None]) for img in images]).numpy()
        ts_batch = module(torch.stack(images)).numpy()                                  # a batch of 14
    ox = _onnx_scores(onnx_file, images)
    assert ts.shape == ox.shape == val.scores.shape
    np.testing.assert_allclose(ts, predicted, atol=2e-6)     # the same kernels as predict
    np.testing.assert_allclose(ts_batch, ts, atol=2e-6)
    np.testing.assert_allclose(ox, predicted, atol=1e-5)     # the graph resizes exactly as predict
    for got in (ts, ox):
        assert np.abs(got - val.scores).max() < TOLERANCE     # the run's own saved scores
    # other image sizes go through the module's own resize
    big = torch.nn.functional.interpolate(images[0][None].float(), size=(97, 130)).round().to(torch.uint8)
    with torch.no_grad():
        np.testing.assert_allclose(_onnx_scores(onnx_file, [big[0]]), module(big).numpy(), atol=1e-5)


def test_export_user_errors_are_one_line_with_status_2(trained, tmp_path):
    bare = tmp_path / "bare"            # a finished run without tracking.json
    import shutil

    shutil.copytree(trained.runs["m1-32-s0"], bare, ignore=shutil.ignore_patterns("checkpoints", "tracking.json"))
    for args, needle in (
        (["--run-dir", tmp_path / "nope", "--format", "onnx", "--out", tmp_path / "m.onnx"], "does not exist"),
        (["--run-dir", trained.runs["m1-32-s0"], "--format", "onnx"], "give --out FILE"),
        (["--run-dir", bare, "--format", "mlflow"], "has no MLflow run"),
        (["--run-dir", trained.runs["m1-32-s0"], "--format", "onnx", "--out", tmp_path], "is a directory"),
        (["--run-dir", trained.runs["m1-32-s0"], "--format", "onnx", "--out", "/proc/nope/m.onnx"],
         "cannot create files in /proc"),
    ):
        p = subprocess.run([sys.executable, "-m", "mlic_dist.export", *map(str, args)], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert p.stderr.startswith("error: ") and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob(".*tmp*"))       # no half-written export left behind


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "mlflow"])
def test_an_export_that_does_not_compute_the_model_is_refused_and_not_kept(trained, tmp_path, monkeypatch,
                                                                           capsys, fmt):
    """The exporter writes a model whose probabilities are 0.8x the trained ones (what a wrongly
    traced branch or a converter bug would do): the file check refuses it (exit 1, one line),
    no file stays, and MLflow gets no model."""
    import copy

    from mlflow.tracking import MlflowClient

    from mlic_dist.export.__main__ import main

    def other_model(module):
        wrong = copy.deepcopy(module)
        with torch.no_grad():
            wrong.weights.mul_(0.8)           # the members' fusion weights: every probability x 0.8
        return wrong

    real_trace, real_onnx = torch.jit.trace, torch.onnx.export
    monkeypatch.setattr(torch.jit, "trace", lambda m, *a, **k: real_trace(other_model(m), *a, **k))
    monkeypatch.setattr(torch.onnx, "export", lambda m, *a, **k: real_onnx(other_model(m), *a, **k))
    name = "m1-32-s0"
    if fmt == "mlflow":
        store = isolated_store(trained, tmp_path / "store")
        argv = ["--run", trained.run_ids[name], "--tracking-uri", store, "--format", "mlflow"]
    else:
        argv = ["--run-dir", str(trained.runs[name]), "--format", fmt, "--out", str(tmp_path / "model.bin")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: the exported {'ONNX' if fmt == 'onnx' else 'TorchScript'} model differs")
    assert "not kept" in err and len(err.strip().splitlines()) == 1
    if fmt == "mlflow":
        client = MlflowClient(store)
        run = client.get_run(trained.run_ids[name])
        assert list(client.search_logged_models([run.info.experiment_id])) == []
        assert run.info.status == "FINISHED"
    else:
        assert not (tmp_path / "model.bin").exists() and list(tmp_path.iterdir()) == []


def test_predict_and_export_find_a_run_id_through_mlflow_query(trained, tmp_path, capsys):
    """`--run RUN_ID` means the same in both commands (mlflow_query.resolve_run_dir): the run's
    run_dir tag, or one line naming the run id that is not there."""
    from mlic_dist.tracking import query as mq
    from mlic_dist.export.__main__ import main as export_main
    from mlic_dist.predict import main as predict_main

    store = isolated_store(trained, tmp_path / "store")
    name = "m1-40-s0"
    assert mq.resolve_run_dir(None, trained.run_ids[name], store) == trained.runs[name]
    assert mq.resolve_run_dir(tmp_path, "ignored", None) == tmp_path
    (tmp_path / "a.jpg").write_bytes(b"x")
    errors = []
    for main, argv in ((predict_main, [str(tmp_path / "a.jpg")]),
                       (export_main, ["--format", "onnx", "--out", str(tmp_path / "m.onnx")])):
        assert main(["--run", "0123abcd", "--tracking-uri", store, *argv]) == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and errors[0].startswith("error: MLflow run '0123abcd' not found at ")
    assert len(errors[0].strip().splitlines()) == 1


def _post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_mlflow_model_is_served_with_the_labels_predict_gives(trained, pair, val_files, tmp_path, free_port,
                                                              capsys, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    import mlic_dist.export.__main__
    from mlic_dist.export.pyfunc import PATHS_ENV

    store = isolated_store(trained, tmp_path / "store")
    run_id = trained.run_ids["m1-40-s0"]
    run_dir = trained.runs["m1-40-s0"]
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    # the command line (the README's): the run found through MLflow, logged there and registered
    capsys.readouterr()
    assert mlic_dist.export.__main__.main(["--run", run_id, "--tracking-uri", store, "--format", "mlflow",
                                  "--register", "mlic-scenes"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # later processes (a sweep's trials) inherit the environment: export must leave it as it was
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    assert done["model_uri"].startswith("models:/") and done["runs_uri"] == f"runs:/{run_id}/model"
    client = MlflowClient(store)
    assert client.get_run(run_id).info.status == "FINISHED"
    (version,) = client.search_model_versions("name='mlic-scenes'")
    assert done["model_id"] in version.source and version.run_id == run_id

    keys = sorted(val_files)[:5]
    files = [val_files[k] for k in keys]
    want = {Path(r["file"]).stem: r for r in predict_files(Predictor(run_dir), files)}
    # the runs:/ URI (MLflow 2 style) resolves to the same LoggedModel, in process
    mlflow.set_tracking_uri(store)
    model = mlflow.pyfunc.load_model(done["runs_uri"])
    by_path = pd.DataFrame({"path": [str(f) for f in files]})
    # reading files by path is off unless the server's environment names the directory it may read
    monkeypatch.delenv(PATHS_ENV, raising=False)
    off = model.predict(by_path)
    assert all(PATHS_ENV in e and "'image'" in e for e in off["error"]) and all(len(x) == 0 for x in off["labels"])
    monkeypatch.setenv(PATHS_ENV, str(files[0].parent))
    local = model.predict(by_path)
    assert list(local["error"]) == [""] * len(files)
    assert [list(x) for x in local["labels"]] == [want[k]["labels"] for k in keys]
    (tmp_path / "secret.jpg").write_bytes(files[0].read_bytes())
    for outside in (tmp_path / "secret.jpg", files[0].parent / ".." / tmp_path.name / "secret.jpg"):
        (err,) = model.predict(pd.DataFrame({"path": [str(outside)]}))["error"]
        assert "is outside" in err, err
    monkeypatch.delenv(PATHS_ENV)

    # uvicorn (the scoring server) runs from the venv: its bin directory must be on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": "", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop(PATHS_ENV, None)
    server = subprocess.Popen([str(BIN / "mlflow"), "models", "serve", "-m", done["model_uri"], "--env-manager",
                               "local", "--host", "127.0.0.1", "-p", str(free_port)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{free_port}"
        wait_http(base + "/ping", server, 240, "mlflow models serve", poll_s=1.0)
        records = [{"image": base64.b64encode(f.read_bytes()).decode()} for f in files]
        records.append({"image": base64.b64encode(b"not an image").decode()})
        records.append({"path": str(files[0])})          # a client asks the server to read a file
        answer = _post(base + "/invocations", {"dataframe_records": records})["predictions"]
        empty = _post(base + "/invocations", {"dataframe_records": [{}]})["predictions"]   # neither column
    finally:
        stop_group(server.pid, 30.0, server)   # the scoring server and its workers
    assert len(answer) == 7
    for k, row in zip(keys, answer):
        assert row["error"] == "" and row["labels"] == want[k]["labels"]
        np.testing.assert_allclose([row["scores"][c] for c in want[k]["scores"]], list(want[k]["scores"].values()),
                                   atol=2e-6)
    assert answer[5]["labels"] == [] and "image" in answer[5]["error"]
    assert answer[6]["labels"] == [] and "column 'path' is off" in answer[6]["error"]
    assert len(empty) == 1 and empty[0]["labels"] == [] and "neither 'image'" in empty[0]["error"]
