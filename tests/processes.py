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


class Descendants:
    """Every process that descends from this one while the block runs (polled, so short-lived
    ones may be missed; Ray's workers and servers live for seconds at least), and which of them
    outlive it: `with Descendants() as d: run(); assert not d.survivors(grace_s=20)`.

    Processes already alive when the block starts (another test's cluster or server) are not
    counted. A process is matched by (pid, start time), so a reused pid is not mistaken for it;
    one reparented to init after its parent died stays counted."""

    def __init__(self, poll_s: float = 0.2):
        import threading

        self.poll_s = poll_s
        self.seen: dict[tuple[int, float], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def _tree() -> dict[tuple[int, float], str]:
        import psutil

        out = {}
        for p in psutil.Process().children(recursive=True):
            try:
                out[(p.pid, p.create_time())] = " ".join(p.cmdline())[:160] or p.name()
            except psutil.Error:
                pass
        return out

    def _watch(self) -> None:
        while not self._stop.is_set():
            for key, what in self._tree().items():
                if key not in self._before:
                    self.seen.setdefault(key, what)
            self._stop.wait(self.poll_s)

    def __enter__(self) -> "Descendants":
        self._before = set(self._tree())
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def survivors(self, grace_s: float = 0.0) -> list[str]:
        """'PID COMMAND' of the seen processes still alive (not zombies) after up to grace_s."""
        import psutil

        deadline = time.time() + grace_s
        while True:
            alive = []
            for (pid, started), what in self.seen.items():
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {what}")
                except psutil.Error:
                    pass
            if not alive or time.time() >= deadline:
                return alive
            time.sleep(0.5)
