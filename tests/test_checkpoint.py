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
