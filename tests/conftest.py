"""Shared fixtures."""
import gc
import os
import socket

# OpenMP threads that find no work sleep instead of spinning: on a busy 2-core machine (CI
# running other jobs) spinning threads starve the ones with work (measured 2 vs 44 img/s).
# Set before torch first runs a parallel region; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest


@pytest.fixture
def free_port() -> int:
    """A localhost TCP port nothing listens on (for a dead server, or torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """`mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI, which every later subprocess (a
    sweep, a trainer) would inherit and log to: a test that sets it must not leak it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if os.environ.get("MLFLOW_TRACKING_URI") != before:
        import mlflow

        mlflow.set_tracking_uri(before)   # None unsets MLflow's global URI and the variable


@pytest.fixture(autouse=True)
def _free_dali_pipelines():
    """A DALI loader keeps its pipeline (and DALI's threads) between epochs; a torch DataLoader
    that forks workers while another test's pipeline lingers in a garbage cycle can lose them
    (a worker killed by SIGSEGV)."""
    yield
    gc.collect()
