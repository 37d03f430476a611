"""`run_sweep(spec, ...)`: validate, start tracking and Ray, run the Tuner, then ensembles,
report and the MLflow UI hint. `launch/sweep.py` parses the command line and calls it.

Order (nothing starts before the input is known good):
  1. the shards of every trial exist and (without --address) the pretrained weight files are
     here (SweepError otherwise), --dry-run prints the trials here;
  2. SWEEP.root/NAME/sweep.json: a new sweep must not exist yet, a --resume must match it;
  3. tracking: a local store (tracking.uri null or sqlite:///...) gets an `mlflow server` on
     127.0.0.1 for the sweep's duration, so trials never write one SQLite file from many
     processes; on a cluster (--address) the user gives a server every node reaches;
  4. Ray (started here, or joined), the trial plan from its resources, on a cluster the storage
     and weights check on every node (all problems in one error); the parent MLflow run (the
     grid, the sweep file, its status);
  5. Tuner.fit() (or Tuner.restore(...).fit() with --resume) with the progress view;
  6. trial runs settled (left-over RUNNING runs closed as KILLED), ensembles of the finished
     trials (`mlic_dist.ensemble.build.build_ensembles`) and the report (`mlic_dist.report`), nested
     under the parent run; the runs-page address.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from ..config import TrackingConfig, config_from_dict, flatten
from ..ensemble.build import build_ensembles
from ..report.tables import build_report
from ..tracking.server import MlflowServer, port_in_use
from ..tracking.store import default_uri
from ..tracking.tracker import Tracker
from .cluster import check_nodes, connect, plan
from .reaper import reap_on_death
from .results import experiment_id, outcomes, settle_trial_runs, table, ui_hint
from .spec import SweepError, SweepSpec, check_shards, check_weights, describe_resources, dump, ensemble_names
from .state import check_state, stop_stale_server, write_state
from .tune import TrialContext, make_releaser, make_stop_recorder, make_tuner

# Tune saves its experiment state at most every 10 s by default: a sweep killed within 10 s of
# a trial finishing would run that trial again on --resume. Saving is cheap at sweep scale.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
# Tune's legacy output engine at verbose=0 prints nothing (the new one still draws its tables);
# the sweep prints its own progress view.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# MLflow's REST client prints a "View run at http://127.0.0.1:PORT" link when a run ends; the
# sweep's server port is gone afterwards: the sweep prints the lasting address instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def run_sweep(spec: SweepSpec, address: Optional[str] = None, resume: bool = False,
              dry_run: bool = False, out=None, callbacks: tuple = (), mlflow_port: int = 0) -> int:
    """Run (or resume) the sweep; returns 0 when every trial finished or was stopped early by
    ASHA, 1 when some failed, 130 when it was interrupted (Ctrl-C; --resume continues it).
    Raises SweepError (one line) on bad input, before any trial.
    `callbacks`: extra Tune callbacks (bench/sweep.py times the trials with one).
    `mlflow_port`: the port of the sweep's own MLflow server (local stores), 0 = a free one."""
    out = out or sys.stdout
    trials = spec.trials()
    if dry_run:
        _print_dry_run(spec, trials, out)
        try:
            check_shards(spec)
            if address is None:
                check_weights(spec)
        except SweepError as e:
            print(f"warning: a real run would stop here: {e}", file=out)
        return 0
    shards = check_shards(spec)
    if address is None:   # the trials run here; on a cluster every node is probed (check_nodes)
        check_weights(spec)
    state = check_state(spec, resume)
    base = config_from_dict(spec.base)
    configured = base.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    store = _local_store(configured)
    if mlflow_port and store is None:
        raise SweepError(f"--mlflow-port {mlflow_port}: the sweep starts no MLflow server, tracking.uri="
                         f"{configured} is one already; drop --mlflow-port")
    if mlflow_port and not 0 < mlflow_port < 65536:
        raise SweepError(f"--mlflow-port {mlflow_port}: not a port; give 1-65535, or 0 for a free one")
    if mlflow_port and port_in_use("127.0.0.1", mlflow_port):
        raise SweepError(f"--mlflow-port {mlflow_port}: 127.0.0.1:{mlflow_port} is in use (another MLflow "
                         f"server or UI?); stop it, pick another port, or 0 for a free one")
    if store is not None and address is not None:
        raise SweepError(f"tracking.uri={configured or 'null'} is a local file store, which trials on other nodes "
                         f"cannot reach: start `mlflow server --host 0.0.0.0 ...` where every node reaches it and "
                         f"pass tracking.uri=http://HOST:PORT")
    with contextlib.ExitStack() as stack:
        tracking_uri, artifacts, server_start = configured, None, None
        timings = {"mlflow_server_s": 0.0}
        if store is not None:
            spec.root_dir.mkdir(parents=True, exist_ok=True)
            stop_stale_server(state, store)  # left behind by a sweep that was killed
            server = MlflowServer(store, port=mlflow_port, log_file=spec.root_dir / "mlflow-server.log")
            # uvicorn stops at once (its job consumers, when enabled, took ~10 s on SIGTERM): cap the wait.
            stack.callback(server.stop, 5.0)
            # The server comes up while Ray starts (both take seconds to tens of seconds).
            pool = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="mlflow-server"))
            server_start = pool.submit(_timed, server.start)
        import ray


        if address is None:   # this process starts Ray: its processes end with it, even on SIGKILL
            stack.enter_context(reap_on_death())
        t_ray = time.time()
        connect(address)
        stack.callback(ray.shutdown)
        timings["ray_start_s"] = time.time() - t_ray
        if server_start is not None:
            timings["mlflow_server_s"] = server_start.result()
            tracking_uri, artifacts = server.uri, str(server.artifacts)
            state = write_state(spec, state, mlflow_server={"pid": server.proc.pid, "store": store,
                                                            "uri": server.uri})
        the_plan = plan(spec, len(trials), ray.cluster_resources())
        if address is not None:
            n = check_nodes(spec, shards, the_plan)
            print(f"pre-flight: {n} node(s) share {spec.root_dir}; the ones that host workers read the shards and "
                  f"have the weights", file=out)
        return _run(spec, trials, the_plan, state, resume, tracking_uri, store, artifacts, out, list(callbacks),
                    timings)


