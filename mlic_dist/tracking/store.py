"""Where runs are tracked: the tracking URI (`tracking.uri`, else $MLFLOW_TRACKING_URI, else the
embedded local store `sqlite:///./mlflow.db` with its artifacts in `./mlartifacts` beside it),
creating a fresh local store safely, and experiments.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional


def default_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def resolve_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


def local_store(uri: str) -> Optional[tuple[Path, Path]]:
    """(database file, artifact folder beside it) for a `sqlite:///PATH` URI, else None: the one
    place that knows where a local store keeps its artifacts."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return db, (db.parent / "mlartifacts").resolve()


def init_sqlite_store(uri: str) -> None:
    """Create a fresh SQLite store's schema once, under an exclusive file lock.

    MLflow creates the tables (dozens of Alembic migrations) the first time a client opens a new
    store; several processes doing that at once race, and the half-migrated database then breaks
    every later run. The lock serialises the first open; later opens find the schema and skip it."""
    store = local_store(uri)
    if store is None:
        return

    db, artifacts = store
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(f".{db.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(uri, artifacts.as_uri())
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_experiment(client, name: str) -> str:
    """Experiment id for `name`, creating it (with artifacts beside a local store) if needed."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    store = local_store(str(getattr(client, "tracking_uri", "")))
    artifact_location = store[1].as_uri() if store else None
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
