"""Test-time augmentation (mlic_dist/ensemble/tta.py) on REAL trained runs (tests/ensemble_runs.py):
the TTA directory's scores are the mean of per-view scores computed here by hand (decode, resize,
mirror, normalise, the network), a flip view really mirrors, predict of the TTA directory is
predict --tta of the run, the exported files give predict's probabilities, a bad spec is one
error line, and the MLflow run carries the TTA tags."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from ensemble_runs import EXPERIMENT, isolated_store, train_small_runs
from mlic_dist import metrics, rundir
from mlic_dist.data.normalize import Normalizer
from mlic_dist.data.transforms import eval_resize, load_rgb
from mlic_dist.ensemble import __main__ as ensemble_cli
from mlic_dist.export.formats import ONNX_TOLERANCE, TORCHSCRIPT_TOLERANCE, export_file
from mlic_dist.export.model import read_metadata
from mlic_dist.models import create_model
from mlic_dist.predict import Predictor

ROOT = Path(__file__).resolve().parents[1]
RUN = "m1-32-s0"                # data.size 32
SPEC = "sizes=32,40,flip"       # 4 views: 32, 32+flip, 40, 40+flip
TOLERANCE = 1e-4                # the loaders decode with torchvision, by hand with PIL (measured ~1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_runs(tmp_path_factory.getbasetemp() / "ensemble-runs")


@pytest.fixture(scope="module")
def split_files(trained, tmp_path_factory) -> dict:
    """{split: {key: JPEG file}} written out of the shard tars."""
    out = tmp_path_factory.mktemp("tta-images")
    manifest = json.loads((trained.shards / "manifest.json").read_text())
    files = {}
    for split in ("val", "test"):
        files[split] = {}
        (out / split).mkdir()
        for shard in manifest["splits"][split]["shards"]:
            with tarfile.open(trained.shards / shard["file"]) as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        path = out / split / Path(member.name).name
                        path.write_bytes(tar.extractfile(member).read())
                        files[split][path.stem] = path
    return files


@pytest.fixture(scope="module")
def store(trained, tmp_path_factory):
    return isolated_store(trained, tmp_path_factory.mktemp("tta-store"))


@pytest.fixture(scope="module")
def tta_dir(trained, store, tmp_path_factory):
    """The CLI's TTA directory of RUN with SPEC, logged to a copy of the runs' MLflow store."""
    out = tmp_path_factory.mktemp("tta") / "tta-run"
    assert ensemble_cli.main(["--run-dirs", str(trained.runs[RUN]), "--tta", SPEC, "--out", str(out),
                              "--experiment", EXPERIMENT, "--tracking-uri", store]) == 0
    return out


def by_hand(run_dir: Path, files: list[Path], size: int, flip: bool) -> np.ndarray:
    """(N, C) probabilities of one view, computed without predict / ensemble code."""
    run = rundir.load_run(run_dir, splits=())
    cfg = run.cfg()
    model = create_model(cfg.model.backbone, len(run.classes), pretrained="none", image_size=cfg.data.size)
    model.load_state_dict(torch.load(run_dir / rundir.BEST_MODEL, weights_only=True))
    model.eval()
    x = torch.stack([eval_resize(load_rgb(f.read_bytes()), size) for f in files])     # (N, 3, S, S) uint8
    if flip:
        x = torch.flip(x, dims=[3])                                                    # mirror the width axis
    with torch.no_grad():
        return torch.sigmoid(model(Normalizer(cfg.data.normalize, "cpu")(x))).numpy()


def test_tta_directory_is_the_mean_of_the_views_scored_by_hand(trained, tta_dir, split_files, store):
    tta = rundir.load_run(tta_dir)
    views = [(32, False), (32, True), (40, False), (40, True)]
    assert tta.ensemble["kind"] == "tta"
    assert [(m["view"]["size"], m["view"]["flip"]) for m in tta.ensemble["members"]] == views
    assert {m["run_dir"] for m in tta.ensemble["members"]} == {str(trained.runs[RUN].resolve())}
    assert tta.metrics["forward_passes"] == len(views) == tta.metrics["num_members"]
    for split in ("val", "test"):
        s = tta.split(split)
        files = [split_files[split][k] for k in s.keys]
        per_view = [by_hand(trained.runs[RUN], files, size, flip) for size, flip in views]
        worst = float(np.abs(s.scores - np.mean(per_view, axis=0)).max())
        assert worst < TOLERANCE, (split, worst)
        # not a copy of the run: the views change the scores
        assert np.abs(s.scores - rundir.load_run(trained.runs[RUN]).split(split).scores).max() > 1e-3
        assert tta.metrics[split]["mAP"] == pytest.approx(metrics.mean_average_precision(s.scores, s.targets))
    # thresholds from the fused validation scores only
    val = tta.split("val")
    np.testing.assert_allclose(tta.thresholds, metrics.tune_thresholds(val.scores, val.targets))
    # the MLflow run
    info = MlflowClient(store).get_run(tta.tracking["run_id"])
    tags = info.data.tags
    assert tags["mlic.kind"] == "ensemble" and tags["mlic.ensemble_kind"] == "tta"
    assert tags["mlic.members"] == trained.run_ids[RUN]
    assert tags["mlic.tta_views"] == "32,32+flip,40,40+flip" == info.data.params["tta.views"]
    assert tags["mlflow.parentRunId"] == trained.parent_run_id
    assert info.data.metrics["test_mAP"] == pytest.approx(tta.metrics["test"]["mAP"])


def test_a_flip_view_mirrors_the_image(trained, split_files, tmp_path):
    """A left-right asymmetric image: the flip view's scores are the mirrored file's, not the
    image's own, and --tta flip fuses the two."""
    src = sorted(split_files["val"].values())[0]
    img = Image.open(src).convert("RGB")
    w, h = img.size
    img.paste((255, 0, 0), (0, 0, w // 3, h))                # a red band on the left only
    img.save(tmp_path / "left.png")
    img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "right.png")
    plain = Predictor(trained.runs[RUN])
    flip = Predictor(trained.runs[RUN], tta="flip")
    assert [(m.size, m.flip) for m in flip.members] == [(32, False), (32, True)]
    left, right = (plain([load_rgb((tmp_path / f).read_bytes())])[0] for f in ("left.png", "right.png"))
    assert np.abs(left - right).max() > 1e-3                   # the model sees the asymmetry
    fused = flip([load_rgb((tmp_path / "left.png").read_bytes())])[0]
    np.testing.assert_allclose(fused, (left + right) / 2, atol=1e-5)
    assert np.abs(fused - left).max() > 1e-4


def test_predict_of_the_tta_directory_is_predict_tta_of_the_run(trained, tta_dir, split_files, tmp_path):
    from mlic_dist.predict import main

    files = sorted(split_files["val"].values())
    assert main(["--run-dir", str(tta_dir), *map(str, files), "--out", str(tmp_path / "dir.jsonl")]) == 0
    assert main(["--run-dir", str(trained.runs[RUN]), "--tta", SPEC, *map(str, files),
                 "--out", str(tmp_path / "run.jsonl")]) == 0
    a, b = ([json.loads(line) for line in (tmp_path / f).read_text().splitlines()] for f in ("dir.jsonl", "run.jsonl"))
    assert len(a) == len(files)
    # the same probabilities, exactly; labels by each one's thresholds: the TTA directory's were
    # tuned on its fused validation scores, the run's (which predict --tta keeps) on its own
    assert [(r["file"], r["scores"], r["top_k"]) for r in a] == [(r["file"], r["scores"], r["top_k"]) for r in b]
    tta, run = rundir.load_run(tta_dir), rundir.load_run(trained.runs[RUN], splits=())
    assert not np.allclose(tta.thresholds, run.thresholds)
    val = tta.split("val")
    row = {k: i for i, k in enumerate(val.keys)}
    for ra, rb in zip(a, b):
        got = np.array([ra["scores"][c] for c in tta.classes])
        assert np.abs(got - val.scores[row[Path(ra["file"]).stem]]).max() < TOLERANCE   # its loaders' scoring
        for r, t in ((ra, tta.thresholds), (rb, run.thresholds)):
            clear = np.abs(got - t) > 1e-5                   # scores are rounded to 6 decimals
            assert {c for c, v, ti, ok in zip(tta.classes, got, t, clear) if ok and v >= ti} == \
                   {c for c, ok in zip(tta.classes, clear) if ok} & set(r["labels"])
    assert len(Predictor(tta_dir).members) == 4


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_tta_matches_predict(trained, tta_dir, split_files, tmp_path, fmt):
    files = sorted(split_files["val"].values())[:6]
    expected = Predictor(tta_dir)([load_rgb(f.read_bytes()) for f in files])            # (6, C)
    done = export_file(tta_dir, fmt, tmp_path / "tta.model")
    p = subprocess.run([sys.executable, "-m", "mlic_dist.export", "--run-dir", str(trained.runs[RUN]), "--tta", SPEC,
                        "--format", fmt, "--out", str(tmp_path / "run.model")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    from_run = json.loads(p.stdout)
    assert done["members"] == from_run["members"] == 4
    for path in (tmp_path / "tta.model", tmp_path / "run.model"):
        meta = read_metadata(path) if fmt == "torchscript" else None
        if fmt == "onnx":
            import onnxruntime as ort

            (tmp_path / "m.onnx").write_bytes(path.read_bytes())
            meta = read_metadata(tmp_path / "m.onnx")
            session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
            got = np.concatenate([session.run(None, {"images": load_rgb(f.read_bytes())[None].numpy()})[0]
                                  for f in files])
        else:
            module = torch.jit.load(str(path))
            with torch.no_grad():
                got = np.concatenate([module(load_rgb(f.read_bytes())[None]).numpy() for f in files])
        assert [(m["size"], m["flip"]) for m in meta["members"]] == [(32, False), (32, True), (40, False), (40, True)]
        worst = float(np.abs(got - expected).max())
        assert worst <= (ONNX_TOLERANCE if fmt == "onnx" else TORCHSCRIPT_TOLERANCE), (path.name, worst)


@pytest.mark.parametrize("spec, needle", [
    ("flop", "'flop' is neither 'flip' nor a size"),
    ("sizes=8,32", "size 8 is below 16"),
    ("flip,flip", "'flip' is given twice"),
    ("32,40,32", "size 32 is given twice"),
    ("48", "makes one view"),
])
def test_a_bad_spec_is_one_error_line(trained, tmp_path, capsys, spec, needle):
    from mlic_dist.export.__main__ import main as export_main
    from mlic_dist.predict import main as predict_main

    run = str(trained.runs[RUN])
    for main, args in ((predict_main, ["--run-dir", run, "--tta", spec, run]),
                       (ensemble_cli.main, ["--run-dirs", run, "--tta", spec, "--out", str(tmp_path / "x"),
                                            "--no-tracking"]),
                       (export_main, ["--run-dir", run, "--tta", spec, "--format", "onnx", "--out",
                                      str(tmp_path / "m.onnx")])):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --tta ") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists() and not (tmp_path / "m.onnx").exists()


def test_tta_takes_one_training_run(trained, tmp_path, capsys):
    for args, needle in (
        (["--run-dirs", trained.runs[RUN], trained.runs["m1-40-s0"], "--tta", "flip"], "takes one run, got 2"),
        (["--run-dirs", trained.runs[RUN], "--tta", "flip", "--weights", "2"], "no --select or --weights"),
    ):
        assert ensemble_cli.main([str(a) for a in args] + ["--no-tracking", "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
