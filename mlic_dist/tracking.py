"""The one place that talks to MLflow. Rank 0 only; a tracking failure never stops training.

`Tracker(cfg.tracking, run_dir, active=is_rank0)`:
  - `tracking.enabled=false` or a non-zero rank: every call is a no-op.
  - `tracking.uri=null`: the embedded local store, MLflow 3's SQLite file `mlflow.db` in the
    working directory (the file store is deprecated), artifacts in `./mlartifacts`.
  - A server that is down or errors: one warning, then calls are skipped for `retry_s` seconds
    before the next attempt. The run directory always holds everything (history.jsonl,
    metrics.json, scores), so nothing is lost.
MLflow is imported lazily so a trainer without it runs with tracking off.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from .config import TrackingConfig

# Fail fast on a dead server: MLflow's HTTP client otherwise retries with backoff for minutes.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def init_sqlite_store(uri: str) -> None:
    """Create a fresh SQLite store's schema once, under an exclusive file lock.

    MLflow creates the tables (dozens of Alembic migrations) the first time a client opens a new
    store; several processes doing that at once race, and the half-migrated database then breaks
    every later run. The lock serialises the first open; later opens find the schema and skip it."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, (db.parent / "mlartifacts").resolve().as_uri())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_experiment(client, name: str) -> str:
    """Experiment id for `name`, creating it (with artifacts beside a local store) if needed."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    uri = client.tracking_uri if hasattr(client, "tracking_uri") else ""
    if str(uri).startswith("sqlite:///"):
        db = Path(str(uri)[len("sqlite:///"):])
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, active: bool = True,
                 retry_s: float = 60.0):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.active = active and cfg.enabled
        self.retry_s = retry_s
        self.client = None
        self.run_id: str | None = None
        self._down_since: float | None = None
        self._warned = False
        self._start_args: tuple | None = None  # kept to retry a start the server refused

    # ------------------------------------------------------------------ guarded calls

    def _call(self, what: str, fn, *args, **kwargs):
        if not self.active:
            return None
        if self._down_since is not None and time.time() - self._down_since < self.retry_s:
            return None
        try:
            out = fn(*args, **kwargs)
            if self._down_since is not None:
                warnings.warn(f"MLflow tracking is back; calls skipped while it was down are in {self.run_dir}")
            self._down_since = None
            return out
        except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
            self._down_since = time.time()
            if not self._warned:
                warnings.warn(f"MLflow {what} failed ({type(e).__name__}: {e}); training goes on, "
                              f"everything is kept in {self.run_dir}", stacklevel=3)
                self._warned = True
            return None

    # ------------------------------------------------------------------ run lifecycle

    def start(self, params: dict, resume_run_id: str | None = None, tags: dict | None = None) -> str | None:
        """Open (or re-open, after a resume) the run; returns its id. If the server is down, the
        start is retried (after `retry_s`) by the next call that logs something."""
        if not self.active:
            return None
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            warnings.warn("mlflow is not installed: tracking is off")
            self.active = False
            return None
        self.client = MlflowClient(tracking_uri=resolve_uri(self.cfg.uri))
        self._start_args = (params, resume_run_id, tags)
        return self._try_start()

    def _try_start(self) -> str | None:
        params, resume_run_id, tags = self._start_args

        def _start():
            if resume_run_id:
                self.client.update_run(resume_run_id, status="RUNNING")
                return resume_run_id
            exp_id = ensure_experiment(self.client, self.cfg.experiment)
            all_tags = {"mlflow.runName": self.cfg.run_name or self.run_dir.name,
                        "run_dir": str(self.run_dir.resolve())}
            if self.cfg.parent_run_id:
                all_tags["mlflow.parentRunId"] = self.cfg.parent_run_id
            all_tags.update(tags or {})
            run = self.client.create_run(exp_id, tags=all_tags)
            return run.info.run_id

        self.run_id = self._call("start_run", _start)
        if self.run_id and not resume_run_id:
            self.log_params(params)
        return self.run_id

    def _ready(self) -> bool:
        """A run is open, or a retried start just opened it."""
        if not self.active or self.client is None:
            return False
        if self.run_id is None and self._start_args is not None:
            self._try_start()
        return self.run_id is not None

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the REST API takes at most 100 params a batch
            self._call("log_params", self.client.log_batch, self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int) -> None:
        if not self._ready():
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_at_"), float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]  # NaN never reaches the store
        self._call("log_metrics", self.client.log_batch, self.run_id, metrics=items)

    def log_artifacts(self, paths: list[Path]) -> None:
        if not self.cfg.log_artifacts or not self._ready():
            return
        for p in paths:
            if Path(p).is_file():
                self._call("log_artifact", self.client.log_artifact, self.run_id, str(p))

    def finish(self, status: str = "FINISHED") -> None:
        if self._ready():
            self._call("end_run", self.client.set_terminated, self.run_id, status)
