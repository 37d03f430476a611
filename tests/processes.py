"""Helpers for tests that start servers and process groups: which processes of a group are alive,
and waiting for a server started by the test to answer."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path


def group(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group `pgid`."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    """Until `url` answers 200; fails with the server's output if it exits or never answers."""
    deadline = time.time() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, f"{what} did not answer {url} within {timeout_s:.0f} s"
        time.sleep(poll_s)
