"""Reading MLflow: which runs an experiment holds, their params and tags, and where their run
directories are.

    from mlic_dist.tracking import query as mq
    client = mq.connect("http://127.0.0.1:5000")          # or sqlite:///mlflow.db, None = default
    runs = mq.finished_runs(client, "mlic", parent_run_id=None)   # single-model runs, FINISHED
    runs[0].run_dir, runs[0].params["data.size"], runs[0].kind    # Path, "448", "single"

Writes go through `mlic_dist.tracking.tracker.Tracker`; this module only queries (MlflowClient API).
A run's directory is its `run_dir` tag, which the trainer and `ensemble` set to the absolute
run directory. Kinds (tag `mlic.kind`): "single" (a training run; runs logged before the tag
existed have none and count as single), "ensemble", "report". MLflow is imported lazily.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import rundir
from ..config import flatten
from ..errors import UserError
from .store import resolve_uri

KIND_TAG = "mlic.kind"
ENSEMBLE_KIND_TAG = "mlic.ensemble_kind"
MEMBERS_TAG = "mlic.members"
DERIVED_TAG = "mlic.derived"       # a single model made from other runs: soup | distill
INGREDIENTS_TAG = "mlic.ingredients"   # a soup's kept runs, in the order kept
CANDIDATES_TAG = "mlic.candidates"     # every run a soup tried
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
RUN_DIR_TAG = "run_dir"
SINGLE = "single"           # mlic.kind of a training run


class TrackingQueryError(UserError, ValueError):
    """An experiment, a run or a run directory named by the user cannot be found."""


@dataclass
class TrackedRun:
    run_id: str
    name: str
    experiment_id: str
    status: str
    start_time: int                  # ms since the epoch
    params: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.tags.get(KIND_TAG, SINGLE)

    @property
    def parent_run_id(self) -> Optional[str]:
        return self.tags.get(PARENT_TAG)

    @property
    def derived(self) -> Optional[str]:
        """soup | distill for a single model made from other runs, None for a training run."""
        return self.tags.get(DERIVED_TAG)

    @property
    def run_dir(self) -> Optional[Path]:
        d = self.tags.get(RUN_DIR_TAG)
        return Path(d) if d else None


@dataclass
class FinishedRun:
    """A finished run's directory (a training run or an ensemble, loaded) with its MLflow
    identity when it has one: what an ensemble fuses and what a report tabulates."""
    run: rundir.RunDir
    name: str = ""
    run_id: Optional[str] = None
    experiment_id: Optional[str] = None
    parent_run_id: Optional[str] = None
    start_time: float = 0.0          # ms (MLflow) or the mtime of metrics.json: newest rerun wins

    @property
    def label(self) -> str:
        return f"{self.name} ({self.run.path})"

    @property
    def is_ensemble(self) -> bool:
        return self.run.is_ensemble

    @property
    def flat_config(self) -> dict:
        return flatten(self.run.config or {})


def finished_run(path, tracked: Optional[TrackedRun] = None) -> FinishedRun:
    """The run directory at `path` with its identity: from `tracked` (its MLflow run: id, name,
    experiment, parent, start) when given, else the run id its tracking.json records."""
    run = rundir.load_run(path)
    metrics_file = run.path / rundir.METRICS
    f = FinishedRun(run, name=run.name, start_time=metrics_file.stat().st_mtime * 1000 if metrics_file.is_file() else 0)
    if tracked is not None:
        f.run_id, f.experiment_id, f.parent_run_id = tracked.run_id, tracked.experiment_id, tracked.parent_run_id
        f.name, f.start_time = tracked.name, tracked.start_time
    elif run.tracking:
        f.run_id = run.tracking.get("run_id")
    return f


def run_link(experiment_id: str, run_id: str) -> str:
    """The MLflow UI's address of a run, relative to the UI root (what notes link to)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def connect(tracking_uri: Optional[str]):
    """An MlflowClient for the URI (None: $MLFLOW_TRACKING_URI or ./mlflow.db), checked to answer:
    a server that is down is one TrackingQueryError naming it, not a traceback."""
    from mlflow.tracking import MlflowClient


    uri = resolve_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # connection refused, timeout, a store that cannot be opened
        raise TrackingQueryError(f"cannot query MLflow at {uri} ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]}); start the tracking server or pass "
                                 f"the right --tracking-uri") from None
    return client


