"""Atomic checkpoints: whole or absent, newest wins, weights_only loads, RNG round trip."""
import random

import numpy as np
import pytest
import torch

from mlic_dist.train import checkpoint


def _save(out, epoch, step, payload=None, keep=2):
    return checkpoint.save(out, epoch=epoch, step=step, rank=0, world_size=1,
                           payload=payload or {"model": {"w": torch.ones(2) * epoch}},
                           barrier=lambda: None, keep=keep)


def test_latest_prunes_and_ignores_partial_writes(tmp_path):
    assert checkpoint.latest(tmp_path) is None
    for e in range(4):
        _save(tmp_path, e, 0)
    _save(tmp_path, 3, 5)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["e0003-s0000000", "e0003-s0000005"]  # keep=2
    # a write killed half-way leaves a .tmp- dir or a dir without state.pt: never picked
    (tmp_path / "checkpoints" / ".tmp-e0009-s0000000").mkdir()
    (tmp_path / "checkpoints" / "e0009-s0000000").mkdir()
    assert checkpoint.latest(tmp_path).name == "e0003-s0000005"
    state, rng = checkpoint.load(checkpoint.latest(tmp_path), rank=0)
    assert torch.equal(state["model"]["w"], torch.full((2,), 3.0)) and rng is not None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        checkpoint.load(tmp_path / "checkpoints" / "e0009-s0000000", rank=0)


def test_files_load_with_weights_only(tmp_path):
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)
    path = _save(tmp_path, 1, 0, {"model": torch.nn.Linear(2, 2).state_dict(), "optimizer": opt.state_dict(),
                                  "trainer": {"epoch": 1, "best_value": float("nan"), "history": [{"a": 1.0}]}})
    for f in path.glob("*.pt"):
        torch.load(f, weights_only=True)  # raises if anything needs unpickling code
    assert checkpoint.read_meta(path) == {}  # meta.json is plain JSON, read without torch


def test_rng_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


DAMAGES = {
    "truncated state.pt": lambda p: (p / "state.pt").write_bytes((p / "state.pt").read_bytes()[:100]),
    "truncated rng-0.pt": lambda p: (p / "rng-0.pt").write_bytes((p / "rng-0.pt").read_bytes()[:-7]),
    "garbage meta.json": lambda p: (p / "meta.json").write_bytes(b"\xff\xfe not json"),
    "deleted state.pt": lambda p: (p / "state.pt").unlink(),
    "deleted rng-0.pt": lambda p: (p / "rng-0.pt").unlink(),
    "no files.json and a truncated state.pt": lambda p: ((p / "files.json").unlink(), DAMAGES["truncated state.pt"](p)),
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_a_damaged_checkpoint_is_named_by_file_and_the_previous_whole_one_wins(tmp_path, kind):
    _save(tmp_path, 1, 0)
    newest = _save(tmp_path, 2, 0)
    assert checkpoint.damage(newest) is None
    DAMAGES[kind](newest)
    path, damaged = checkpoint.latest_whole(tmp_path)
    assert path.name == "e0001-s0000000"
    assert [p for p, _ in damaged] == [newest]
    file = kind.split()[-1]
    assert file in damaged[0][1], damaged


def test_no_whole_checkpoint_left(tmp_path):
    for e in (1, 2):
        DAMAGES["truncated state.pt"](_save(tmp_path, e, 0))
    path, damaged = checkpoint.latest_whole(tmp_path)
    assert path is None and len(damaged) == 2


def test_training_resumes_from_the_previous_whole_checkpoint_or_stops_in_one_line(tmp_path, capsys):
    from shard_fixtures import build_small_shards, tiny_run_overrides

    from mlic_dist.train.__main__ import main

    shards = build_small_shards(tmp_path / "data", n_train=16, n_val=6, n_test=0, num_classes=3, samples_per_shard=8)
    out = tmp_path / "run"
    args = tiny_run_overrides(shards, out, **{"tracking.enabled": False, "train.epochs": 2})
    assert main(args) == 0
    newest = checkpoint.latest(out)
    assert newest.name == "e0002-s0000000"
    DAMAGES["truncated state.pt"](newest)
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*e0002-s0000000: state.pt is \d+ bytes .* Resuming "
                                         r"from e0001-s0000000 instead"):
        assert main([*args, "train.epochs=3"]) == 0
    assert "resumed from" in capsys.readouterr().out
    for p in checkpoint.list_checkpoints(out):
        DAMAGES["deleted rng-0.pt"](p)
    assert main([*args, "train.epochs=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "can be resumed" in err and "rng-0.pt is missing" in err and "train.resume=never" in err
