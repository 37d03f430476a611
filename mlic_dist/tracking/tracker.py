"""The one place that writes to MLflow. Rank 0 only; tracking never stops or stalls training.

`Tracker(cfg.tracking, run_dir, active=is_rank0)` queues every call (start, params, metrics,
tags, artifacts, end) and returns at once; one background thread drains the queue to MLflow, so
no tracking call runs on the training loop's critical path:
  - `tracking.enabled=false` or a non-zero rank: every call is a no-op.
  - `tracking.uri=null`: the embedded local store, MLflow 3's SQLite file `mlflow.db` in the
    working directory (the file store is deprecated), artifacts in `./mlartifacts`. A fresh
    SQLite store is created once under a file lock (`init_sqlite_store`), so several trainers
    can open one new store together (concurrent schema creation races otherwise).
  - A store that cannot be created or reached, or a server that errors or never answers: one
    warning; the thread retries with backoff while training goes on; the queue is bounded
    (oldest step-level metrics are dropped first when it fills). `finish()` flushes for at most
    `tracking.flush_timeout_s` while MLflow answers, a few seconds when a server is down or never
    answered (a local store is waited for: its locks pass; a local store that cannot be created
    at all turns tracking off with a warning).
  - The run directory always holds everything (history.jsonl, metrics.json, scores); a run whose
    tracking failed is re-logged later with `python -m mlic_dist.relog RUN_DIR` (relog.py).
`tracking.json` in the run directory (rank 0, even with tracking off) records the tags and
dataset inputs the run is given, the MLflow run once it exists (resume re-opens it), and whether
MLflow took everything (`complete`; false with `gave_up` when finish() gave up), so that `relog`
completes the run a live one would have been.
MLflow is imported lazily (in the thread), so a trainer without it runs with tracking off.
"""
from __future__ import annotations

import collections
import importlib.util
import itertools
import os
import subprocess
import threading
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Optional

from .. import rundir
from ..config import TrackingConfig
from .store import ensure_experiment, init_sqlite_store, resolve_uri

# MLflow errors that retrying cannot fix (the request itself is wrong): the op is dropped.
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS",
                    "INVALID_STATE", "MALFORMED_REQUEST"}
_DOWN_GRACE_S = 3.0    # how long finish() waits for a server that is down or never answered
_STUCK_S = 20.0        # ... or that holds one call this long (MLflow's own HTTP retries)


# --------------------------------------------------------------------------- what a run says


def final_metrics(result: dict) -> dict:
    """metrics.json's dict -> flat MLflow metric names, one definition for runs and ensembles:
    `final_val_mAP`, `test_mAP`, `test_chance_mAP`, `test_top3_OF1`, `test_thresh_CF1`, ... (`val_*` names the
    per-epoch curves, so the final validation scores are `final_val_*`)."""
    flat = {}
    for name in ("val", "test"):
        r = result.get(name)
        if not isinstance(r, dict):
            continue
        prefix = "final_val" if name == "val" else name
        flat[f"{prefix}_mAP"], flat[f"{prefix}_eAP"] = r.get("mAP"), r.get("eAP")
        flat[f"{prefix}_chance_mAP"] = r.get("chance_mAP")   # random scores' expected mAP
        if isinstance(r.get("loss"), (int, float)):
            flat[f"{prefix}_loss"] = r["loss"]
        for rule in [k for k in r if isinstance(r[k], dict) and k != "settings"]:
            for m, v in r[rule].items():
                if isinstance(v, (int, float)):
                    flat[f"{prefix}_{rule}_{m}"] = v
    return {k: v for k, v in flat.items() if v is not None}


