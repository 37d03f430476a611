"""MLflow's own system metrics beside a run's curves: one sampler per node, never in the way.

`SystemMetrics(cfg.tracking, run_id_of, node_id)` runs MLflow's `SystemMetricsMonitor`
(mlflow.system_metrics: CPU and memory via psutil, disk, network, and NVIDIA GPU utilisation,
memory and power via nvidia-ml-py when a GPU is visible) for the run whose id `run_id_of()`
returns once it exists. The metrics are MLflow's names, `system/cpu_utilization_percentage`,
`system/gpu_0_utilization_percentage`, ..., or `system/node1/...` with a node id (multi-node
runs: every node's local rank 0 samples its own machine into the one run). No sampler of our own.

Why not MLflow's `log_system_metrics=True` on `start_run`: the Tracker talks to MLflow from its
own thread with an `MlflowClient` (no fluent active run), and a node other than rank 0's has no
run of its own: it learns the run id from the shared run directory's tracking.json (the
checkpoints already require one shared directory, train/distributed.check_shared_dir).

Never stalls training: the wait for the run id and MLflow's monitor are daemon threads; `stop()`
gives the monitor's final flush a few seconds and then leaves it (a server that is down would
otherwise hold the end of training in MLflow's HTTP retries). A monitor that cannot start (no
psutil) warns once and training goes on.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

from .. import rundir
from ..config import TrackingConfig
from .store import resolve_uri

_STOP_S = 5.0      # how long stop() waits for the monitor's last flush


def run_id_from_record(run_dir: str | Path) -> Callable[[], Optional[str]]:
    """For a node that is not rank 0's: the run id rank 0 wrote into tracking.json (shared dir)."""
    def read() -> Optional[str]:
        try:
            return (rundir.load_tracking(run_dir) or {}).get("run_id")
        except rundir.RunDirError:      # being replaced right now: the next poll reads it
            return None
    return read


class SystemMetrics:
    def __init__(self, cfg: TrackingConfig, run_id_of: Callable[[], Optional[str]],
                 node_id: Optional[str] = None, resume: bool = False, poll_s: float = 0.25):
        self.cfg = cfg
        self.run_id_of = run_id_of
        self.node_id = node_id
        self.resume = resume          # a resumed run continues the system metrics' steps
        self.poll_s = poll_s
        self.monitor = None
        self.run_id: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled and self.cfg.system_metrics

    def start(self) -> None:
        if not self.enabled:
            return
        self._thread = threading.Thread(target=self._run, name="mlic-system-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            run_id = self.run_id_of()
            if run_id:
                break
            self._stop.wait(self.poll_s)
        else:
            return
        try:
            # imported only now: on rank 0 the Tracker's thread imports MLflow while it creates
            # the run, and two threads importing MLflow at once deadlock in its protobuf modules
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(run_id, sampling_interval=self.cfg.system_metrics_interval_s,
                                           samples_before_logging=1, resume_logging=self.resume,
                                           node_id=self.node_id, tracking_uri=resolve_uri(self.cfg.uri))
        except Exception as e:  # noqa: BLE001 - no psutil, an MLflow without the module: train on
            warnings.warn(f"MLflow system metrics are off for this run ({type(e).__name__}: {str(e)[:200]}); "
                          f"set tracking.system_metrics=false to silence this")
            return
        self.run_id = run_id
        if not self._stop.is_set():
            self.monitor = monitor
            monitor.start()

    def stop(self) -> None:
        """Stop sampling; the last samples are flushed within a few seconds or left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(_STOP_S)
        if self.monitor is not None:
            flush = threading.Thread(target=self.monitor.finish, name="mlic-system-metrics-flush", daemon=True)
            flush.start()
            flush.join(_STOP_S)
            self.monitor = None
