"""Start and stop an `mlflow server` over a local store, for many processes to log to over HTTP.

A SQLite file written by many processes at once locks and races (MLflow #6490); a sweep's trials,
a test that trains and ensembles over HTTP, and the UI screenshots therefore talk to one server:

    with MlflowServer("sqlite:///mlflow.db", artifacts="mlartifacts") as server:
        cfg = replace(cfg, [f"tracking.uri={server.uri}"])   # http://127.0.0.1:PORT

Start-up takes a few seconds (measured 6-16 s on a loaded 2-core machine, against 27-45 s
before): MLflow 3's server also launches its GenAI job runner (huey consumers, each importing
MLflow while the web worker does), which nothing here uses, so `MLFLOW_SERVER_ENABLE_JOB_EXECUTION`
is off unless `job_execution=True`. The schema is created once beforehand
(`store.init_sqlite_store`), so the server never migrates a fresh store itself.

The server binds 127.0.0.1 unless told otherwise and runs in its own process group; `stop()`
(also on an exception, and at interpreter exit) ends the whole group, uvicorn's and huey's
children included (MLflow 3 leaves huey consumers behind when only the parent is killed).
`stop_group(pgid)` is that ending, for any process group.

A process that is SIGKILLed runs no cleanup, and a server in its own session would outlive it
forever. So the group's leader is a small watchdog (`WATCHDOG`, stdlib only, `python -I -c`)
that starts the server as its child and, once the process that started it is gone (its parent
pid changes), ends the group: SIGTERM, 3 s, SIGKILL. `proc.pid` is the watchdog's pid = the
group id, and its command line holds the server's. A sweep's --resume still stops a left-over
server (sweep.state.stop_stale_server), should one outlive its watchdog.
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional

from .store import init_sqlite_store, local_store

# argv: the pid to outlive, then the server's command. SIGTERM (stop()) reaches the whole group:
# the watchdog ignores it and exits with the server's status once the server has exited.
WATCHDOG = """
import os, signal, subprocess, sys, threading, time
watched = int(sys.argv[1])
server = subprocess.Popen(sys.argv[2:])
signal.signal(signal.SIGTERM, lambda *_: None)   # after Popen: the server keeps the default action

def watch():
    while os.getppid() == watched:
        time.sleep(0.5)
    os.killpg(0, signal.SIGTERM)
    try:
        server.wait(3)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)

threading.Thread(target=watch, daemon=True).start()
status = server.wait()
sys.exit(status if status >= 0 else 128 - status)   # killed by signal N: 128 + N, as a shell says
"""


def _alive(pid: int) -> bool:
    """A process `pid` exists and is not a zombie (Linux /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_group(pgid: int, timeout_s: float = 15.0, proc: Optional[subprocess.Popen] = None) -> bool:
    """End the process group `pgid` (a server and its children): SIGTERM, up to `timeout_s` for
    its leader to exit, then SIGKILL for whatever is left (huey consumers outlive the leader).
    `proc`: the leader's Popen where this process started it (it is reaped). Returns True when
    the leader was running (and was stopped), False when it was gone already or is not ours."""
    leader_alive = (lambda: proc.poll() is None) if proc is not None else (lambda: _alive(pgid))
    stopped = False
    if leader_alive():
        try:
            os.killpg(pgid, signal.SIGTERM)
            stopped = True
        except (ProcessLookupError, PermissionError):
            return False
        deadline = time.time() + timeout_s
        while leader_alive() and time.time() < deadline:
            time.sleep(0.1)
    try:   # also when the leader had exited: its children may still be in the group
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc is not None:
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
    return stopped


class MlflowServerError(RuntimeError):
    """The server did not come up; the message holds the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether `port` on `host` cannot be bound now (another server listens there)."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


class MlflowServer:
    def __init__(self, backend_uri: str, artifacts: str | Path | None = None, host: str = "127.0.0.1",
                 port: int = 0, log_file: str | Path | None = None, workers: int = 1,
                 startup_timeout_s: float = 90.0, job_execution: bool = False):
        self.backend_uri = backend_uri
        store = local_store(backend_uri)
        if artifacts is None:
            artifacts = store[1] if store else Path.cwd() / "mlartifacts"
        self.artifacts = Path(artifacts).resolve()
        self.host, self.port = host, port or free_port(host)
        self.log_file = Path(log_file) if log_file else None
        self.workers = workers
        self.startup_timeout_s = startup_timeout_s
        self.job_execution = job_execution
        self.start_s: Optional[float] = None   # seconds start() took, once it returned
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> "MlflowServer":
        t0 = time.time()
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin) if mlflow_bin.is_file() else "mlflow", "server",
               "--backend-store-uri", self.backend_uri, "--artifacts-destination", str(self.artifacts),
               "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]

        init_sqlite_store(self.backend_uri)   # a local store's schema, created once under a lock
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_file, "ab")
        else:
            self._log = tempfile.TemporaryFile()
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.backend_uri,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "true" if self.job_execution else "false"}
        # its own process group (stop() ends all of it), led by the watchdog that ends it when
        # this process dies without stopping it (SIGKILL)
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", WATCHDOG, str(os.getpid()), *cmd],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        atexit.register(self.stop)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.start_s = time.time() - t0
        return self

    def _tail(self, n: int = 3000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - n))
        return self._log.read().decode(errors="replace")

    def _wait_healthy(self) -> None:
        deadline = time.time() + self.startup_timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise MlflowServerError(f"mlflow server exited with status {self.proc.returncode} "
                                        f"(port {self.port}):\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise MlflowServerError(f"mlflow server on {self.uri} not healthy after "
                                f"{self.startup_timeout_s:.0f} s:\n{self._tail()}")

    def stop(self, timeout_s: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:   # also when the leader is gone: its children may still be in the group
            stop_group(proc.pid, timeout_s, proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "MlflowServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