def _timed(fn) -> float:
    t = time.time()
    fn()
    return time.time() - t


def _run(spec, trials, the_plan, state, resume, tracking_uri, store, artifacts, out, callbacks, timings) -> int:
    from .progress import ProgressView

    base = config_from_dict(spec.base)
    root = spec.root_dir
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.yaml").write_text(dump(spec))
    parent = Tracker(TrackingConfig(uri=tracking_uri, experiment=base.tracking.experiment, run_name=spec.name),
                     root, active=True)
    resumed = state.get("parent_run_id")
    # The trials nest under this run, so wait for its id (the Tracker queues, it never blocks).
    parent_id = parent.start(_parent_params(spec), resume_run_id=resumed, wait_s=120.0,
                             tags={"sweep": spec.name, "sweep.trials": len(trials), "mlic.kind": "sweep"})
    if parent_id is None:
        print(f"warning: MLflow at {tracking_uri} did not open the sweep's parent run; trials are tracked "
              f"without it (their run directories keep everything)", file=out)
    state = write_state(spec, state, parent_run_id=parent_id or resumed)
    if not resumed:
        parent.log_artifacts([p for p in (Path(spec.source) if spec.source else None, root / "sweep.yaml") if p])
    print(f"sweep {spec.name}: {len(trials)} trials over {' x '.join(spec.grid)}; {the_plan.describe()}\n"
          f"  trials:   {root}/<trial>   (each with train.log, checkpoints, metrics)\n"
          f"  tracking: {tracking_uri}" + (f" (mlflow server over {store})" if store else "") +
          f", experiment {base.tracking.experiment!r}, parent run {parent_id}", file=out, flush=True)
    ctx = TrialContext(spec, the_plan, tracking_uri, parent_id)
    view = ProgressView(len(trials), spec.settings.progress_every_s, stream=out,
                        epochs={t.name: t.cfg.train.epochs for t in trials})
    status = "KILLED"
    try:
        t_fit = time.time()
        grid = make_tuner(ctx, [view, make_releaser(), make_stop_recorder(spec), *callbacks], resume).fit()
        timings["tune_fit_s"] = time.time() - t_fit
        # Tune returns normally after a Ctrl-C too, with trials neither terminated nor errored.
        interrupted = len(grid) < len(trials) or grid.num_terminated + grid.num_errors < len(grid)
        results = outcomes(grid, spec)
        # ... and marks the trials it ended TERMINATED: one neither finished nor stopped by ASHA
        interrupted = interrupted or any(o.status == "unfinished" for o in results)
        failed = [o for o in results if o.status == "failed"]
        t_post = time.time()
        if parent_id:
            settle_trial_runs(tracking_uri, base.tracking.experiment, parent_id, results)
        print("\n" + table(results), file=out)
        for o in failed:
            print(f"failed: {o.name}: {o.error} (log: {root / o.name / 'train.log'})", file=out)
        finished = [o.run_id for o in results if o.status == "finished" and o.run_id]
        if not interrupted:
            _ensembles_and_report(spec, base, tracking_uri, parent_id, finished, out)
        timings["ensembles_report_s"] = time.time() - t_post
        best = max((o.best_val_mAP for o in results if o.best_val_mAP is not None), default=None)
        parent.log_metrics({"trials_finished": sum(o.status == "finished" for o in results),
                            "trials_stopped_early": sum(o.status == "stopped early" for o in results),
                            "trials_failed": len(failed), "best_val_mAP": best if best is not None else float("nan"),
                            **timings}, step=0)
        (root / "timings.json").write_text(json.dumps(timings, indent=2))
        status = "KILLED" if interrupted else "FAILED" if failed else "FINISHED"
        exp = experiment_id(tracking_uri, parent_id) if parent_id else None
        print(ui_hint(base.tracking.uri, store, artifacts, tracking_uri, exp), file=out)
        if interrupted:
            print("the sweep was interrupted; continue it with the same command and --resume", file=out)
            return 130
        if failed:
            print(f"{len(failed)} trial(s) failed; retry them with the same command and --resume", file=out)
        return 1 if failed else 0
    finally:
        parent.finish(status)


