"""A run made from other runs (an ensemble, a report) logged to MLflow like a training run: its
directory's files as artifacts, its params, tags and final metrics, nested under a parent (a
sweep), through the same `Tracker` a training run uses. A rebuild of the same directory in the
same store re-opens the run it was logged as (`tracking.json`) instead of adding a twin.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from .. import rundir
from ..config import TrackingConfig
from . import query as mq
from .store import resolve_uri
from .tracker import Tracker


def previous_run(out: Path, uri: str, experiment: str, kind: str) -> Optional[str]:
    """The MLflow run `out` was last logged as, when that was in this store and experiment and
    the run still exists with tag mlic.kind = `kind`; else None."""
    old = rundir.load_tracking(out) or {}
    if old.get("tracking_uri") != uri or old.get("experiment") != experiment or not old.get("run_id"):
        return None
    try:
        run = mq.get_run(mq.connect(uri), old["run_id"])
    except mq.TrackingQueryError:
        return None
    return run.run_id if run.kind == kind else None


def log_derived(out: Path, *, uri: Optional[str], experiment: str, run_name: str, kind: str,
                params: dict, tags: dict, artifacts: Sequence[Path], metrics: Optional[dict] = None,
                parent_run_id: Optional[str] = None, previous: Optional[str] = None) -> Optional[str]:
    """Log `out` as a FINISHED run of `experiment` (tag mlic.kind = `kind`), re-opening `previous`
    when given; records it in `out`/tracking.json. Returns the run id, or None when MLflow was
    unreachable (the Tracker warned; the directory holds everything)."""
    uri = resolve_uri(uri)
    cfg = TrackingConfig(enabled=True, uri=uri, experiment=experiment, run_name=run_name,
                         parent_run_id=parent_run_id, log_artifacts=True)
    tracker = Tracker(cfg, out)
    tracker.start(params, resume_run_id=previous, tags={mq.KIND_TAG: kind, **tags})
    if metrics:
        tracker.log_metrics(metrics, step=0)
    tracker.log_artifacts(list(artifacts))
    tracker.finish("FINISHED")   # returns once MLflow has everything (or gave up, with a warning)
    return tracker.run_id        # the Tracker recorded it in tracking.json
