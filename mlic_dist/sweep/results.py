"""After the trials: which child runs finished, the trial table, and where to look in MLflow.

The trainer opens one MLflow run per trial (nested under the sweep's parent run through
`tracking.parent_run_id`) and ends it FINISHED or FAILED. A worker killed by ASHA, or an attempt
that died before its first checkpoint (its retry opens a new run), leaves a run RUNNING; it is
closed here as KILLED so that only trials that really finished feed the ensembles and report.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FINISHED = "FINISHED"


@dataclass
class TrialOutcome:
    name: str
    status: str                    # finished | stopped early | failed
    epochs: int
    best_val_mAP: Optional[float]
    run_id: Optional[str] = None   # the FINISHED MLflow child run, if any
    error: str = ""


def outcomes(result_grid, spec, interrupted: bool = False) -> list[TrialOutcome]:
    """One outcome per grid point, in grid order. A trial finished when its trainer wrote
    metrics.json (the last step of train()); one without an error that did not was stopped early
    by ASHA, or is unfinished when the sweep was interrupted (Ctrl-C)."""
    from .. import rundir

    by_name = {}
    for r in result_grid:
        trial = spec.trial({k: r.config[k] for k in spec.grid})
        m = r.metrics or {}
        if r.error is not None:
            status = "failed"
        elif (trial.output_dir / rundir.METRICS).is_file():
            status = "finished"
        else:
            status = "unfinished" if interrupted else "stopped early"
        best = m.get("best_val_mAP")
        by_name[trial.name] = TrialOutcome(
            trial.name, status, int(m.get("epochs_done", 0) or 0), float(best) if best is not None else None,
            error=str(r.error).strip().splitlines()[0][:300] if r.error is not None else "")
    return [by_name.get(t.name) or TrialOutcome(t.name, "not started", 0, None) for t in spec.trials()]


def experiment_id(tracking_uri: str, parent_run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_run(parent_run_id).info.experiment_id


def child_runs(tracking_uri: str, parent_run_id: str) -> list:
    """Every run nested under the sweep's parent run (trials; ensembles once built)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                              max_results=10_000)


def settle_trial_runs(tracking_uri: str, parent_run_id: str, results: list[TrialOutcome]) -> None:
    """Attach each finished trial's FINISHED run id; close the trial runs left RUNNING: FAILED for
    a failed trial, KILLED for one stopped early (also when its trainer said FAILED) or an
    attempt superseded by a retry's new run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    names = {o.name: o for o in results}
    for run in child_runs(tracking_uri, parent_run_id):
        o = names.get(run.data.tags.get("mlflow.runName"))
        if o is None:
            continue
        if run.info.status == FINISHED and o.status == "finished":
            o.run_id = run.info.run_id
        elif run.info.status == "RUNNING" or (o.status == "stopped early" and run.info.status == "FAILED"):
            # (a trainer whose workers ASHA stopped may have ended its run FAILED on the way out)
            client.set_terminated(run.info.run_id, "FAILED" if o.status == "failed" else "KILLED")


def table(results: list[TrialOutcome]) -> str:
    """The trials as a markdown table, best first."""
    rows = sorted(results, key=lambda o: -(o.best_val_mAP if o.best_val_mAP is not None else -1))
    lines = ["| trial | status | epochs | best val mAP | MLflow run |", "|---|---|---|---|---|"]
    for o in rows:
        best = f"{o.best_val_mAP:.4f}" if o.best_val_mAP is not None else "-"
        lines.append(f"| {o.name} | {o.status} | {o.epochs} | {best} | {o.run_id or '-'} |")
    return "\n".join(lines)


def ui_hint(configured_uri: Optional[str], store_uri: Optional[str], artifacts: Optional[str],
            trial_uri: str, exp_id: Optional[str]) -> str:
    """How to open the runs page (MLflow 3 opens an experiment on a GenAI overview otherwise)."""
    page = f"#/experiments/{exp_id}/runs" if exp_id else ""
    if store_uri:  # a local store the sweep served for its duration
        cmd = f"mlflow ui --backend-store-uri {store_uri} --host 127.0.0.1"
        if artifacts:
            cmd += f" --artifacts-destination {artifacts}"
        return f"MLflow UI: {cmd}\n  then open http://127.0.0.1:5000/{page}"
    return f"MLflow UI: open {trial_uri.rstrip('/')}/{page}"
