"""The trainer end to end on real shards: single process, accelerate launch, 2-process DDP with
torchrun (gloo), SIGKILL mid-epoch and resume, MLflow down, early stopping and schedules."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mlic_dist.config import load_config
from mlic_dist.errors import UserError
from shard_fixtures import build_small_shards, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_small_shards(tmp_path_factory.mktemp("shards"), n_train=48, n_val=14, n_test=12,
                              num_classes=4, samples_per_shard=9)


def overrides(shards, out, **extra):
    return tiny_run_overrides(shards, out, **{"tracking.uri": f"sqlite:///{Path(out).parent / 'mlflow.db'}",
                                              "tracking.experiment": "test", **extra})


def run_cli(cmd, cwd, timeout=300, env=None):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{cmd}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-5000:]}"
    return p


def assert_run_dir(out: Path, n_val: int, n_test: int, c: int = 4):
    for f in ("config.yaml", "classes.json", "thresholds.json", "metrics.json", "history.jsonl", "best_model.pt"):
        assert (out / f).is_file(), f
    assert np.load(out / "scores_val.npy").shape == (n_val, c)
    assert np.load(out / "scores_test.npy").shape == (n_test, c)
    assert len((out / "keys_test.txt").read_text().split()) == n_test
    m = json.loads((out / "metrics.json").read_text())
    assert {"mAP", "top3", "thresh", "per_class"} <= set(m["val"]) and "test" in m
    assert set(json.loads((out / "thresholds.json").read_text())) == set(json.loads((out / "classes.json").read_text()))
    return m


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_train_in_process_writes_everything_and_tracks_to_mlflow(shards, tmp_path, loader):
    from mlflow.tracking import MlflowClient

    from mlic_dist.train.loop import train

    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs/recipes/wang.yaml", overrides(shards, out, **{"data.loader": loader}))
    result = train(cfg)
    m = assert_run_dir(out, 14, 12)
    assert m["epochs_run"] == 2 and result["val"]["mAP"] == m["val"]["mAP"]
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.data.params["data.loader"] == loader and run.data.params["optim.head_lr"] == "0.1"
    assert len(client.get_metric_history(run.info.run_id, "val_mAP")) == 2
    assert "test_mAP" in run.data.metrics and run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "scores_test.npy"}


def test_learns_the_fixture_task(shards, tmp_path):
    from mlic_dist.train.loop import train

    cfg = load_config(None, overrides(shards, tmp_path / "run", **{
        "train.epochs": 6, "optim.name": "adam", "optim.lr": 0.01, "optim.head_lr": 0.01,
        "schedule.name": "none", "data.augment": "M1", "tracking.enabled": False}))
    result = train(cfg)
    history = [json.loads(line) for line in (tmp_path / "run/history.jsonl").read_text().splitlines()]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result["val"]["mAP"] > 0.6  # chance is about the positive rate (~0.35)


def test_accelerate_launch_cpu(shards, tmp_path):
    out = tmp_path / "run"
    run_cli([str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mlic_dist.train",
             "--config", str(ROOT / "configs/recipes/wang.yaml"),
             *overrides(shards, out, **{"train.epochs": 1, "tracking.enabled": False})], cwd=tmp_path)
    assert_run_dir(out, 14, 12)


@pytest.mark.dist
@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_torchrun_two_process_ddp_stays_in_sync_and_scores_each_sample_once(shards, tmp_path, loader, free_port):
    from mlic_dist.data import build_loader
    from mlic_dist.models import create_model
    from mlic_dist.train.distributed import param_digest

    out = tmp_path / "run"
    run_cli([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port), "-m", "mlic_dist.train",
             *overrides(shards, out, **{"tracking.enabled": False, "data.loader": loader,
                                        "train.ema_decay": 0.8})], cwd=tmp_path)
    m = assert_run_dir(out, 14, 12)
    assert m["world_size"] == 2
    # Both ranks agreed on the parameters and on the weight EMA (train.py gathers a digest per rank
    # and raises otherwise); the last epoch's weights and EMA are in the newest checkpoint.
    cfg = load_config(None, overrides(shards, out, **{"data.loader": loader}))
    model = create_model("tiny_cnn", 4)
    state = torch.load(sorted((out / "checkpoints").glob("e*"))[-1] / "state.pt", weights_only=True)
    model.load_state_dict(state["model"])
    assert param_digest(model) == m["param_digest"]
    from mlic_dist.train.ema import build_ema, digest

    ema = build_ema(model, 0.8, "cpu")
    ema.load_state_dict(state["ema"])   # rank 0's, which every rank holds after training
    assert digest(ema) == m["ema_digest"] and param_digest(ema.module) != m["param_digest"]
    # The gathered val scores equal a single-process pass over the split, row by row in id order.
    model.load_state_dict(torch.load(out / "best_model.pt", weights_only=True))
    model.eval()
    loader = build_loader(cfg.data, "val", train=False, rank=0, world_size=1, device=torch.device("cpu"), seed=0)
    ref = np.zeros((14, 4), np.float32)
    seen = []
    with torch.no_grad():
        for b in loader:
            keep = b.ids >= 0
            ref[b.ids[keep].numpy()] = torch.sigmoid(model(b.images[keep])).numpy()
            seen += b.ids[keep].tolist()
    assert sorted(seen) == list(range(14))
    np.testing.assert_allclose(np.load(out / "scores_val.npy"), ref, atol=1e-5)


@pytest.mark.parametrize("loader,ema", [("torch", 0.0), ("dali", 0.0), ("torch", 0.7)])
def test_sigkill_mid_epoch_then_resume_matches_an_unbroken_run(shards, tmp_path, loader, ema):
    common = {"train.epochs": 4, "train.checkpoint_every_steps": 2, "tracking.enabled": False,
              "data.loader": loader, "data.augment": "M3",  # random crops, flips and mixup must replay
              "model.dropout": 0.3,                          # and so must dropout's RNG stream
              "train.ema_decay": ema}                        # and the weight EMA (saved mid-epoch)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    cmd = [sys.executable, "-m", "mlic_dist.train"]
    run_cli(cmd + overrides(shards, ref_out, **common), cwd=tmp_path)

    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd + overrides(shards, out, **common), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "checkpoints" / "e0001-s0000002"  # mid-way through the second epoch
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists() and not (out / "metrics.json").exists(), "the run ended before it could be killed"

    p = run_cli(cmd + overrides(shards, out, **common), cwd=tmp_path)
    assert "resumed from" in p.stdout
    # the interrupted epoch's numbers cover the whole epoch, not just the part after the resume
    ref_h, got_h = ([json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()]
                    for d in (ref_out, out))
    assert [h["train_loss"] for h in got_h] == pytest.approx([h["train_loss"] for h in ref_h], rel=1e-6)
    ref, got = json.loads((ref_out / "metrics.json").read_text()), json.loads((out / "metrics.json").read_text())
    assert got["val"]["mAP"] == pytest.approx(ref["val"]["mAP"], abs=1e-9)
    assert got["test"]["mAP"] == pytest.approx(ref["test"]["mAP"], abs=1e-9)
    assert got["param_digest"] == ref["param_digest"]
    np.testing.assert_allclose(np.load(out / "scores_test.npy"), np.load(ref_out / "scores_test.npy"), atol=1e-7)
    if ema:
        assert got["ema_digest"] == ref["ema_digest"] and got["best_source"] == ref["best_source"]
        hist = [[json.loads(line)[k] for line in (d / "history.jsonl").read_text().splitlines()]
                for d in (ref_out, out) for k in ("val_mAP_ema", "val_loss_ema")]
        assert hist[0] == hist[2] and hist[1] == hist[3]


def test_dead_mlflow_server_does_not_stop_training(shards, tmp_path, free_port):
    from mlic_dist.train.loop import train

    cfg = load_config(None, overrides(shards, tmp_path / "run", **{"train.epochs": 1,
                                                                   "tracking.uri": f"http://127.0.0.1:{free_port}"}))
    with pytest.warns(UserWarning, match="MLflow"):
        train(cfg)
    assert_run_dir(tmp_path / "run", 14, 12)


def test_early_stopping_plateau_and_best_checkpoint_follow_validation(shards, tmp_path, monkeypatch):
    """Scripted validation losses drive the real loop: plateau (patience 2) halves the lr after the
    3rd bad epoch, early stopping (4) ends the run, the best epoch has the lowest loss."""
    import mlic_dist.train.loop as T

    losses = iter([1.0, 0.8, 0.9, 0.85, 0.95, 0.99])
    real = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda run, loader, labels, **kw: {**real(run, loader, labels), "loss": next(losses)})
    cfg = load_config(ROOT / "configs/recipes/advanced_cnn.yaml", overrides(shards, tmp_path / "run", **{
        "model.backbone": "tiny_cnn", "data.size": 32, "train.epochs": 10, "train.early_stopping": 4,
        "tracking.enabled": False}))
    result = T.train(cfg)
    history = [json.loads(line) for line in (tmp_path / "run/history.jsonl").read_text().splitlines()]
    assert [h["val_loss"] for h in history] == [1.0, 0.8, 0.9, 0.85, 0.95, 0.99]
    assert result["best_epoch"] == 1 and result["epochs_run"] == 6
    # The stop is part of the checkpoint: running the command again trains no further epoch
    # (the scripted losses are used up, so another epoch would raise StopIteration).
    again = T.train(cfg)
    assert again["epochs_run"] == 6 and again["val"]["mAP"] == pytest.approx(result["val"]["mAP"])
    # each epoch records the lr it trained with; the decay after epoch 4 shows in epoch 5
    assert [h["lr"] for h in history] == pytest.approx([1e-3] * 5 + [5e-4])


def test_step_schedule_decays_after_step_epochs(shards, tmp_path):
    from mlic_dist.train.loop import train

    cfg = load_config(ROOT / "configs/recipes/wang.yaml", overrides(shards, tmp_path / "run", **{
        "train.epochs": 3, "schedule.step_epochs": 2, "train.max_steps_per_epoch": 1, "tracking.enabled": False}))
    train(cfg)
    history = [json.loads(line) for line in (tmp_path / "run/history.jsonl").read_text().splitlines()]
    assert [h["lr"] for h in history] == pytest.approx([0.01, 0.01, 0.001])
    assert [h["head_lr"] for h in history] == pytest.approx([0.1, 0.1, 0.01])


def test_bad_config_and_missing_shards_are_clear_errors(tmp_path):
    p = subprocess.run([sys.executable, "-m", "mlic_dist.train", "data.sise=3"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2 and "data.sise" in p.stderr and "Traceback" not in p.stderr
    from mlic_dist.train.loop import train

    with pytest.raises(Exception, match="manifest"):
        train(load_config(None, [f"data.shards={tmp_path / 'nowhere'}", "tracking.enabled=false",
                                 "data.loader=torch", f"train.output_dir={tmp_path / 'o'}"]))


def test_best_model_follows_the_checkpoint_after_a_crash_between_them(shards, tmp_path):
    """A new best is a candidate file until the checkpoint naming it is written; a crash in
    between must not leave a best_model.pt the trainer state does not describe."""
    from mlic_dist.train.loop import train

    out = tmp_path / "run"
    cfg = load_config(None, overrides(shards, out, **{"tracking.enabled": False}))
    first = train(cfg)
    best = torch.load(out / "best_model.pt", weights_only=True)
    # the crash: a later epoch's candidate written, best_model.pt half-published, no checkpoint
    zeros = {k: torch.zeros_like(v) for k, v in best.items()}
    torch.save(zeros, out / "checkpoints" / "best-e0009.pt")
    torch.save(zeros, out / "best_model.pt")
    again = train(cfg)  # resume=auto: nothing left to train, finalize again
    assert not (out / "checkpoints" / "best-e0009.pt").exists()
    restored = torch.load(out / "best_model.pt", weights_only=True)
    assert all(torch.equal(best[k], restored[k]) for k in best)
    assert again["test"]["mAP"] == pytest.approx(first["test"]["mAP"])


def test_resume_never_refuses_a_used_output_dir(shards, tmp_path):
    from mlic_dist.train.loop import train

    out = tmp_path / "run"
    train(load_config(None, overrides(shards, out, **{"train.epochs": 1, "tracking.enabled": False})))
    with pytest.raises(UserError, match="already holds a run"):
        train(load_config(None, overrides(shards, out, **{"train.resume": "never", "tracking.enabled": False})))


def test_unwrap_strips_ddp_and_compile_in_either_order(free_port):
    import torch.distributed as dist
    from accelerate.utils import extract_model_from_parallel
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mlic_dist.train.distributed import unwrap

    class Acc:  # the one Accelerator method unwrap() uses
        unwrap_model = staticmethod(extract_model_from_parallel)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1)
    try:
        net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        for wrapped in (DDP(torch.compile(net)), torch.compile(DDP(net)), DDP(net), torch.compile(net)):
            assert list(unwrap(Acc, wrapped).state_dict()) == ["0.weight", "0.bias"]
    finally:
        dist.destroy_process_group()


def _cli(args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_divergence_is_named_at_the_step_not_discovered_in_validation(shards, tmp_path):
    """lr=1e30: the weights explode after the first step. Before: the epoch trained on NaN and the
    run died in validation with "scores has non-finite values"."""
    out = tmp_path / "run"
    p = _cli([sys.executable, "-m", "mlic_dist.train", *overrides(shards, out, **{
        "optim.lr": 1e30, "optim.head_lr": 1e30, "train.epochs": 3, "train.max_nonfinite_steps": 3,
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})], tmp_path)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "non-finite values" not in p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")][-1]
    assert "training diverged at epoch 0, step " in line and "non-finite for 3 optimizer steps in a row" in line
    assert "no good checkpoint" in line and "optim.lr" in line
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED" and "diverged" in run.data.tags["mlic.failure"]


def test_divergence_after_a_good_epoch_names_that_checkpoint(shards, tmp_path, monkeypatch):
    import mlic_dist.train.loop as T

    real = T.train_one_epoch

    def poisoned(run, epoch):  # epoch 1 computes NaN gradients at every step
        if epoch == 1:
            for p_ in run.model.parameters():
                p_.register_hook(lambda g: g * float("nan"))
        return real(run, epoch)

    monkeypatch.setattr(T, "train_one_epoch", poisoned)
    out = tmp_path / "run"
    with pytest.raises(T.DivergenceError) as e:  # a checkpoint every step, only one kept
        T.train(load_config(None, overrides(shards, out, **{
            "train.epochs": 3, "tracking.enabled": False, "train.max_nonfinite_steps": 4,
            "train.checkpoint_every_steps": 1, "train.keep_checkpoints": 1})))
    good = out / "checkpoints" / "e0001-s0000000"
    assert "epoch 1, step 4" in str(e.value) and str(good) in str(e.value)
    # the named checkpoint survived the pruning of the checkpoints written during the streak
    assert good.is_dir()
    # the skipped steps never reached the weights: one written during the streak (after 3 of
    # the 4 NaN steps) holds exactly the good checkpoint's parameters (BatchNorm's running
    # statistics come from the forward passes, which were finite, and do move)
    during = torch.load(out / "checkpoints" / "e0001-s0000003" / "state.pt", weights_only=True)["model"]
    before = torch.load(good / "state.pt", weights_only=True)["model"]
    params = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) == 10 and all(torch.equal(during[k], before[k]) for k in params)


@pytest.mark.parametrize("case", ["missing shards", "unwritable output", "unknown backbone", "bad value"])
def test_user_errors_are_one_line_with_status_2(shards, tmp_path, case):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    extra, needle = {
        "missing shards": ({"data.shards": tmp_path / "nowhere"}, "nowhere"),
        "unwritable output": ({"train.output_dir": blocker / "run"}, "cannot be created"),
        "unknown backbone": ({"model.backbone": "resnet1001"}, "resnet1001"),
        "bad value": ({"data.augment": "M9"}, "data.augment='M9'"),
    }[case]
    p = _cli([sys.executable, "-m", "mlic_dist.train", *overrides(shards, tmp_path / "run", **extra)], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0]


def torchrun_failures(stderr: str) -> list[tuple[int, str]]:
    """(exitcode, traceback line) of each rank in torchrun's failure summary."""
    codes = [int(m) for m in re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", stderr, re.M)]
    lines = [ln.strip()[len("traceback :"):].strip() for ln in stderr.splitlines()
             if ln.strip().startswith("traceback :")]
    return list(zip(codes, lines))


@pytest.mark.dist
def test_a_user_error_ends_every_rank_cleanly(shards, tmp_path, free_port):
    """No rank waits at a barrier for one that failed: each prints the error and exits 2, or is
    stopped by torchrun (SIGTERM) when another rank failed first; none hangs."""
    p = _cli([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port), "-m", "mlic_dist.train",
              *overrides(shards, tmp_path / "run", **{"model.backbone": "resnet1001"})], tmp_path, timeout=120)
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:") and "resnet1001" in ln]
    failures = torchrun_failures(p.stderr)
    assert len(failures) == 2 and 1 <= len(errors) <= 2, p.stderr[-3000:]
    assert all((code == 2 and "resnet1001" in line) or code == -15 for code, line in failures), failures
    # each exit 2 printed its line; a rank SIGTERMed while exiting may have printed its own too
    assert 1 <= len([code for code, _ in failures if code == 2]) <= len(errors)


