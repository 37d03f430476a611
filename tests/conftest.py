"""Shared fixtures."""
import socket

import pytest


@pytest.fixture
def free_port() -> int:
    """A localhost TCP port nothing listens on (for a dead server, or torchrun's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
