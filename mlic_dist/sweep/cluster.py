"""Ray for a sweep: start or join it, size the trials to its resources, check shared storage.

Without an address the sweep starts Ray on this machine (CPU-only works) and gives its node the
`trial_driver` resource, so the trial drivers (which only watch their Ray Train workers) take no
CPU a worker could use. That instance listens on 127.0.0.1 only (`_loopback_node`: Ray's
single-node loopback mode, its default on macOS and Windows; `ray.init(_node_ip_address=
"127.0.0.1")` does not do it, ray.init swaps a loopback address for the routable one, and then
the GCS, the raylet, the workers and the runtime-env agent listen on every interface). With `--address auto|HOST:PORT` it joins a cluster started by `ray start`;
there the shards and SWEEP.root must be on storage every node mounts at the same path. What can
be checked is checked before any trial starts: one tiny task per node writes a probe file under
SWEEP.root that this machine must then see and, on nodes that can host a worker, reads each
shard manifest and looks for the pretrained weight files of every backbone in the grid (in
that node's TORCH_HOME); every problem of every node is reported at once.

To keep drivers off preemptible GPU nodes (Ray Train's advice), start a safe node with
`ray start --resources='{"trial_driver": 64}'`; drivers then run there and use no CPU.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..models import missing_pretrained
from .spec import SweepError, SweepSpec, pretrained_needed

DRIVER_RESOURCE = "trial_driver"
CODE_ROOT = Path(__file__).resolve().parents[2]   # the checkout that holds this mlic_dist


@dataclass(frozen=True)
class Plan:
    """How one trial is placed and how many run at once."""
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    driver_resources: dict
    max_concurrent: int
    cluster: dict          # ray.cluster_resources() when planned

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def worker_resources(self) -> dict:
        res = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            res["GPU"] = self.gpus_per_worker
        return res

    def describe(self) -> str:
        worker = ", ".join(f"{k} {v:g}" for k, v in self.worker_resources.items())
        driver = ", ".join(f"{k} {v:g}" for k, v in self.driver_resources.items() if v)
        return (f"each trial: {self.workers} worker(s) x ({worker}) + driver ({driver}); "
                f"{self.max_concurrent} trial(s) at once")


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"   # 0: Ray's node IP is 127.0.0.1 (single node)


@contextlib.contextmanager
def _loopback_node():
    """Ray started inside this block takes 127.0.0.1 as its node IP, so its servers bind the
    loopback interface only. Ray reads the switch once, at import (ray_constants); the processes
    it starts read the variable. Both are put back afterwards: a later ray.init in this process
    (a test joining a simulated cluster) must find the routable address again.
    Ray's private `ray._private.ray_constants.ENABLE_RAY_CLUSTER`, checked against ray 2.60
    (tests/test_sweep.py checks that every socket of such a Ray listens on 127.0.0.1 only)."""
    from ray._private import ray_constants

    before_env, before_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = before_env


def connect(address: Optional[str]) -> None:
    """Start Ray here (address None) or join the cluster at `address`. Ray's own log streams and
    progress tables stay off: the sweep prints its own compact view, each trial logs to its
    output directory and Ray keeps the rest under /tmp/ray/session_latest/logs."""
    import ray

    path = os.pathsep.join(p for p in (str(CODE_ROOT), os.environ.get("PYTHONPATH")) if p)
    # Workers import this checkout's mlic_dist where the path exists (this machine, shared
    # storage); elsewhere the installed package.
    # Ray Train's print patch would copy every print of train() into its logger too: rank 0's
    # output goes to the trial's train.log once.
    runtime_env = {"env_vars": {"PYTHONPATH": path, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}}
    common = dict(log_to_driver=False, logging_level=logging.WARNING, runtime_env=runtime_env)
    if address is None:
        # "local": a new instance even where RAY_ADDRESS names a cluster (join one with --address),
        # reachable from this machine only
        with _loopback_node():
            ray.init(address="local", include_dashboard=False, resources={DRIVER_RESOURCE: 10_000}, **common)
    else:
        try:
            ray.init(address=address, **common)
        except ConnectionError as e:
            raise SweepError(f"--address {address}: no Ray cluster there ({e}); start one with `ray start --head` "
                             f"(and `ray start --address HEAD:6379` on the other nodes)") from None


def plan(spec: SweepSpec, n_trials: int, resources: dict) -> Plan:
    """Trial placement from the cluster's resources: as many trials at once as both the GPUs
    (GPUs // GPUs per trial) and the CPUs (CPUs // CPUs per trial) allow, capped by
    sweep.max_concurrent and the trial count. Every worker is one DDP process driving one device
    (`cuda:LOCAL_RANK`), so a worker takes one GPU, or a fraction of one when it is the trial's
    only worker (small trials packed onto a GPU); anything else is refused."""
    s = spec.settings
    total_gpus = int(resources.get("GPU", 0))
    total_cpus = float(resources.get("CPU", 0))
    gpus = s.gpus_per_worker if s.gpus_per_worker is not None else (1.0 if total_gpus else 0.0)
    if gpus and not total_gpus:
        raise SweepError(f"sweep.gpus_per_worker={gpus:g} but the Ray cluster has no GPUs; use "
                         f"--gpus-per-worker 0 to train on CPUs")
    if gpus > 1:
        raise SweepError(f"sweep.gpus_per_worker={gpus:g}: each worker is one DDP process that drives one GPU "
                         f"(cuda:LOCAL_RANK), so the other GPUs would sit idle or be driven twice; use "
                         f"--gpus-per-worker 1 --workers-per-trial {max(1, math.ceil(gpus)) * s.workers_per_trial}")
    if 0 < gpus < 1 and s.workers_per_trial > 1:
        raise SweepError(f"sweep.gpus_per_worker={gpus:g} with {s.workers_per_trial} workers per trial: Ray may put "
                         f"two workers of one trial on the same GPU, which NCCL refuses (and LOCAL_RANK would "
                         f"name a GPU the worker does not have); use --gpus-per-worker 1, or fractions with "
                         f"--workers-per-trial 1")
    driver = {"CPU": 0, DRIVER_RESOURCE: 1} if resources.get(DRIVER_RESOURCE) else {"CPU": 1}
    per_trial_cpus = s.workers_per_trial * s.cpus_per_worker + driver["CPU"]
    cpu_fit = int(total_cpus // per_trial_cpus)
    fit = cpu_fit
    if cpu_fit < 1:
        raise SweepError(f"one trial needs {per_trial_cpus:g} CPUs ({s.workers_per_trial} workers x "
                         f"{s.cpus_per_worker:g}{' + its driver' if driver['CPU'] else ''}) but the Ray cluster has "
                         f"{total_cpus:g} CPUs; lower --workers-per-trial or --cpus-per-worker")
    if gpus:
        gpu_fit = int(total_gpus // (s.workers_per_trial * gpus))
        if gpu_fit < 1:
            raise SweepError(f"one trial needs {s.workers_per_trial * gpus:g} GPUs ({s.workers_per_trial} workers) "
                             f"but the Ray cluster has {total_gpus} GPUs; lower --workers-per-trial (or "
                             f"--gpus-per-worker)")
        fit = min(gpu_fit, cpu_fit)
    k = min(s.max_concurrent or fit, n_trials)
    return Plan(s.workers_per_trial, s.cpus_per_worker, gpus, driver, k, dict(resources))


def _probe(shards_dirs: list[str], weights: list[tuple[str, str, str]], probe_dir: str, token: str) -> dict:
    """Runs once on every node: which shard manifests and pretrained weight files it cannot
    read (computed here: TORCH_HOME and mounts differ per node), and a probe file written under
    SWEEP.root that the sweep's machine must see (else that storage is not shared)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    missing = [d for d in shards_dirs if not (Path(d) / "manifest.json").is_file()]
    no_weights = [(b, p, f) for b, p, w in weights for f in missing_pretrained(b, p, w)]
    error = ""
    try:
        Path(probe_dir).mkdir(parents=True, exist_ok=True)
        (Path(probe_dir) / f"{node}.{token}").write_text(socket.gethostname())
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    return {"node": node, "host": socket.gethostname(), "missing": missing, "weights": no_weights, "error": error}


def hosts_workers(node: dict, plan: Plan) -> bool:
    """Whether a node of `ray.nodes()` can run one of the plan's workers (a driver-only node does
    not need the shards or the weights)."""
    have = node.get("Resources", {})
    return all(have.get(k, 0) >= v for k, v in plan.worker_resources.items())


def check_nodes(spec: SweepSpec, shards_dirs: list[str], plan: Plan) -> int:
    """On a cluster, before any trial starts: every alive node writes where this machine reads,
    and every node that can host a worker reads the shards and has the pretrained weights of
    every backbone in the grid. Returns the number of nodes checked; raises one SweepError with
    one line per node and missing thing, and the fixes."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe_dir = spec.root_dir / ".nodes"
    token = os.urandom(4).hex()
    weights = pretrained_needed(spec)
    task = ray.remote(num_cpus=0, max_retries=0)(_probe)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    workers = {n["NodeID"] for n in nodes if hosts_workers(n, plan)}
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(shards_dirs if n["NodeID"] in workers else [], weights if n["NodeID"] in workers else [],
                    str(probe_dir), token) for n in nodes]
    try:
        reports = ray.get(refs, timeout=120)
    except ray.exceptions.RayTaskError as e:
        raise SweepError(f"a node could not run the sweep's storage check ({str(e).splitlines()[0]}); install "
                         f"mlic_dist on every node (pip install -e .) or put the checkout on shared storage") from None
    except ray.exceptions.GetTimeoutError:
        raise SweepError("the storage check did not finish on every node in 120 s; is the cluster busy?") from None
    problems, fixes = [], []
    try:
        for r in reports:
            where = f"node {r['host']} ({r['node'][:8]})"
            for d in r["missing"]:
                problems.append(f"{where} cannot read {d}/manifest.json")
                _add(fixes, "the shards must be on storage every node mounts at the same absolute path (set "
                            "data.shards to it)")
            for backbone, pretrained, path in r["weights"]:
                problems.append(f"{where} lacks {path} (model.backbone={backbone} model.pretrained={pretrained})")
                _add(fixes, "copy each weight file to that path on that node (`python -m mlic_dist.models` on the "
                            "node lists the files and their URLs), put TORCH_HOME on shared storage, or pass "
                            "model.pretrained=PATH on shared storage")
            if r["error"]:
                problems.append(f"{where} cannot write under {spec.root_dir} ({r['error']})")
                _add(fixes, "sweep.root must be shared storage every node can write")
            elif not (probe_dir / f"{r['node']}.{token}").is_file():
                problems.append(f"{where} wrote under {spec.root_dir} but this machine does not see it")
                _add(fixes, "sweep.root must be on storage every node mounts at the same path (NFS, ...)")
    finally:
        for p in probe_dir.glob(f"*.{token}"):
            p.unlink(missing_ok=True)
    if problems:
        raise SweepError(f"pre-flight: {len(problems)} problem(s) on the cluster's nodes, nothing started:\n  "
                         + "\n  ".join(problems) + "\nfix: " + "; ".join(fixes))
    return len(reports)


def _add(items: list, item: str) -> None:
    if item not in items:
        items.append(item)
