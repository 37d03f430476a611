"""mlic_dist.mlflow_server with real processes: `stop_group` ends a whole process group (children
that ignore SIGTERM too); a sweep's --resume stops a server left alive (stop_stale_server), with
the same function, and nothing else."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlic_dist.mlflow_server import MlflowServer, stop_group
from mlic_dist.sweep.state import stop_stale_server



def group(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def wait_gone(pgid: int, timeout_s: float) -> float:
    t0 = time.time()
    while group(pgid) and time.time() - t0 < timeout_s:
        time.sleep(0.1)
    return time.time() - t0


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_stop_group_ends_the_leader_and_children_that_ignore_sigterm():
    child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(300)"
    leader = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; subprocess.Popen([sys.executable, "
                               f"'-c', {child!r}]); time.sleep(300)"], start_new_session=True,
                              stdout=subprocess.PIPE)
    leader.stdout.readline()                     # the child runs and ignores SIGTERM
    assert len(group(leader.pid)) == 2
    assert stop_group(leader.pid, timeout_s=5.0, proc=leader)
    assert wait_gone(leader.pid, 5.0) < 5.0 and leader.returncode == -signal.SIGTERM
    assert not stop_group(leader.pid, timeout_s=1.0)   # nothing left to stop


def test_resume_still_stops_a_server_left_alive_and_nothing_else(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    with MlflowServer(store) as server:
        pgid, port = server.proc.pid, server.port
        try:
            # a state naming another store, or a process that is not an mlflow server: untouched
            assert not stop_stale_server({"mlflow_server": {"pid": pgid, "store": "sqlite:////elsewhere.db"}}, store)
            assert not stop_stale_server({"mlflow_server": {"pid": other.pid, "store": store}}, store)
            assert other.poll() is None and answers(port)
            assert stop_stale_server({"mlflow_server": {"pid": pgid, "store": store}}, store)
            assert wait_gone(pgid, 5.0) < 5.0 and not answers(port)
        finally:
            stop_group(other.pid, 1.0, other)
