"""After the trials: which trials finished, their MLflow runs made whole, the trial table, and
where to look in MLflow.

The trainer opens one MLflow run per trial (nested under the sweep's parent run through
`tracking.parent_run_id`) and ends it FINISHED or FAILED, from a queue that never stalls
training. A worker SIGKILLed before its queue drained, a resumed attempt whose tracker gave up
before the server answered, or one that died before the run was recorded in tracking.json
leave a finished trial's run incomplete or RUNNING (and maybe a second run). Settling completes
each finished trial's run from its directory (`mlic_dist.relog`: only what MLflow lacks) and
closes the others: KILLED for a trial stopped early or a superseded attempt, FAILED for a failed
trial. Only FINISHED trial runs feed the ensembles. Reads go through `mlic_dist.tracking.query`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import rundir
from ..relog import relog
from ..tracking import query as mq
from .state import stopped_early

FINISHED = "FINISHED"


@dataclass
class TrialOutcome:
    name: str
    status: str                    # finished | stopped early | failed | unfinished | not started
    epochs: int
    best_val_mAP: Optional[float]
    run_id: Optional[str] = None   # the FINISHED MLflow child run, once settled
    error: str = ""
    run_dir: Optional[Path] = None


def outcomes(result_grid, spec) -> list[TrialOutcome]:
    """One outcome per grid point, in grid order. A trial finished when its trainer wrote
    metrics.json (the last step of train()); one without an error that did not was stopped early
    when ASHA's stop was recorded (state.record_stopped), else it is unfinished (a Ctrl-C, which
    Tune's result grid does not tell apart). Epochs and the best val mAP come from the run
    directory's history (Tune may miss the reports of a killed worker)."""

    by_name = {}
    stopped = stopped_early(spec.root_dir)
    for r in result_grid:
        trial = spec.trial({k: r.config[k] for k in spec.grid})
        if r.error is not None:
            status = "failed"
        elif (trial.output_dir / rundir.METRICS).is_file():
            status = "finished"
        elif trial.name in stopped:
            status = "stopped early"
        else:   # Tune marks the trials a Ctrl-C ended TERMINATED too: only ASHA's record says stopped
            status = "unfinished"
        epochs, best = _from_history(trial.output_dir)
        if epochs is None:  # no history yet: what Tune heard
            m = r.metrics or {}
            epochs, best = int(m.get("epochs_done", 0) or 0), m.get("best_val_mAP", rundir.best_val_map([m]))
        by_name[trial.name] = TrialOutcome(
            trial.name, status, epochs, float(best) if best is not None else None, run_dir=trial.output_dir,
            error=str(r.error).strip().splitlines()[0][:300] if r.error is not None else "")
    return [by_name.get(t.name) or TrialOutcome(t.name, "not started", 0, None, run_dir=t.output_dir)
            for t in spec.trials()]


def _from_history(out: Path) -> tuple[Optional[int], Optional[float]]:
    path = out / rundir.HISTORY
    if not path.is_file():
        return None, None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return len(records), rundir.best_val_map(records)   # the EMA's mAP counts where it won


def experiment_id(tracking_uri: str, parent_run_id: str) -> str:
    return mq.get_run(mq.connect(tracking_uri), parent_run_id).experiment_id


def settle_trial_runs(tracking_uri: str, experiment: str, parent_run_id: str,
                      results: list[TrialOutcome]) -> None:
    """Make each finished trial's MLflow run whole and FINISHED (its id goes to `run_id`); close
    every other run of the sweep's trials left RUNNING (or FAILED by a trainer ASHA stopped)."""

    client = mq.connect(tracking_uri)
    trial_runs: dict[str, list] = {}
    for run in mq.search(client, experiment, f"tags.{mq.PARENT_TAG} = '{parent_run_id}'"):
        trial_runs.setdefault(run.name, []).append(run)
    for o in results:
        runs = trial_runs.get(o.name, [])
        if o.status == "finished":
            o.run_id = _complete(client, tracking_uri, o, runs)
        for run in runs:
            if run.run_id == o.run_id:
                continue
            status = mq.get_run(client, run.run_id).status
            # A finished trial has one FINISHED run: another one FINISHED too is a partial copy
            # (its trial was relogged into a new run), closed so that nothing counts it twice.
            duplicate = o.status == "finished" and o.run_id is not None and status == FINISHED
            if status == "RUNNING" or duplicate or (o.status == "stopped early" and status == "FAILED"):
                # MLflow's client is the one way to end a run the Tracker does not hold
                client.set_terminated(run.run_id, "FAILED" if o.status == "failed" else "KILLED")


def _complete(client, tracking_uri: str, o: TrialOutcome, runs: list) -> Optional[str]:
    """The finished trial's FINISHED run with every epoch of its history; relogged from the run
    directory when MLflow lacks some of it."""

    recorded = (rundir.load_tracking(o.run_dir) or {}).get("run_id")
    run = next((r for r in runs if r.run_id == recorded), None)
    if run is not None and run.status == FINISHED:
        logged = {m.step for m in client.get_metric_history(run.run_id, "val_mAP")}
        if logged >= set(range(o.epochs)):
            return run.run_id
    try:
        return relog(o.run_dir, uri=tracking_uri, flush_timeout_s=120.0)
    except Exception as e:  # noqa: BLE001 - the run directory keeps everything; say how to retry
        warnings.warn(f"MLflow lacks part of trial {o.name} and relogging it failed ({type(e).__name__}: {e}); "
                      f"retry with `python -m mlic_dist.relog {o.run_dir} --tracking-uri URI`")
        return None


def table(results: list[TrialOutcome]) -> str:
    """The trials as a markdown table, best first."""
    rows = sorted(results, key=lambda o: -(o.best_val_mAP if o.best_val_mAP is not None else -1))
    lines = ["| trial | status | epochs | best val mAP | MLflow run |", "|---|---|---|---|---|"]
    for o in rows:
        best = f"{o.best_val_mAP:.4f}" if o.best_val_mAP is not None else "-"
        lines.append(f"| {o.name} | {o.status} | {o.epochs} | {best} | {o.run_id or '-'} |")
    return "\n".join(lines)


def mlflow_command() -> str:
    """`mlflow` as the user can type it: bare when PATH finds this environment's, else its path
    (`.venv/bin/mlflow` after `make demo`, whose environment is not activated)."""
    exe = Path(sys.executable).with_name("mlflow")
    if not exe.is_file() or shutil.which("mlflow") == str(exe):
        return "mlflow"
    return os.path.relpath(exe) if exe.absolute().is_relative_to(Path.cwd().absolute()) else str(exe)


def ui_hint(configured_uri: Optional[str], store_uri: Optional[str], artifacts: Optional[str],
            trial_uri: str, exp_id: Optional[str]) -> str:
    """How to open the runs page (MLflow 3 opens an experiment on a GenAI overview otherwise)."""
    page = f"#/experiments/{exp_id}/runs" if exp_id else ""
    if store_uri:  # a local store the sweep served for its duration
        cmd = f"{mlflow_command()} ui --backend-store-uri {store_uri} --host 127.0.0.1"
        if artifacts:
            cmd += f" --artifacts-destination {artifacts}"
        return f"MLflow UI: {cmd}\n  then open http://127.0.0.1:5000/{page}"
    return f"MLflow UI: open {trial_uri.rstrip('/')}/{page}"
