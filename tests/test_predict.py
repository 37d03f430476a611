"""mlic_dist.predict on REAL trained runs (tests/ensemble_runs.py): the validation images written
out of the shard tars must get back the scores the trainer saved for them, for a run and for an
ensemble, with a broken file among them; other formats convert as the shard command does."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ensemble_runs import isolated_store, train_small_runs
from mlic_dist.ensemble import build as ensemble
from mlic_dist import rundir
from mlic_dist.predict import Predictor, predict_files

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.02   # max |probability difference| allowed for decoder differences (measured: ~1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_runs(tmp_path_factory.getbasetemp() / "ensemble-runs")


@pytest.fixture(scope="module")
def images(trained, tmp_path_factory):
    """The val split's JPEG bytes from the tars, as KEY.jpg files, plus a broken file."""
    out = tmp_path_factory.mktemp("val-images")
    manifest = json.loads((trained.shards / "manifest.json").read_text())
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(trained.shards / shard["file"]) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    (out / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    (out / "nested").mkdir()
    (out / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a JPEG")
    return out


@pytest.fixture(scope="module")
def scale_ensemble(trained, tmp_path_factory):
    """A weighted ensemble of the 32 px and 40 px runs (members at different input sizes)."""
    members = [ensemble.member_from_dir(trained.runs[n]) for n in ("m1-32-s0", "m1-40-s0")]
    return ensemble.build_ensemble(members, "manual", name="pair", weights=[2, 1],
                                   out=tmp_path_factory.mktemp("pred-ens") / "pair").path


def cli(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mlic_dist.predict", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def check_against_saved(records, run_dir, k=3):
    run = rundir.load_run(run_dir)
    val = run.split("val")
    row = {k: i for i, k in enumerate(val.keys)}
    good = [r for r in records if "error" not in r]
    assert sorted(Path(r["file"]).stem for r in good) == sorted(val.keys)       # every val image
    worst = 0.0
    for r in good:
        saved = val.scores[row[Path(r["file"]).stem]]
        got = np.array([r["scores"][c] for c in run.classes])
        worst = max(worst, float(np.abs(got - saved).max()))
        clear = np.abs(got - run.thresholds) > 1e-5          # scores are rounded to 6 decimals
        assert {c for c, v, t, ok in zip(run.classes, got, run.thresholds, clear) if ok and v >= t} == \
               {c for c, ok in zip(run.classes, clear) if ok} & set(r["labels"])
        assert [name for name, _ in r["top_k"]] == [run.classes[i] for i in np.argsort(-got, kind="stable")[:k]]
    assert worst < TOLERANCE, worst
    return worst


@pytest.mark.parametrize("which", ["run", "ensemble"])
def test_predict_reproduces_the_saved_validation_scores(trained, images, scale_ensemble, tmp_path, which):
    run_dir = trained.runs["m1-32-s0"] if which == "run" else scale_ensemble
    p = cli(["--run-dir", run_dir, images, "--out", tmp_path / "pred.jsonl", "--batch-size", "4"], tmp_path)
    assert p.returncode == 1, p.stderr                      # one unreadable image -> status 1
    assert "Traceback" not in p.stderr and "images/s" in p.stderr
    records = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    broken = [r for r in records if "error" in r]
    assert len(broken) == 1 and "broken.jpg" in broken[0]["file"] and "broken.jpg" in broken[0]["error"]
    check_against_saved(records, run_dir)


def test_a_bf16_run_keeps_fp32_scores_that_predict_reproduces(trained, images, tmp_path):
    """train.mixed_precision=bf16 (the default, CPU autocast included) trains and validates each
    epoch under autocast, but the scores the run keeps (and tunes its thresholds on) are scored in
    fp32, as predict computes them: predict gives them back to 1e-5 (bf16 scores: ~1e-4 off)."""
    from mlic_dist.config import load_config
    from mlic_dist.train.loop import train
    from shard_fixtures import tiny_run_overrides

    out = tmp_path / "bf16"
    cfg = load_config(None, tiny_run_overrides(trained.shards, out, **{
        "train.mixed_precision": "bf16", "train.epochs": 1, "tracking.enabled": "false"}))
    assert cfg.train.mixed_precision == "bf16"
    train(cfg)
    records = list(predict_files(Predictor(out), sorted(images.glob("*.jpg")), batch_size=4))
    worst = check_against_saved(records, out)
    assert worst < 1e-5, worst        # predict rounds scores to 6 decimals


def test_csv_output_and_mlflow_run_id(trained, images, tmp_path):
    store = isolated_store(trained, tmp_path / "store")
    good = sorted(images.glob("*.jpg"))
    p = cli(["--run", trained.run_ids["m1-40-s0"], "--tracking-uri", store, *good, "--format", "csv",
             "--top-k", "2"], tmp_path)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    run = rundir.load_run(trained.runs["m1-40-s0"])
    assert [Path(r["file"]) for r in rows] == good
    records = [{"file": r["file"], "scores": {c: float(r[c]) for c in run.classes},
                "labels": [x for x in r["labels"].split(";") if x],
                "top_k": [x.split(":") for x in r["top_k"].split(";")]} for r in rows]
    check_against_saved(records, trained.runs["m1-40-s0"], k=2)


def test_user_errors_exit_2_with_one_line(trained, images, tmp_path, capsys):
    from mlic_dist.predict import main

    (tmp_path / "no-images").mkdir()
    (tmp_path / "no-images" / "notes.txt").write_text("x")
    for args, needle in (
        (["--run-dir", tmp_path / "nope", images], "does not exist"),
        (["--run-dir", trained.runs["m1-32-s0"], tmp_path / "empty.d"], "does not exist"),
        (["--run-dir", trained.shards, images], "classes.json is missing"),
        (["--run-dir", trained.runs["m1-32-s0"], tmp_path / "no-images"], "no image found"),
        (["--run-dir", trained.runs["m1-32-s0"], images, "--top-k", "0"], "--top-k 0"),
    ):
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1, err


def _scores(predictor, files):
    out = {}
    for r in predict_files(predictor, files, batch_size=3):
        assert "error" not in r, r
        out[Path(r["file"]).name] = np.array(list(r["scores"].values()))
    return out


def test_png_gray_palette_cmyk_and_exif_rotated_inputs_convert_like_the_shards(trained, images, tmp_path):
    predictor = Predictor(trained.runs["m1-40-s0"])
    rgb = Image.open(sorted(images.glob("*.jpg"))[0]).convert("RGB")
    gray, palette = rgb.convert("L"), rgb.quantize(colors=64)
    rgba = rgb.copy()
    rgba.putalpha(255)
    rgb.save(tmp_path / "rgb.png")
    rgba.save(tmp_path / "rgba.png")
    gray.save(tmp_path / "gray.png")
    gray.convert("RGB").save(tmp_path / "gray_as_rgb.png")
    palette.save(tmp_path / "palette.png")
    palette.convert("RGB").save(tmp_path / "palette_as_rgb.png")
    rgb.convert("CMYK").save(tmp_path / "cmyk.tif")
    rgb.convert("CMYK").convert("RGB").save(tmp_path / "cmyk_as_rgb.png")
    exif = Image.Exif()
    exif[0x0112] = 6          # "rotate 90 CW to view": stored rotated the other way
    rgb.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.png", exif=exif)
    s = _scores(predictor, sorted(tmp_path.glob("*.*")))
    for name, reference in (("rgba.png", "rgb.png"), ("rotated.png", "rgb.png"), ("gray.png", "gray_as_rgb.png"),
                            ("palette.png", "palette_as_rgb.png"), ("cmyk.tif", "cmyk_as_rgb.png")):
        np.testing.assert_allclose(s[name], s[reference], atol=1e-6, err_msg=name)
    assert np.abs(s["gray.png"] - s["rgb.png"]).max() > 1e-4          # the conversions did change the input
    # the shard writer converts with the very rule predict decodes with (mlic_dist/images.py)
    from mlic_dist.data.transforms import load_rgb
    from mlic_dist.images import to_rgb
    from mlic_dist.shard import writer

    assert writer.to_rgb is to_rgb

    shard_view = np.asarray(to_rgb(Image.open(tmp_path / "rotated.png")))
    assert torch.equal(load_rgb((tmp_path / "rotated.png").read_bytes()).permute(1, 2, 0),
                       torch.from_numpy(shard_view.copy()))
    assert shard_view.shape == np.asarray(rgb).shape


def test_loaders_eval_batches_equal_predict_preprocessing(trained, images):
    """The torch and DALI loaders' eval path and predict resize with the one shared transform."""
    from dataclasses import replace

    from mlic_dist.data import build_loader
    from mlic_dist.data.normalize import Normalizer
    from mlic_dist.data.transforms import eval_resize, load_rgb

    cfg = rundir.load_run(trained.runs["m1-40-s0"]).cfg()
    keys = (trained.shards / "val-keys.txt").read_text().split()
    norm = Normalizer(cfg.data.normalize, "cpu")
    for loader in ("torch", "dali"):
        worst = 0.0
        for batch in build_loader(replace(cfg.data, loader=loader), "val", train=False):
            for img, i in zip(batch.images, batch.ids.tolist()):
                if i >= 0:
                    mine = norm(eval_resize(load_rgb((images / f"{keys[i]}.jpg").read_bytes()), cfg.data.size)[None])[0]
                    worst = max(worst, float((mine - img).abs().max()))
        assert worst < 1e-5, (loader, worst)


def test_records_follow_the_input_order_with_broken_files_between_good_ones(trained, images, tmp_path):
    """Issue 21 item 8: one record per image in input order (the arguments as given, a folder's
    images sorted by path), broken ones in their place, across batch boundaries with several
    decode threads; never the error records first."""
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    good = sorted(images.glob("*.jpg"))[:5]
    names = {"a-good.jpg": good[0], "B-broken.jpg": None, "c-good.png": good[1], "d-broken.jpg": None,
             "sub/e-good.jpg": good[2], "zz-good.jpg": good[3]}
    for name, src in names.items():
        (folder / name).write_bytes(src.read_bytes() if src else b"not an image")
    (folder / "notes.txt").write_text("not an image suffix: skipped")
    extra_broken = tmp_path / "0-first-broken.jpg"        # given after the folder: stays after it
    extra_broken.write_bytes(b"\xff\xd8 cut")
    extra_good = tmp_path / "1-good.jpg"
    extra_good.write_bytes(good[4].read_bytes())
    out = tmp_path / "preds.jsonl"
    r = cli(["--run-dir", trained.runs["m1-32-s0"], folder, extra_broken, extra_good, "--out", out,
             "--batch-size", "2", "--workers", "3"], tmp_path)
    assert r.returncode == 1, r.stderr                     # some images could not be read
    records = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [folder / n for n in sorted(names, key=lambda n: str(folder / n))] + [extra_broken, extra_good]
    assert [r["file"] for r in records] == [str(p) for p in expected]
    broken = {str(folder / n) for n, src in names.items() if src is None} | {str(extra_broken)}
    assert {r["file"] for r in records if "error" in r} == broken
