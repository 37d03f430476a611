"""mlic_dist.tracking.server with real `mlflow server` processes: `stop_group` ends a whole process
group (children that ignore SIGTERM too); the server's watchdog ends it when the process that
started it is SIGKILLed; a sweep's --resume still stops a server left alive (stop_stale_server)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from mlic_dist.tracking.server import MlflowServer, stop_group
from mlic_dist.sweep.state import stop_stale_server
from processes import group

ROOT = Path(__file__).resolve().parents[1]




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


def test_the_server_ends_when_the_process_that_started_it_is_sigkilled(tmp_path):
    owner = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mlic_dist.tracking.server import MlflowServer; "
         "s = MlflowServer(sys.argv[1]).start(); print(s.proc.pid, s.port, flush=True); time.sleep(600)",
         f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        pgid, port = map(int, owner.stdout.readline().split())
        assert answers(port) and len(group(pgid)) >= 2          # the watchdog and the server (and workers)
        owner.kill()                                             # no atexit, no stop(): only the watchdog
        owner.wait()
        assert wait_gone(pgid, 15.0) < 15.0, f"still running: {group(pgid)}"
        assert not answers(port)
    finally:
        owner.kill()
        stop_group(pgid, 1.0) if "pgid" in locals() else None


def test_resume_still_stops_a_server_left_alive_and_nothing_else(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    with MlflowServer(store) as server:                      # alive: its watchdog watches this process
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


def _cmdlines(pgid: int) -> list[str]:
    out = []
    for pid in group(pgid):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass
    return out


def test_the_server_starts_on_the_port_asked_for_without_the_job_runner(tmp_path, free_port):
    """MLflow 3's server also starts a job runner and its huey consumers (GenAI jobs, unused here) that import MLflow
    while the web worker does: on 2 cores that made a sweep's server take 27-74 s to answer.
    Without them it answers in seconds; and the port is the caller's when given."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with MlflowServer(store, port=free_port, log_file=tmp_path / "server.log") as server:
        assert server.port == free_port and answers(free_port)
        procs = _cmdlines(server.proc.pid)
        assert any("mlflow" in c and "server" in c for c in procs), procs
        assert not [c for c in procs if "mlflow.server.jobs" in c or "huey" in c], procs
        print(f"mlflow server answered after {server.start_s:.1f} s")
        assert server.start_s < 60
    assert not answers(free_port)
