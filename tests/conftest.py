"""Shared fixtures."""
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