def _ensembles_and_report(spec, base, tracking_uri, parent_id, finished, out) -> None:
    """Ensembles of the finished trials, then the report, nested under the parent run. They only
    read what the trials left, so a failure here is reported in one line and loses nothing (run
    `python -m mlic_dist.ensemble` / `python -m mlic_dist.report` on the sweep later)."""
    experiment = base.tracking.experiment
    steps = []
    if spec.ensembles and len(finished) >= 2:
        steps.append(("ensembles", lambda: _ensembles(spec, experiment, tracking_uri, parent_id, finished, out)))
    elif spec.ensembles:
        print(f"ensembles skipped: {len(finished)} finished trial(s), an ensemble needs 2", file=out)
    if spec.settings.report:
        steps.append(("report", lambda: _report(spec, experiment, tracking_uri, parent_id, out)))
    for what, step in steps:
        try:
            step()
        except ImportError as e:
            print(f"{what} skipped: {e.name or 'a module'} is not in this checkout", file=out)
        except Exception as e:  # noqa: BLE001 - the trials are done; say what failed and go on
            print(f"{what} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); the trials "
                  f"are complete, rerun it with `python -m mlic_dist.{'ensemble' if what == 'ensembles' else what}`",
                  file=out)


def _ensembles(spec, experiment, tracking_uri, parent_id, finished, out) -> None:
    built = build_ensembles(experiment, list(spec.ensembles), tracking_uri, parent_run_id=parent_id,
                            out_dir=spec.root_dir / "ensembles", run_ids=finished)
    print(f"ensembles: {len(built)} built from {len(finished)} finished trials ({', '.join(ensemble_names(spec.ensembles))}), "
          f"under {spec.root_dir / 'ensembles'}", file=out)


def _report(spec, experiment, tracking_uri, parent_id, out) -> None:
    report = build_report(experiment, tracking_uri, spec.root_dir / "report", parent_run_id=parent_id)
    full = next((str(p) for p in getattr(report, "paths", []) if str(p).endswith(".md")), spec.root_dir / "report")
    print("\n" + _head(report.markdown, sections=2) + f"\n(the whole report: {full})", file=out)


def _head(markdown: str, sections: int) -> str:
    """The title and the first `sections` "## " sections (the ensembles and the trials tables);
    the per-class tables and plots stay in the file."""
    lines, seen = [], 0
    for line in markdown.splitlines():
        if line.startswith("## "):
            seen += 1
            if seen > sections:
                break
        lines.append(line)
    return "\n".join(lines).rstrip()


def _parent_params(spec: SweepSpec) -> dict:
    """The grid (as lists), the sweep settings, the ensembles and the base keys nobody sweeps."""
    params = {f"grid.{k}": json.dumps(v) for k, v in spec.grid.items()}
    params.update({f"sweep.{k}": v for k, v in spec.to_dict()["sweep"].items()})
    params["ensembles"] = ",".join(ensemble_names(spec.ensembles))
    skip = set(spec.grid) | {"train.output_dir", "tracking.run_name", "tracking.parent_run_id"}
    params.update({k: v for k, v in flatten(spec.base).items() if k not in skip})
    return params


def _local_store(uri: Optional[str]) -> Optional[str]:
    """The SQLite URI the sweep must serve over HTTP, or None for a server / database URI."""
    if uri is None:
        return default_uri()
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri or uri.startswith("file:"):
        raise SweepError(f"tracking.uri={uri!r} is a file store, which MLflow 3 no longer supports; use "
                         f"sqlite:///PATH/mlflow.db or an mlflow server's http://HOST:PORT")
    return None


def _print_dry_run(spec: SweepSpec, trials, out) -> None:
    print(f"sweep {spec.name}: {len(trials)} trials over {' x '.join(spec.grid)} (dry run: nothing started)",
          file=out)
    print(f"each trial takes {describe_resources(spec, spec.settings.gpus_per_worker)}; trials at once: "
          f"{spec.settings.max_concurrent or 'GPUs // GPUs per trial (on CPU, cores // CPUs per trial)'}", file=out)
    for t in trials:
        c = t.cfg
        print(f"  {t.name}: {c.model.backbone} {c.data.size}px {c.data.augment}, {c.train.epochs} epochs -> "
              f"{t.output_dir}", file=out)
    if spec.ensembles:
        print(f"then ensembles {', '.join(ensemble_names(spec.ensembles))} of the finished trials", file=out)
