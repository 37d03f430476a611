"""Distillation (mlic_dist/distill, mlic_dist/train/teacher.py) on real runs: the teacher's cached
probabilities against predict's, the blended targets on real batches (and the soft OR under
mixup), alpha=0 against plain training, a student pulled towards a distinctive teacher, a cache
for other shards or classes refused in one line, the MLflow tags, and a 2-process torchrun."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_runs import isolated_store, overrides as run_overrides, train_small_runs
from mlic_dist.config import load_config
from mlic_dist.train import teacher as cache_format
from shard_fixtures import build_small_shards, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_runs(tmp_path_factory.getbasetemp() / "ensemble-runs")


@pytest.fixture(scope="module")
def ensemble_teacher(trained, tmp_path_factory):
    """A fused teacher of two sizes (32 and 40 px), weights 2:1 (no MLflow run of its own)."""
    from mlic_dist.ensemble.build import build_ensemble
    from mlic_dist.ensemble.members import member_from_dir

    members = [member_from_dir(trained.runs["m1-32-s0"]), member_from_dir(trained.runs["m1-40-s0"])]
    out = tmp_path_factory.mktemp("teacher") / "ens"
    build_ensemble(members, "manual", name="ens", weights=[2, 1], out=out)
    return out


def student_overrides(trained, out, uri=None, **extra):
    tracking = {"tracking.uri": uri, "tracking.experiment": "distill"} if uri else {"tracking.enabled": False}
    return run_overrides(trained.shards, out, "none", 32, "M1", 0, None, epochs=1) + \
        [f"{k}={v}" for k, v in {**tracking, **extra}.items()]


@pytest.fixture(scope="module")
def distilled(trained, ensemble_teacher, tmp_path_factory):
    """A student of the ensemble, distilled in this process and logged to a copy of the store."""
    from mlic_dist.distill import distill

    base = tmp_path_factory.mktemp("student")
    uri = isolated_store(trained, base / "store")
    out = base / "run"
    result = distill(ensemble_teacher, load_config(None, student_overrides(trained, out, uri)))
    return out, uri, result


def train_images(shards: Path) -> dict:
    """{key: JPEG bytes} of the training split, read from the tars themselves."""
    out = {}
    for tar in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar) as t:
            for member in t.getmembers():
                if member.name.endswith(".jpg"):
                    out[member.name[: -len(".jpg")]] = t.extractfile(member).read()
    return out


def test_cached_teacher_is_predicts_fused_scores_on_the_training_images(trained, ensemble_teacher, distilled):
    from mlic_dist.data.transforms import load_rgb
    from mlic_dist.predict import Predictor

    out, _, result = distilled
    cache = cache_format.read_cache(out / "teacher" / "train.npy")
    keys = (trained.shards / "train-keys.txt").read_text().splitlines()
    assert cache.keys == keys and cache.probs.shape == (48, 4)
    # predict: each member at its own size, fused 2:1, on the same JPEGs, decoded its own way
    images = train_images(trained.shards)
    predictor = Predictor(ensemble_teacher)
    assert [m.size for m in predictor.members] == [32, 40] and [m.weight for m in predictor.members] == [2.0, 1.0]
    expected = predictor([load_rgb(images[k]) for k in keys])
    np.testing.assert_allclose(cache.probs, expected, atol=1e-5, rtol=0)
    alone = Predictor(trained.runs["m1-32-s0"])([load_rgb(images[k]) for k in keys])
    assert np.abs(cache.probs - alone).max() > 1e-3        # both members are in it, not the first alone
    members = json.loads((ensemble_teacher / "ensemble.json").read_text())["members"]
    assert cache.meta["members"][0]["run_id"] == members[0]["run_id"] and cache.meta["teacher_kind"] == "manual"
    assert result["forward_passes"] == 1 and result["distill"]["teacher_members"] == 2
    assert result["distill"]["cache"] == str((out / "teacher" / "train.npy").resolve())


def test_the_student_is_a_tagged_run_in_mlflow(trained, ensemble_teacher, distilled):
    from mlflow.tracking import MlflowClient

    out, uri, _ = distilled
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    tags = run.data.tags
    assert tags["mlic.kind"] == "single" and tags["mlic.derived"] == "distill"
    assert tags["mlic.teacher"] == str(ensemble_teacher.resolve())     # the ensemble has no MLflow run
    assert tags["mlic.teacher_members"] == f"{trained.run_ids['m1-32-s0']},{trained.run_ids['m1-40-s0']}"
    assert run.data.params["distill.alpha"] == "0.5" and run.info.status == "FINISHED"
    assert json.loads((out / "metrics.json").read_text())["distill"]["alpha"] == 0.5


def _loader(trained, augment):
    from mlic_dist.data import build_loader

    cfg = load_config(None, tiny_run_overrides(trained.shards, "unused", **{"data.augment": augment}))
    return cfg, build_loader(cfg.data, "train", train=True, rank=0, world_size=1, device="cpu", seed=0)


@pytest.mark.parametrize("augment,epoch", [("M2", 0), ("M3", 1)])
def test_blended_targets_are_exact_on_real_batches_and_soft_or_under_mixup(trained, augment, epoch):
    from mlic_dist.data.labels import read_split_labels

    _, labels = read_split_labels(trained.shards, "train")
    positive = (labels != 0).astype(np.float32)                  # data.difficult=positive
    teacher = np.random.default_rng(0).random((48, 4), dtype=np.float32)
    cfg, loader = _loader(trained, augment)
    loader.set_epoch(epoch)
    alpha = 0.3
    for batch in loader:
        ids = batch.ids.numpy()
        if augment == "M3":    # the pairing the loader exposes is the one it mixed the labels with
            partner = batch.partner.numpy()
            assert (partner != np.arange(len(ids))).all()
            np.testing.assert_array_equal(batch.targets.numpy(), np.maximum(positive[ids], positive[ids[partner]]))
            t = np.maximum(teacher[ids], teacher[ids[partner]])   # the soft OR of the pair
        else:
            assert batch.partner is None
            np.testing.assert_array_equal(batch.targets.numpy(), positive[ids])
            t = teacher[ids]
        got = cache_format.blend_targets(batch.targets, batch.mask, batch.ids, batch.partner,
                                         torch.from_numpy(teacher), alpha).numpy()
        y = batch.targets.numpy()
        want = np.where(batch.mask.numpy() > 0, np.float32(1 - alpha) * y + np.float32(alpha) * t, y)
        np.testing.assert_allclose(got, want, atol=1e-7, rtol=0)
        assert np.abs(got - y).max() > 0.01       # the teacher moved the targets


def test_padding_ids_keep_their_labels():
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = cache_format.blend_targets(targets, torch.ones(2, 2), torch.tensor([0, -1]), None,
                                     torch.tensor([[0.5, 0.5], [0.25, 0.25]]), 0.5)
    np.testing.assert_array_equal(got.numpy(), [[0.75, 0.25], [0.0, 1.0]])


def _history(out: Path) -> list:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_alpha_zero_trains_exactly_as_plain_training(trained, ensemble_teacher, distilled, tmp_path):
    from mlic_dist.train.loop import train

    common = {"data.augment": "M3", "train.epochs": 2}    # epoch 1 mixes: the partner path runs
    plain, student = tmp_path / "plain", tmp_path / "student"
    train(load_config(None, student_overrides(trained, plain, **common)))
    cache = distilled[0] / "teacher" / "train.npy"
    train(load_config(None, student_overrides(trained, student, **common, **{
        "distill.teacher_scores": cache, "distill.alpha": 0.0})))
    keys = ("train_loss", "val_loss", "val_mAP")
    assert [[h[k] for k in keys] for h in _history(plain)] == [[h[k] for k in keys] for h in _history(student)]
    a, b = (torch.load(d / "best_model.pt", weights_only=True) for d in (plain, student))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... and alpha > 0 does change the run (the teacher reaches the loss)
    other = tmp_path / "alpha"
    train(load_config(None, student_overrides(trained, other, **common, **{"distill.teacher_scores": cache})))
    assert _history(other)[0]["train_loss"] != _history(plain)[0]["train_loss"]


def test_a_student_learns_towards_a_distinctive_teacher(trained, tmp_path):
    """The teacher contradicts the labels of class 0 (1 - label); trained towards it, the student's
    train-image scores of class 0 end closer to it than a plain run's do."""
    from mlic_dist.data.labels import read_split_labels
    from mlic_dist.distill.teacher import load_teacher, teacher_probabilities
    from mlic_dist.train.distributed import build_accelerator
    from mlic_dist.train.loop import train

    keys, labels = read_split_labels(trained.shards, "train")
    teacher = (labels != 0).astype(np.float32)
    teacher[:, 0] = 1 - teacher[:, 0]
    cache = tmp_path / "teacher" / "train.npy"
    cache_format.write_cache(cache, teacher, keys, {"classes": json.loads((trained.shards / "manifest.json")
                                                                          .read_text())["classes"]})
    common = {"train.epochs": 4, "schedule.name": "none"}
    runs = {"plain": {}, "student": {"distill.teacher_scores": cache, "distill.alpha": 1.0}}
    distance = {}
    for name, extra in runs.items():
        cfg = load_config(None, student_overrides(trained, tmp_path / name, **common, **extra))
        train(cfg)
        scores = teacher_probabilities(load_teacher(tmp_path / name), cfg, build_accelerator(cfg))
        distance[name] = float(np.abs(scores[:, 0] - teacher[:, 0]).mean())
    assert distance["student"] < distance["plain"] - 0.05, distance


