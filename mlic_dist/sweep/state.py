"""SWEEP.root/NAME/sweep.json: what a sweep is (its spec), where it tracks (the parent MLflow run)
and the `mlflow server` it started, so that `--resume` continues the same sweep.

A new sweep must not find the file (it would mix two sweeps' trials); a --resume must find one
recording the same base config and grid. A sweep that was killed (SIGKILL) cannot stop the
server it started (the server runs in its own session): the server's watchdog ends it within
seconds (mlic_dist.tracking.server); should one still be alive, --resume stops it before starting
its own.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..atomic import write_text
from ..config import flatten
from ..tracking.server import stop_group
from .spec import SweepError, SweepSpec

STATE_FILE = "sweep.json"
STOPPED = "stopped_early"   # names of the trials ASHA stopped: they stay stopped on --resume


def check_state(spec: SweepSpec, resume: bool) -> dict:
    """The recorded state ({} for a new sweep); SweepError when it contradicts the command."""
    path = spec.root_dir / STATE_FILE
    if not path.is_file():
        if resume:
            raise SweepError(f"--resume: {path} does not exist, so there is no sweep {spec.name!r} to resume; "
                             f"run without --resume to start it")
        return {}
    if not resume:
        raise SweepError(f"sweep {spec.name!r} already ran in {spec.root_dir}: add --resume to continue it, or "
                         f"start a new one with sweep.name=OTHER")
    state = json.loads(path.read_text())
    old, new = state.get("spec", {}), json.loads(json.dumps(spec.to_dict()))
    for section in ("grid", "base"):
        a, b = flatten(old.get(section, {})), flatten(new[section])
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise SweepError(f"--resume: {section} key {diff[0]} changed since sweep {spec.name!r} started "
                             f"({a.get(diff[0])!r} -> {b.get(diff[0])!r}); resume with the same file and overrides, "
                             f"or start a new sweep with sweep.name=OTHER")
    return state


def write_state(spec: SweepSpec, state: dict, **updates) -> dict:
    """Merge `updates` into the state and replace sweep.json atomically; returns the new state."""
    doc = {**state, "name": spec.name, "source": spec.source, "overrides": list(spec.overrides),
           "spec": spec.to_dict(), **updates}
    stopped = set(doc.get(STOPPED, [])) | stopped_early(spec.root_dir)   # record_stopped's, kept
    if stopped:
        doc[STOPPED] = sorted(stopped)
    doc.setdefault("created", time.strftime("%Y-%m-%d %H:%M:%S"))
    write_text(spec.root_dir / STATE_FILE, json.dumps(doc, indent=2, default=str))
    return doc


def stop_stale_server(state: dict, store: str, timeout_s: float = 10.0) -> bool:
    """Stop the `mlflow server` a killed run of this sweep left over `store` (its whole process
    group: uvicorn and huey children too). Only a live process whose command line is an mlflow
    server over this very store is touched. Returns True if one was stopped."""
    info = state.get("mlflow_server") or {}
    pid = info.get("pid")
    if not pid or info.get("store") != store:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False  # gone (or not Linux)
    if "mlflow" not in cmdline or "server" not in cmdline or store not in cmdline:
        return False

    return stop_group(pid, timeout_s)   # its own session: the group is the server and its children


def record_stopped(spec: SweepSpec, name: str) -> None:
    """Note that ASHA stopped trial `name` (the driver's Tune callback, at once): Tune saves its
    own state every few seconds, so a sweep killed in between would otherwise resume that trial
    and, ASHA's rung already holding it, run it to the end while the other stopped trials stay
    stopped."""
    path = spec.root_dir / STATE_FILE
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[STOPPED] = sorted(set(doc.get(STOPPED, [])) | {name})
    write_text(path, json.dumps(doc, indent=2, default=str))


def stopped_early(root_dir: Path) -> set[str]:
    """The trials of the sweep in `root_dir` that ASHA stopped (record_stopped)."""
    path = Path(root_dir) / STATE_FILE
    try:
        return set(json.loads(path.read_text()).get(STOPPED, []))
    except (OSError, ValueError):
        return set()
