"""Log a finished run directory to MLflow after the fact: its tracking failed (the server was down,
the store unreachable) or it ran with tracking off.

    python -m mlic_dist.relog runs/NAME                         # the store the run meant to use
    python -m mlic_dist.relog runs/NAME --tracking-uri http://127.0.0.1:5000 [--experiment NAME]

Params come from config.yaml, per-epoch metrics from history.jsonl, final metrics from
metrics.json, the files (and best_model.pt) as artifacts. The run named by tracking.json is
re-opened when it still exists in that store, and only what it lacks is added (no duplicate
epochs or final metrics) and it is ended (a live run whose tracking gave up stays RUNNING in
MLflow until then); otherwise a new run is created, with every tag and dataset input the live run
got (tracking.json records them). Either way it is tagged `mlic.relogged` (and
`mlic.tracking_gave_up` with the reason the live tracking stopped). CPU only; no GPU involved.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import rundir
from .cli import entry_point
from .config import TrackingConfig, flatten
from .errors import RunFailure, UserError
from .tracking.query import logged_metrics
from .tracking.tracker import Tracker, final_metrics


def relog(run_dir: str | Path, uri: str | None = None, experiment: str | None = None,
          flush_timeout_s: float = 600.0) -> str:
    """Returns the MLflow run id. Raises UserError for a bad directory, RuntimeError when MLflow
    did not take it (RunFailure)."""
    try:
        run = rundir.load_run(run_dir)
    except rundir.RunDirError as e:
        raise UserError(str(e)) from None
    recorded = run.tracking or {}
    tcfg = dict((run.config or {}).get("tracking") or {})
    tcfg.update(enabled=True, flush_timeout_s=flush_timeout_s)
    # the store the run used (tracking.json), unless told otherwise; not ./mlflow.db by accident
    tcfg["uri"] = uri or tcfg.get("uri") or recorded.get("tracking_uri")
    if experiment:
        tcfg["experiment"] = experiment
    tracker = Tracker(TrackingConfig(**tcfg), run.path, retry_s=2.0)
    previous = recorded.get("run_id")
    # every tag and dataset input the live run got (or would have got: tracking.json keeps them),
    # and what happened to its live tracking
    tags = dict(recorded.get("tags") or {})
    tags["mlic.relogged"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if recorded.get("gave_up"):
        tags["mlic.tracking_gave_up"] = recorded["gave_up"]
    run_id = tracker.start(flatten(run.config or {}), resume_run_id=previous, tags=tags,
                           inputs=recorded.get("inputs") or [], wait_s=60)
    if run_id is None:
        raise RunFailure(f"MLflow at {tracker.uri} did not answer: nothing was logged")
    have: dict = {}
    if run_id == previous:  # a partly logged run: add only what it lacks
        have = logged_metrics(tracker.uri, run_id, curve="val_mAP")
    for record in run.history:
        if record.get("epoch", 0) not in have.get("epochs", ()):
            tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=record.get("epoch", 0))
    final = {k: v for k, v in final_metrics(run.metrics).items() if k not in have.get("final", ())}
    if final:
        tracker.log_metrics(final, step=len(run.history))
    best = [run.path / rundir.BEST_MODEL] if (run.path / rundir.BEST_MODEL).is_file() else []
    tracker.log_artifacts(rundir.artifact_files(run.path) + best)
    if not tracker.finish("FINISHED" if run.metrics else "FAILED"):
        raise RunFailure(f"MLflow at {tracker.uri} did not take everything within {flush_timeout_s:.0f} s")
    return run_id


@entry_point
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.relog", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run directory written by mlic_dist.train")
    p.add_argument("--tracking-uri", help="MLflow URI (default: the run's tracking.uri, else the "
                   "store its tracking.json names)")
    p.add_argument("--experiment", help="experiment name (default: the run's tracking.experiment)")
    a = p.parse_args(argv)
    run_id = relog(a.run_dir, a.tracking_uri, a.experiment)
    print(json.dumps({"run_id": run_id, "run_dir": str(a.run_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