def fail_fast_http() -> None:
    """For the command-line tools only (they own their process): a dead tracking server fails
    in seconds instead of MLflow's minutes of retries. Values set by the user win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise TrackingQueryError(f"MLflow experiment {name!r} does not exist at {client.tracking_uri} "
                                 f"(it has {known}); pass --experiment with one of those or "
                                 f"--tracking-uri of the store the runs were logged to")
    return exp.experiment_id


def _record(run) -> TrackedRun:
    return TrackedRun(run_id=run.info.run_id, name=run.info.run_name or run.info.run_id,
                      experiment_id=run.info.experiment_id, status=run.info.status,
                      start_time=run.info.start_time or 0, params=dict(run.data.params),
                      tags=dict(run.data.tags), metrics=dict(run.data.metrics))


def get_run(client, run_id: str) -> TrackedRun:
    try:
        return _record(client.get_run(run_id))
    except Exception as e:  # MlflowException (RESOURCE_DOES_NOT_EXIST) or a connection error
        raise TrackingQueryError(f"MLflow run {run_id!r} not found at {client.tracking_uri}: "
                                 f"{str(e).splitlines()[0][:200]}") from None


def search(client, experiment: str, filter_string: str = "") -> list[TrackedRun]:
    """Every run of `experiment` matching `filter_string`, oldest first (all pages)."""
    exp_id = experiment_id(client, experiment)
    out, token = [], None
    while True:
        page = client.search_runs([exp_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        out += [_record(r) for r in page]
        token = page.token
        if not token:
            return out


def finished_runs(client, experiment: str, parent_run_id: Optional[str] = None,
                  run_ids: Optional[list[str]] = None, kinds: tuple[str, ...] = (SINGLE,)) -> list[TrackedRun]:
    """FINISHED runs of `kinds` in `experiment`: all of them, those nested directly under
    `parent_run_id`, or exactly `run_ids` (which must exist and be finished)."""
    if run_ids:
        runs = [get_run(client, r) for r in run_ids]
        exp_id = experiment_id(client, experiment) if experiment else None
        for r in runs:
            if exp_id is not None and r.experiment_id != exp_id:
                raise TrackingQueryError(f"MLflow run {r.run_id} ({r.name}) belongs to experiment id "
                                         f"{r.experiment_id}, not to {experiment!r} ({exp_id})")
            if r.status != "FINISHED":
                raise TrackingQueryError(f"MLflow run {r.run_id} ({r.name}) is {r.status}, not FINISHED: "
                                         f"only finished runs have final scores")
            if r.kind not in kinds:
                raise TrackingQueryError(f"MLflow run {r.run_id} ({r.name}) is a {r.kind!r} run (tag {KIND_TAG}); "
                                         f"expected one of {list(kinds)}")
        return runs
    query = "attributes.status = 'FINISHED'"
    if parent_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    return [r for r in search(client, experiment, query) if r.kind in kinds]


def run_dir_of(run: TrackedRun) -> Path:
    """The run's directory on this machine (its `run_dir` tag); raises naming the run."""
    d = run.run_dir
    if d is None:
        raise TrackingQueryError(f"MLflow run {run.run_id} ({run.name}) has no {RUN_DIR_TAG!r} tag: it was "
                                 f"not logged by mlic_dist.train; pass its directory with --run-dirs")
    if not d.is_dir():
        raise TrackingQueryError(f"MLflow run {run.run_id} ({run.name}) names run directory {d}, which is "
                                 f"not on this machine; run this where {d} is (a shared filesystem), "
                                 f"or copy it there")
    return d


def add_run_arguments(parser, tracking_help: str = "with --run: the MLflow tracking URI") -> None:
    """`--run-dir DIR | --run RUN_ID` and `--tracking-uri URI`, as `resolve_run_dir` reads them."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-dir", type=Path, help="a training run or ensemble directory")
    src.add_argument("--run", metavar="RUN_ID", help="an MLflow run id (its run_dir tag names the directory)")
    parser.add_argument("--tracking-uri", help=tracking_help)


def resolve_run_dir(run_dir: Optional[Path], run_id: Optional[str], tracking_uri: Optional[str]) -> Path:
    """The directory a command's `--run-dir DIR` or `--run RUN_ID [--tracking-uri URI]` names
    (predict, export): DIR itself, else the run's `run_dir` tag; TrackingQueryError otherwise."""
    if run_dir is not None:
        return Path(run_dir)
    if not run_id:
        raise TrackingQueryError("give --run-dir DIR or --run RUN_ID")
    return run_dir_of(get_run(connect(tracking_uri), run_id))


def runs_by_dir(runs: list[TrackedRun]) -> dict[Path, TrackedRun]:
    """{resolved run directory: run}, the newest run winning (a directory logged twice)."""
    out = {}
    for r in sorted(runs, key=lambda r: r.start_time):
        if r.run_dir is not None:
            out[r.run_dir.resolve()] = r
    return out


def logged_metrics(tracking_uri: str, run_id: str, curve: str) -> dict:
    """What a run already holds: {"epochs": the steps of its `curve` metric, "final": the names
    of its metrics} (relog adds only what is missing)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return {"epochs": {m.step for m in client.get_metric_history(run_id, curve)},
            "final": set(client.get_run(run_id).data.metrics)}