def test_inputs_are_checked_before_the_process_group_exists(shards, tmp_path, monkeypatch):
    """Missing shards, an unknown backbone, a missing weight file: UserError before
    `build_accelerator` (the process group) is ever called."""
    from mlic_dist.train import loop

    def no_accelerator(cfg):
        raise AssertionError("build_accelerator reached before the inputs were checked")

    monkeypatch.setattr(loop, "build_accelerator", no_accelerator)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))   # no ImageNet file here
    for extra, needle in (({"data.shards": tmp_path / "nowhere"}, "nowhere"),
                          ({"model.backbone": "resnet18", "model.pretrained": "imagenet"}, "TORCH_HOME"),
                          ({"model.backbone": "resnet1001"}, "resnet1001"),
                          ({"model.backbone": "resnet18", "model.pretrained": tmp_path / "w.pt"}, "w.pt"),
                          ({"data.test_split": "tset"}, "tset")):
        cfg = load_config(None, overrides(shards, tmp_path / "run", **{"tracking.enabled": False, **extra}))
        with pytest.raises(UserError, match=needle):
            loop.build_run(cfg)


@pytest.mark.dist
@pytest.mark.parametrize("case", ["bad value", "missing shards"])
def test_torchrun_user_error_is_one_line_per_rank_and_in_the_summary(shards, tmp_path, free_port, case):
    """docs/training.md, "Errors": under torchrun each rank prints `error: ...` and exits 2
    before any rendezvous of its own; torchrun's summary shows that line (the worker's
    TORCHELASTIC_ERROR_FILE) instead of "To enable traceback", and torchrun exits 1."""
    extra, needle = {"bad value": ({"data.augment": "M9"}, "data.augment='M9'"),
                     "missing shards": ({"data.shards": tmp_path / "nowhere"}, "nowhere/manifest.json does not exist")}[case]
    p = _cli([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port), "-m", "mlic_dist.train",
              *overrides(shards, tmp_path / "run", **{"tracking.enabled": False, **extra})], tmp_path, timeout=240)
    err = p.stderr
    assert p.returncode == 1, err[-3000:]                       # torchrun's own status for a failed child
    lines = err.splitlines()
    printed = [ln for ln in lines if ln.startswith("error:")]
    assert 1 <= len(printed) <= 2 and all(needle in ln for ln in printed), err[-3000:]
    failures = torchrun_failures(err)   # a rank torchrun stopped first (SIGTERM) printed nothing
    assert len(failures) == 2 and all((code == 2 and line == printed[0]) or code == -15
                                      for code, line in failures), failures
    assert "To enable traceback" not in err
    root = torchrun_failures(err[err.index("Root Cause"):])
    assert root == [(2, printed[0])], root                      # our status and line, in torchrun's summary
    frames = [ln for ln in lines if ln.strip().startswith('File "')]
    assert frames and not [f for f in frames if "mlic_dist" in f], frames   # torchrun's frames only
    assert not (tmp_path / "run").exists()                     # nothing started


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_a_garbled_jpeg_stops_training_with_its_shard_and_key(shards, tmp_path, loader):
    import shutil

    from shard_fixtures import garble_sample

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    tar, key = garble_sample(data, "train", shard=1, sample=2)
    p = _cli([sys.executable, "-m", "mlic_dist.train", *overrides(data, tmp_path / "run", **{
        "data.loader": loader, "tracking.enabled": False, "train.epochs": 1})], tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert tar.name in line and key in line and "shard verify" in line


def test_chance_map_is_recorded_beside_map_in_metrics_history_and_mlflow(shards, tmp_path, capsys):
    """The chance level (metrics.chance_mean_average_precision of the split's labels) in
    metrics.json's val/test, every epoch's record, the printed lines and MLflow."""
    from mlflow.tracking import MlflowClient

    from mlic_dist import metrics
    from mlic_dist.train.loop import train

    out = tmp_path / "run"
    cfg = load_config(None, overrides(shards, out))
    train(cfg)
    m = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        targets = np.load(out / f"targets_{split}.npy")
        chance = metrics.nanmean(metrics.chance_average_precision(targets))
        assert m[split]["chance_mAP"] == pytest.approx(chance, abs=1e-12)
        assert 0 < chance < 1 and chance != pytest.approx(float((targets == 1).mean()), abs=1e-6)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["val_chance_mAP"] for h in history] == [pytest.approx(m["val"]["chance_mAP"])] * 2
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["val_chance_mAP"] == pytest.approx(m["val"]["chance_mAP"])
    assert last["test_chance_mAP"] == pytest.approx(m["test"]["chance_mAP"])
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.data.metrics["final_val_chance_mAP"] == pytest.approx(m["val"]["chance_mAP"])
    assert run.data.metrics["test_chance_mAP"] == pytest.approx(m["test"]["chance_mAP"])
    assert len(client.get_metric_history(run.info.run_id, "val_chance_mAP")) == 1   # once, not per epoch