def code_version_tags() -> dict:
    """MLflow's source tags for the code that runs: the git commit of the mlic_dist checkout
    (`mlflow.source.git.commit`, plus whether its tracked files had uncommitted changes), else
    the installed package version. Read-only: git takes no index lock (GIT_OPTIONAL_LOCKS=0), so
    many trainers starting from one checkout never contend with each other or the user's git."""
    pkg = Path(__file__).resolve().parents[1]   # mlic_dist/
    tags = {"mlflow.source.name": "mlic_dist", "mlflow.source.type": "LOCAL"}
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        commit = subprocess.run(["git", "-C", str(pkg), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, env=env)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(pkg), "status", "--porcelain", "--untracked-files=no",
                                    "--", str(pkg)], capture_output=True, text=True, timeout=5, env=env)
            tags["mlic.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
            return tags
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        tags["mlic.version"] = version("mlic_dist")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        pass
    return tags


# --------------------------------------------------------------------------- the tracker


def open_store(client) -> None:
    """Make the MlflowClient build its tracking store now: its private `_tracking_client.store`,
    checked against mlflow 3.18 (tests/test_private_apis.py: an unknown scheme raises here)."""
    client._tracking_client.store


class _Permanent(Exception):
    pass


class Tracker:
    def __init__(self, cfg: TrackingConfig, run_dir: str | Path, active: bool = True,
                 retry_s: float = 30.0, max_queue: int = 10_000):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank0 = active        # writes tracking.json (also with tracking off)
        self.active = active and cfg.enabled
        if self.active and importlib.util.find_spec("mlflow") is None:
            warnings.warn("mlflow is not installed: tracking is off (the run directory holds everything)")
            self.active = False
        self.retry_s = retry_s
        self.max_queue = max_queue
        self.uri = resolve_uri(cfg.uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.dropped = 0
        self.answered = False      # some MLflow call succeeded
        self.down = False          # the last MLflow call failed
        self._remote = not self.uri.startswith(("sqlite:", "file:", "/"))
        self._params_logged = False
        self._inputs_logged = False
        self._client = None
        self._queue: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._busy = False          # the thread is executing an op
        self._op_since = 0.0        # when the op in flight started
        self._closed = False
        self._abandoned = False     # finish() gave up: the thread stops at its next chance
        self._warned: set[str] = set()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()   # the run exists, or starting it failed for good
        self._record: dict = {}     # tracking.json's content (_note writes it)
        self._record_lock = threading.Lock()

    # ------------------------------------------------------------------ public, non-blocking

    def start(self, params: dict, resume_run_id: str | None = None, tags: dict | None = None,
              inputs: Optional[list[dict]] = None, wait_s: float = 0.0) -> str | None:
        """Queue the run's creation (or re-opening, after a resume) with its params, tags and
        dataset inputs ({"name", "digest", "source"}). Returns the run id if it exists within
        `wait_s` seconds (0 for training: it never waits), else None (`run_id` fills in later)."""
        if self.rank0 and self.run_dir.is_dir():
            old = rundir.load_tracking(self.run_dir) or {}
            if not (resume_run_id and old.get("run_id") == resume_run_id):
                old = {}      # a new run: nothing of a previous one's record carries over
            self._record = dict(old)
            # what MLflow gets (or would have got): the first start's code tags stay
            record_tags = {**code_version_tags(), **(old.get("tags") or {}),
                           **{k: str(v) for k, v in (tags or {}).items()}}
            fields = dict(tags=record_tags, inputs=list(inputs or old.get("inputs") or []),
                          complete=None, gave_up=None)
            # with tracking off, or logging to another store, the run MLflow has from before
            # stays named until this one exists
            if self.active and old.get("tracking_uri") in (None, self.uri):
                fields.update(tracking_uri=self.uri, experiment=self.cfg.experiment,
                              run_id=old.get("run_id"))
            self._note(**fields)
        if not self.active:
            return None
        self._thread = threading.Thread(target=self._drain, name="mlic-tracking", daemon=True)
        self._thread.start()
        self._put(("start", dict(params), resume_run_id, dict(tags or {}), list(inputs or [])))
        if wait_s:
            self._started.wait(wait_s)
        return self.run_id

    def log_params(self, params: dict) -> None:
        self._put(("params", dict(params)))

    def set_tags(self, tags: dict) -> None:
        tags = {k: str(v) for k, v in tags.items()}
        if self._record:
            self._note(tags={**self._record.get("tags", {}), **tags})
        self._put(("tags", tags))

    def log_metrics(self, metrics: dict, step: int, step_level: bool = False) -> None:
        """`step_level` marks high-rate metrics, the first dropped when the queue is full."""
        items = {k.replace("@", "_at_"): float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}  # no NaN
        if items:
            self._put(("metrics", items, int(step), int(time.time() * 1000)), step_level=step_level)

    def log_artifacts(self, paths: list, artifact_path: str | None = None) -> None:
        if self.cfg.log_artifacts:
            self._put(("artifacts", [str(p) for p in paths], artifact_path))

    def finish(self, status: str = "FINISHED") -> bool:
        """End the run and flush: up to `tracking.flush_timeout_s` while MLflow answers, a few
        seconds when a server is down, never answered, or sits on one call. Returns True when
        MLflow received everything; otherwise warns how to re-log the run directory, and the
        thread stops (it would otherwise log behind the user's back, or leak in a long-lived
        process such as a reused Ray worker)."""
        if not self.active or self._thread is None:
            return True
        self._put(("end", status))
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        closed_at = time.time()
        deadline = closed_at + self.cfg.flush_timeout_s
        while self._thread.is_alive() and time.time() < deadline:
            self._thread.join(0.2)
            # A local store that failed (locked by other writers) recovers: wait. A server that
            # is down, never answered, or sits on one call gets a few seconds.
            stuck = self._busy and time.time() - self._op_since > _STUCK_S
            unreachable = self._remote and (self.down or not self.answered or stuck)
            if unreachable and time.time() > closed_at + _DOWN_GRACE_S:
                break
        with self._cv:
            self._abandoned = True
            self._cv.notify_all()
        complete = (not self._thread.is_alive() and self.dropped == 0 and not self.down
                    and self.run_id is not None)
        if self._record:
            reason = None if complete else (
                f"MLflow at {self.uri} " + ("never created the run" if self.run_id is None else
                                            "was unreachable when the run ended" if self.down or self._thread.is_alive()
                                            else f"lost {self.dropped} queued calls"))
            self._note(complete=complete, gave_up=reason)
        if not complete:
            warnings.warn(f"MLflow ({self.uri}) did not receive all of this run: everything is in "
                          f"{self.run_dir}; log it later with `python -m mlic_dist.relog "
                          f"{self.run_dir}`", stacklevel=2)
        return complete

    # ------------------------------------------------------------------ queue

    def _put(self, op: tuple, step_level: bool = False) -> None:
        if not self.active or self._thread is None:
            return
        with self._cv:
            if len(self._queue) >= self.max_queue:
                first = 1 if self._busy else 0   # the op being executed stays
                victim = next((i for i in range(first, len(self._queue)) if self._queue[i][0]), None)
                if victim is None and step_level:
                    self.dropped += 1
                    self._warn_once("full", f"MLflow queue full ({self.max_queue} calls): dropping "
                                    f"step metrics; the run directory {self.run_dir} keeps every epoch")
                    return
                if victim is not None:
                    del self._queue[victim]
                    self.dropped += 1
            self._queue.append((step_level, op))
            self._cv.notify_all()

    def _note(self, **fields) -> None:
        """Merge `fields` into tracking.json (from the caller's thread or the tracking thread)."""
        with self._record_lock:
            self._record.update(fields)
            record = {"tracking_uri": None, "experiment": None, "run_id": None,
                      **{k: v for k, v in self._record.items() if v is not None}}
            try:
                rundir.write_tracking(self.run_dir, **record)
            except OSError as e:   # the run directory is the trainer's business; never stop for it
                self._warn_once("record", f"cannot write {self.run_dir / rundir.TRACKING}: {e}")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _drain(self) -> None:
        backoff = 1.0
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue or self._abandoned:
                    return
                _, op = self._queue[0]
                self._busy, self._op_since = True, time.time()
            try:
                if op[0] != "start" and self.run_id is None:
                    ok = True   # the start failed for good (warned): nothing to log to
                else:
                    self._execute(op)
                    ok = True
            except _Permanent as e:
                self._warn_once(f"perm-{op[0]}", f"MLflow {op[0]} failed and is skipped ({e}); "
                                f"training goes on, everything is kept in {self.run_dir}")
                if op[0] == "start":
                    self._started.set()
                ok = True   # dropped: retrying cannot fix it
            except Exception as e:  # noqa: BLE001 - any tracking failure must not stop training
                self.down = True
                if self._abandoned:   # finish() already told the user how to relog
                    return
                self._warn_once("down", f"MLflow {op[0]} failed ({type(e).__name__}: {str(e)[:300]}); "
                                f"training goes on, retrying in the background; everything is kept "
                                f"in {self.run_dir}")
                ok = False
            with self._cv:
                self._busy = False
                if ok:
                    self._queue.popleft()
                    backoff = 1.0
                self._cv.notify_all()
                if not ok and not self._abandoned:
                    if self._closed:
                        self._cv.wait(min(backoff, _DOWN_GRACE_S))
                    else:
                        self._cv.wait(backoff)
                    backoff = min(backoff * 2, self.retry_s) if self.retry_s > 0 else 0.0

    # ------------------------------------------------------------------ MLflow calls (the thread)

    def _client_for_uri(self):
        if self._client is None:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient

            try:
                init_sqlite_store(self.uri)
            except Exception as e:  # noqa: BLE001 - "locked" is transient; the rest is a bad path
                if "locked" in str(e):
                    raise
                raise _Permanent(f"the local MLflow store {self.uri} cannot be created or opened "
                                 f"({type(e).__name__}: {str(e)[:200]}); set tracking.uri to a "
                                 f"writable location") from None
            try:
                client = MlflowClient(tracking_uri=self.uri)
                open_store(client)   # an unknown scheme fails here, not in the first logging call
            except MlflowException as e:
                if "unsupported URI" in str(e) or "registered tracking store" in str(e):
                    raise _Permanent(f"tracking.uri={self.uri!r} is not a URI MLflow can use: {e}") from None
                raise
            self._client = client
        return self._client

    def _execute(self, op: tuple) -> None:
        from mlflow.exceptions import MlflowException

        try:
            getattr(self, "_op_" + op[0])(*op[1:])
            self.answered, self.down = True, False
        except MlflowException as e:
            if getattr(e, "error_code", None) in _PERMANENT_CODES:
                raise _Permanent(str(e)[:300]) from None
            raise

    def _op_start(self, params, resume_run_id, tags, inputs) -> None:
        """Idempotent: a retry after a failure part-way goes on where the last attempt stopped."""
        client = self._client_for_uri()
        if self.run_id is None and resume_run_id:
            from mlflow.exceptions import MlflowException

            try:
                run = client.get_run(resume_run_id)
                client.update_run(resume_run_id, status="RUNNING")
                self.run_id, self.experiment_id = resume_run_id, run.info.experiment_id
                # params are immutable: a run that has them keeps them; one whose start was cut
                # off before its params (or dataset inputs) arrived gets them now
                self._params_logged = bool(run.data.params)
                self._inputs_logged = bool(run.inputs is not None and run.inputs.dataset_inputs)
                if tags:
                    self._op_tags({k: str(v) for k, v in tags.items()})
            except MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise                     # the run is gone (another store): a new run below
        if self.run_id is None:
            self.experiment_id = ensure_experiment(client, self.cfg.experiment)
            all_tags = {"mlflow.runName": self.cfg.run_name or self.run_dir.name,
                        "run_dir": str(self.run_dir.resolve())}
            if self.cfg.parent_run_id:
                all_tags["mlflow.parentRunId"] = self.cfg.parent_run_id
            all_tags.update(code_version_tags())
            all_tags.update({k: str(v) for k, v in tags.items()})
            self.run_id = client.create_run(self.experiment_id, tags=all_tags).info.run_id
        if not self._params_logged:
            self._op_params(params)
        if inputs and not self._inputs_logged:
            from mlflow.entities import Dataset, DatasetInput

            client.log_inputs(self.run_id, [DatasetInput(Dataset(
                name=i["name"], digest=i["digest"][:36], source_type="local", source=i["source"]))
                for i in inputs])
        self._params_logged = self._inputs_logged = True
        if self.run_dir.is_dir():
            if self._record:
                self._note(tracking_uri=self.uri, experiment=self.cfg.experiment, run_id=self.run_id)
            else:   # the directory appeared after start()
                rundir.write_tracking(self.run_dir, self.uri, self.cfg.experiment, self.run_id)
        self._started.set()

    def _op_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the REST API takes at most 100 params a batch
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def _op_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._client.log_batch(self.run_id, tags=[RunTag(k, v[:5000]) for k, v in tags.items()])

    def _op_metrics(self, items: dict, step: int, ts: int) -> None:
        from mlflow.entities import Metric

        batch = [Metric(k, v, ts, step) for k, v in items.items()]
        # Later metric calls already queued go in the same request (one round trip, not many).
        # They leave the queue only once the request succeeded: a failure retries them all.
        merged = []
        with self._cv:
            for entry in itertools.islice(self._queue, 1, None):
                if entry[1][0] != "metrics" or len(batch) >= 900:
                    break
                _, more, mstep, mts = entry[1]
                batch += [Metric(k, v, mts, mstep) for k, v in more.items()]
                merged.append(entry)
        self._client.log_batch(self.run_id, metrics=batch)
        if merged:
            with self._cv:
                done = {id(e) for e in merged}
                kept = [e for e in self._queue if id(e) not in done]
                self._queue.clear()
                self._queue.extend(kept)

    def _op_artifacts(self, paths: list, artifact_path) -> None:
        for p in paths:
            if Path(p).is_file():
                self._client.log_artifact(self.run_id, p, artifact_path)

    def _op_end(self, status: str) -> None:
        self._client.set_terminated(self.run_id, status)