def _cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _one_error_line(p) -> str:
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    return line


def test_a_cache_for_other_shards_or_classes_is_one_error_line(trained, distilled, tmp_path):
    cache = distilled[0] / "teacher" / "train.npy"
    other = build_small_shards(tmp_path / "other", n_train=48, n_val=14, n_test=12, num_classes=4,
                               samples_per_shard=9, seed=3)            # the same sizes, other images
    p = _cli([sys.executable, "-m", "mlic_dist.train", *student_overrides(trained, tmp_path / "a", **{
        "data.shards": other, "distill.teacher_scores": cache})], tmp_path)
    line = _one_error_line(p)
    assert f"distill.teacher_scores={str(cache)!r}" in line and "train-keys.txt" in line and "other shards" in line
    assert not (tmp_path / "a" / "checkpoints").exists()
    # a cache whose classes are not the shards'
    wrong = tmp_path / "wrong" / "train.npy"
    c = cache_format.read_cache(cache)
    cache_format.write_cache(wrong, c.probs, c.keys, {**c.meta, "classes": ["a", "b", "c", "d"]})
    p = _cli([sys.executable, "-m", "mlic_dist.train", *student_overrides(trained, tmp_path / "b", **{
        "distill.teacher_scores": wrong})], tmp_path)
    line = _one_error_line(p)
    assert "classes ['a', 'b', 'c', 'd']" in line and "python -m mlic_dist.distill" in line


