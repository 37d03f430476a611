"""Resume never silently changes what a run means: changed hyperparameters are refused (or
accepted on purpose and applied), free keys are recorded, and a resume that cannot continue
mid-epoch exactly (another number of processes, another loader) restarts that epoch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlic_dist.config import load_config
from mlic_dist.errors import UserError
from mlic_dist.train.resume import config_changes
from shard_fixtures import build_small_shards, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_small_shards(tmp_path_factory.mktemp("shards"), n_train=48, n_val=10, n_test=8,
                              num_classes=3, samples_per_shard=12)


def ov(shards, out, **extra):
    return tiny_run_overrides(shards, out, **{"tracking.enabled": False, **extra})


def _ckpt_lr(out: Path) -> list:
    newest = sorted((out / "checkpoints").glob("e*"))[-1]
    state = torch.load(newest / "state.pt", weights_only=True)
    return [g["lr"] for g in state["optimizer"]["param_groups"]]


def test_config_changes_lists_both_values():
    assert config_changes({"optim": {"lr": 0.01, "name": "sgd"}}, {"optim": {"lr": 0.1, "name": "sgd"}}) == \
        {"optim.lr": [0.01, 0.1]}


def test_keys_added_since_a_checkpoint_count_as_their_defaults():
    """A checkpoint written before loss.* and train.ema_decay existed resumes without a refusal;
    one that set them differently is still a change."""
    from mlic_dist.config import Config, to_dict

    now = to_dict(Config())
    old = {k: v for k, v in now.items() if k != "loss"}
    old["train"] = {k: v for k, v in now["train"].items() if k != "ema_decay"}
    assert config_changes(old, now) == {}
    changed = to_dict(load_config(None, ["loss.name=asl", "train.ema_decay=0.9"]))
    assert config_changes(old, changed) == {"loss.name": ["bce", "asl"], "train.ema_decay": [0.0, 0.9]}


def test_changed_lr_is_refused_with_both_values_then_accepted_on_purpose(shards, tmp_path):
    from mlic_dist.train.loop import train

    out = tmp_path / "run"
    train(load_config(None, ov(shards, out, **{"train.epochs": 1})))
    with pytest.raises(UserError) as e:  # today: silently kept the old lr and rewrote config.yaml
        train(load_config(None, ov(shards, out, **{"train.epochs": 2, "optim.lr": 0.001})))
    msg = str(e.value)
    assert "optim.lr: checkpoint 0.01, now 0.001" in msg and "train.resume_accept=optim.lr" in msg
    assert "lr: 0.01" in (out / "config.yaml").read_text()  # nothing was rewritten

    # the CLI: one line, status 2, no traceback
    p = subprocess.run([sys.executable, "-m", "mlic_dist.train", *ov(shards, out, **{"optim.head_lr": 1.0})],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert p.returncode == 2 and "optim.head_lr: checkpoint 0.1, now 1.0" in p.stderr
    assert "Traceback" not in p.stderr

    # accepted on purpose: the restored optimizer trains with the new rate, and it is recorded
    train(load_config(None, ov(shards, out, **{"train.epochs": 2, "optim.lr": 0.001,
                                               "train.resume_accept": "optim.lr"})))
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["lr"] for h in history] == pytest.approx([0.01, 0.001])
    assert _ckpt_lr(out) == pytest.approx([0.001, 0.1])
    resumes = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["changed"]["optim.lr"] == [0.01, 0.001]
    assert "lr: 0.001" in (out / "config.yaml").read_text()


def test_free_keys_change_without_asking_and_are_recorded(shards, tmp_path):
    from mlic_dist.train.loop import train

    out = tmp_path / "run"
    train(load_config(None, ov(shards, out, **{"train.epochs": 1})))
    result = train(load_config(None, ov(shards, out, **{"train.epochs": 2, "train.log_every_steps": 3})))
    assert result["epochs_run"] == 2
    (line,) = (out / "resumes.jsonl").read_text().splitlines()
    assert json.loads(line)["changed"] == {"train.epochs": [1, 2], "train.log_every_steps": [10, 3]}


def test_other_data_is_refused_even_at_the_same_path(shards, tmp_path):
    from mlic_dist.train.loop import train

    data = tmp_path / "data"
    shutil.copytree(shards, data)
    out = tmp_path / "run"
    train(load_config(None, ov(shards, out, **{"train.epochs": 1, "data.shards": data})))
    other = build_small_shards(tmp_path / "other", n_train=48, n_val=10, n_test=8, num_classes=3,
                               samples_per_shard=12, seed=5)
    shutil.rmtree(data)
    shutil.copytree(other, data)
    with pytest.raises(UserError, match="different data"):
        train(load_config(None, ov(shards, out, **{"train.epochs": 2, "data.shards": data})))


def _cut_to_mid_epoch(out: Path, name: str) -> None:
    """What a kill at `name` leaves: later checkpoints and the finished run's files gone."""
    ckpts = sorted((out / "checkpoints").glob("e*"))
    for c in ckpts:
        if c.name > name:
            shutil.rmtree(c)
    for f in ("metrics.json", "best_model.pt"):
        (out / f).unlink(missing_ok=True)
    boundary = name.split("-")[0] + "-s0000000"
    assert (out / "checkpoints" / name).is_dir() and (out / "checkpoints" / boundary).is_dir()


