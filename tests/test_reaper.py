"""sweep.reaper: the processes a SIGKILLed sweep driver started (a local Ray instance's workers
and agents, reparented and waiting minutes for a GCS that is gone) end within seconds, and the
driver's processes from before the block are left alone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from processes import Descendants

ROOT = Path(__file__).resolve().parents[1]

# A driver: one child from before the block; inside it a child that starts a grandchild in its
# own session which ignores SIGTERM (Ray's reparented workers do not go on SIGTERM alone either).
DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from mlic_dist.sweep.reaper import reap_on_death
    sleeper = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"]
    before = subprocess.Popen(sleeper)
    with reap_on_death():
        starter = subprocess.Popen([sys.executable, "-c",
            "import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:], start_new_session=True); "
            "print(p.pid, flush=True); time.sleep(600)", *sleeper], stdout=subprocess.PIPE, text=True)
        grandchild = int(starter.stdout.readline())
        time.sleep(2.5)          # the watcher looks every second
        print(before.pid, starter.pid, grandchild, flush=True)
        time.sleep(600)
""")


def _gone(pid: int, timeout_s: float) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_what_a_sigkilled_driver_started_ends_and_what_it_had_before_stays():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    before = None
    try:
        before, starter, grandchild = map(int, driver.stdout.readline().split())
        driver.kill()                      # no atexit, no finally: only the watcher
        driver.wait()
        assert _gone(starter, 10) and _gone(grandchild, 10), "the block's processes outlived the driver"
        assert not _gone(before, 1), "a process from before the block was ended"
    finally:
        for pid in [p for p in (before,) if p]:
            os.kill(pid, signal.SIGKILL)


def test_a_clean_exit_stops_the_watcher():
    from mlic_dist.sweep.reaper import reap_on_death

    with reap_on_death() as watcher:
        assert watcher.poll() is None
    assert watcher.poll() is not None


@pytest.mark.slow
def test_a_sigkilled_driver_leaves_no_ray_process_behind(tmp_path):
    """The real thing: a local Ray instance as the sweep starts it (sweep.cluster.connect), with
    workers running tasks, its driver SIGKILLed. Without the watcher its workers and agents
    lived 1-5 minutes (fault injection, issue 19)."""
    code = textwrap.dedent("""
        import ray, sys
        from mlic_dist.sweep.cluster import connect
        from mlic_dist.sweep.reaper import reap_on_death
        with reap_on_death():
            connect(None)
            @ray.remote
            def f(x):
                return x
            assert ray.get([f.remote(i) for i in range(4)]) == list(range(4))
            print("up", flush=True)
            import time; time.sleep(600)
    """)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with Descendants() as procs:
        driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                                  env={**env, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        try:
            assert driver.stdout.readline().strip() == "up"
            time.sleep(2)                       # the watcher has seen every Ray process
            assert len(procs.seen) >= 4, procs.seen   # gcs, raylet, agents, workers
            driver.kill()
            driver.wait()
            left = procs.survivors(grace_s=15)
        finally:
            for p in psutil.Process().children(recursive=True):   # whatever is left, for the next test
                if p.pid in {int(s.split()[0]) for s in procs.survivors()}:
                    p.kill()
            try:
                os.killpg(driver.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, f"alive 15 s after the driver was SIGKILLed: {left}"
