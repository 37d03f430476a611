"""A run directory has one owner (issue 19): a second training into it is refused with one line
naming the first (pid, host, start time); a directory left by a training killed with SIGKILL is
taken over, with a warning that names the dead owner. Before, two trainings started together
mixed their checkpoints and one reported the other's weights as its result."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shard_fixtures import build_small_shards, tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return build_small_shards(tmp_path_factory.mktemp("shards"), n_train=32, n_val=8, n_test=0, num_classes=3,
                              samples_per_shard=8)


def _wait_for_owner(lock: Path, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            doc = json.loads(lock.read_text() or "{}")
        except (OSError, ValueError):
            doc = {}
        if doc.get("pid"):
            return doc
        time.sleep(0.2)
    raise AssertionError(f"{lock} was never taken")


@pytest.mark.slow
def test_a_second_training_is_refused_and_a_killed_ones_directory_is_taken_over(shards, tmp_path, capsys):
    from mlic_dist.train.__main__ import main

    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "mlic_dist.train",
         *tiny_run_overrides(shards, out, **{"tracking.enabled": False, "train.epochs": 200})],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        owner = _wait_for_owner(out / ".lock")
        assert owner["pid"] == first.pid and owner["host"] == socket.gethostname()
        second = tiny_run_overrides(shards, out, **{"tracking.enabled": False, "train.epochs": 1,
                                                    "optim.lr": 0.5})
        assert main(second) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"is in use by another training (pid {first.pid} on " in err, err
        assert owner["started"] in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 left the file with the dead owner in it; the kernel dropped the lock itself
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid
    with pytest.warns(UserWarning, match=f"left by a training that is gone \\(pid {first.pid} on "):
        assert main(tiny_run_overrides(shards, out, **{"tracking.enabled": False, "train.epochs": 1,
                                                       "train.resume": "never" if not (out / "checkpoints").exists()
                                                       else "auto"})) == 0
    assert (out / ".lock").read_text() == ""   # released at the end: nobody owns it now


def test_an_in_process_training_releases_its_directory(shards, tmp_path):
    """A Ray worker or a notebook calls train() again in the same process: the lock is released
    on success and on a user error alike."""
    from mlic_dist.config import load_config
    from mlic_dist.errors import UserError
    from mlic_dist.rundir import RunLock
    from mlic_dist.train import train

    out = tmp_path / "run"
    overrides = tiny_run_overrides(shards, out, **{"tracking.enabled": False, "train.epochs": 1})
    train(load_config(None, overrides))
    with pytest.raises(UserError, match="resume"):     # a refused resume, after the lock was taken
        train(load_config(None, [*overrides, "optim.lr=0.5"]))
    RunLock(out).acquire().release()                   # free again