def test_a_changed_loader_mid_epoch_restarts_that_epoch(shards, tmp_path):
    from mlic_dist.train.loop import train

    out = tmp_path / "run"
    common = {"train.checkpoint_every_steps": 2, "train.keep_checkpoints": 1}
    train(load_config(None, ov(shards, out, **common)))
    # pruning kept the newest epoch boundary besides the newest checkpoint
    names = sorted(p.name for p in (out / "checkpoints").glob("e*"))
    assert names == ["e0002-s0000000"]
    train(load_config(None, ov(shards, out, **{**common, "train.epochs": 3, "train.keep_checkpoints": 10})))
    _cut_to_mid_epoch(out, "e0002-s0000004")
    with pytest.warns(UserWarning, match="epoch 2 restarts from its start"):
        train(load_config(None, ov(shards, out, **{**common, "train.epochs": 3, "data.num_workers": 2})))
    last = json.loads((out / "resumes.jsonl").read_text().splitlines()[-1])
    assert last["restarted_epoch"] and last["checkpoint"].endswith("e0002-s0000000")
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1, 2]


@pytest.mark.dist
def test_another_number_of_processes_mid_epoch_restarts_that_epoch(shards, tmp_path, free_port):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    common = ov(shards, out, **{"train.checkpoint_every_steps": 2, "train.keep_checkpoints": 10})
    p = subprocess.run([sys.executable, "-m", "mlic_dist.train", *common], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    _cut_to_mid_epoch(out, "e0001-s0000004")
    p = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port),
                        "-m", "mlic_dist.train", *common], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "1 -> 2 processes" in p.stderr and "epoch 1 restarts from its start" in p.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["epochs_run"] == 2
    resumes = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert resumes[-1]["world_size"] == [1, 2] and resumes[-1]["restarted_epoch"]


def _best_epoch_weights(out: Path, epoch: int) -> dict:
    return torch.load(out / "checkpoints" / f"best-e{epoch:04d}.pt", weights_only=True)


def test_resume_into_another_directory_brings_the_best_weights_along(shards, tmp_path):
    from mlic_dist.train.loop import train

    a, b = tmp_path / "A", tmp_path / "B"
    train(load_config(None, ov(shards, a, **{"train.epochs": 1})))
    ckpt = a / "checkpoints" / "e0001-s0000000"
    result = train(load_config(None, ov(shards, b, **{"train.epochs": 1, "train.resume": ckpt})))
    # before: B had no best_model.pt and finalize silently scored the last weights
    assert result["best_epoch"] == 0
    best_a, best_b = torch.load(a / "best_model.pt", weights_only=True), torch.load(b / "best_model.pt", weights_only=True)
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    assert json.loads((a / "metrics.json").read_text())["val"]["mAP"] == pytest.approx(result["val"]["mAP"])


def test_resuming_an_older_checkpoint_scores_the_best_weights_its_state_names(shards, tmp_path, monkeypatch):
    """Go back to epoch 1's checkpoint after a run of 3 epochs whose best moved on: the best
    candidate that checkpoint names was kept, later checkpoints are removed, and the final scores
    come from the weights metrics.json reports."""
    import mlic_dist.train.loop as T

    out = tmp_path / "run"
    vals = iter([0.5, 0.9, 0.99, 0.1, 0.1])  # epochs 0..2, then (after going back) epochs 1..2 again
    real = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda run, loader, labels, **kw: {**real(run, loader, labels), "mAP": next(vals)})
    common = {"train.keep_checkpoints": 10, "train.epochs": 3}
    T.train(load_config(None, ov(shards, out, **common)))
    assert (out / "checkpoints" / "best-e0000.pt").is_file()  # named by e0001-s0000000
    # e0001-s0000000 is the checkpoint after epoch 0 (its best: epoch 0)
    result = T.train(load_config(None, ov(shards, out, **{**common, "train.resume": out / "checkpoints" / "e0001-s0000000"})))
    assert result["best_epoch"] == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("e*")) == ["e0001-s0000000", "e0002-s0000000",
                                                                          "e0003-s0000000"]
    weights = torch.load(out / "best_model.pt", weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in _best_epoch_weights(out, 0).items())


def test_a_checkpoint_from_before_new_keys_still_resumes(shards, tmp_path):
    """Keys added to the config since a checkpoint was written compare at their defaults."""
    from mlic_dist.train.loop import train

    out = tmp_path / "run"
    train(load_config(None, ov(shards, out, **{"train.epochs": 1})))
    ckpt = out / "checkpoints" / "e0001-s0000000" / "state.pt"
    state = torch.load(ckpt, weights_only=True)
    for section, key in (("data", "shard_shuffle"), ("optim", "warmup_epochs"), ("model", "sync_bn")):
        del state["config"][section][key]
    state["trainer"]["run_id"] = ""   # a field earlier releases wrote
    torch.save(state, ckpt)
    (ckpt.parent / "files.json").unlink()   # as an earlier release wrote it: no listing, checked by loading
    assert train(load_config(None, ov(shards, out, **{"train.epochs": 2})))["epochs_run"] == 2


def test_a_bad_resume_path_is_one_line(shards, tmp_path):
    p = subprocess.run([sys.executable, "-m", "mlic_dist.train",
                        *ov(shards, tmp_path / "run", **{"train.resume": tmp_path / "no-such-checkpoint"})],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "no-such-checkpoint" in p.stderr and "not a complete checkpoint" in p.stderr
