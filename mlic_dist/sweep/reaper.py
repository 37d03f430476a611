"""The processes a local Ray instance leaves when the sweep's driver is SIGKILLed end within seconds.

`ray.init()` on this machine starts the GCS and the raylet as children of the driver (Linux:
they die with it, PR_SET_PDEATHSIG), but the raylet's children (idle and trial workers, the
dashboard and runtime-env agents) are reparented and wait for a GCS that never comes back: 1-5
minutes (Ray's reconnect timeouts) of processes holding memory, CPUs and the trials' files. A
clean exit (ray.shutdown, also on an exception or Ctrl-C) stops them; a SIGKILL runs nothing.

`reap_on_death()` starts a small watcher (`REAPER`, stdlib only, `python -I -c`, its own session,
so a Ctrl-C to the driver's terminal does not reach it) that, every second while the driver
lives, notes the driver's descendants that were not there when it started (the block waits
for that list); once the driver is gone
(its parent pid changes) it sends those still alive (matched by pid and start time, so a reused
pid is never hit), and whatever they started since, SIGTERM, then SIGKILL after 3 s. The
driver's processes from before (an mlflow server with its own watchdog, a test runner's other
children) are left alone. On a normal exit the block stops the watcher. The mlflow server the
sweep starts has the same guard (tracking.server.WATCHDOG).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

# argv: the pid to outlive. Linux /proc only; elsewhere it exits at once (nothing to read).
REAPER = r"""
import os, signal, sys, time
watched, me = int(sys.argv[1]), os.getpid()

def table():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(name)] = (int(fields[1]), int(fields[19]), fields[0])   # ppid, start time, state
    return out

def below(roots, procs):
    kids = {}
    for pid, (ppid, _, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in kids.get(todo.pop(), ()):
            if child not in found and child != me:
                found.add(child)
                todo.append(child)
    return found

if not os.path.isdir("/proc"):
    sys.exit(0)
procs = table()
before = {(p, procs[p][1]) for p in below([watched], procs)}   # not this watcher's business
print("ready", flush=True)
seen = set()
while os.getppid() == watched:
    procs = table()
    seen |= {(p, procs[p][1]) for p in below([watched], procs)} - before
    time.sleep(1.0)
for sig in (signal.SIGTERM, signal.SIGKILL):
    procs = table()
    alive = {p for p, st in seen if p in procs and procs[p][1] == st and procs[p][2] != "Z"}
    targets = alive | below(alive, procs)
    seen |= {(p, procs[p][1]) for p in targets}
    for pid in targets:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    if not targets:
        break
    if sig == signal.SIGTERM:
        time.sleep(3.0)
"""


@contextlib.contextmanager
def reap_on_death():
    """While the block runs, the processes this one starts (Ray's) are ended if it is SIGKILLed."""
    proc = subprocess.Popen([sys.executable, "-I", "-c", REAPER, str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    try:
        proc.stdout.readline()   # its list of what came before is taken: what the block starts counts
        proc.stdout.close()
        yield proc
    finally:
        proc.kill()
        proc.wait()