def test_a_tta_teacher_is_refused_and_a_run_teacher_is_named_by_its_mlflow_run(trained, ensemble_teacher, tmp_path):
    import shutil

    tta = tmp_path / "tta"
    shutil.copytree(ensemble_teacher, tta)
    doc = json.loads((tta / "ensemble.json").read_text())
    (tta / "ensemble.json").write_text(json.dumps({**doc, "kind": "tta"}))
    p = _cli([sys.executable, "-m", "mlic_dist.distill", "--teacher", str(tta),
              *student_overrides(trained, tmp_path / "s")], tmp_path)
    line = _one_error_line(p)
    assert str(tta) in line and "'tta'" in line and "scale, distr, greedy, manual" in line
    # a single run as the teacher, from the command line: its MLflow run id is the tag
    uri = isolated_store(trained, tmp_path / "store")
    args = [sys.executable, "-m", "mlic_dist.distill", "--teacher", str(trained.runs["m1-32-s0"]),
            "--config", str(ROOT / "configs/recipes/wang.yaml"), *student_overrides(trained, tmp_path / "one", uri)]
    p = _cli(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "teacher probabilities: 48 training images x 1 member(s)" in p.stdout
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("distill").experiment_id])
    assert run.data.tags["mlic.teacher"] == trained.run_ids["m1-32-s0"]
    assert run.data.tags["mlic.teacher_members"] == trained.run_ids["m1-32-s0"]
    # the same command again (a resume): the cache is reused, not recomputed
    p = _cli(args, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "teacher probabilities: reusing" in p.stdout
    # a matrix the .json does not name (an overwrite cut before its .json) is never reused; and a
    # student whose checkpoints trained on another matrix is not resumed on a new one
    cache = tmp_path / "one" / "teacher" / "train.npy"
    np.save(cache, np.ascontiguousarray(np.load(cache)[::-1]))
    p = _cli(args, tmp_path)
    line = _one_error_line(p)
    assert "checkpoints trained on another teacher's" in line and "new train.output_dir" in line


@pytest.mark.dist
def test_torchrun_two_processes_split_the_teacher_and_train(trained, ensemble_teacher, distilled, tmp_path, free_port):
    out = tmp_path / "run"
    p = _cli([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port), "-m", "mlic_dist.distill", "--teacher", str(ensemble_teacher),
              *student_overrides(trained, out)], tmp_path, timeout=400)
    assert p.returncode == 0, p.stderr[-5000:]
    single = cache_format.read_cache(distilled[0] / "teacher" / "train.npy")
    both = cache_format.read_cache(out / "teacher" / "train.npy")
    assert both.keys == single.keys
    np.testing.assert_allclose(both.probs, single.probs, atol=1e-6, rtol=0)
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["forward_passes"] == 1 and m["distill"]["teacher_members"] == 2
