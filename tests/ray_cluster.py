"""Ray clusters with GPUs, simulated on a CPU machine, and a probe that records what Ray gives a
trial's workers (tests/ is on sys.path under pytest: `from ray_cluster import ...`).

    with simulated_cluster([{"num_cpus": 4, "num_gpus": 4}] * 2) as cluster:   # 2 nodes x 4 GPUs
        connect(cluster.address)                 # mlic_dist.sweep.cluster.connect, as a sweep does
        probe = Probe(tmp_path / "probe", expect=8)
        ctx = TrialContext(spec, plan, "http://127.0.0.1:9", None, worker=probe, backend="gloo")
        make_tuner(ctx, [make_releaser()], resume=False).fit()
        records = probe.records()                # one dict per worker (see Probe.__call__)

`ray.cluster_utils.Cluster` starts one raylet per node on this machine; a node's `num_gpus` are
logical: Ray schedules, assigns GPU ids and sets CUDA_VISIBLE_DEVICES as on real GPUs, but no
CUDA runs, so trials use the gloo backend (NCCL refuses logical GPUs) and a probe instead of
`train()`. `env_vars` of a node reach every worker on it (a per-node TORCH_HOME, say).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

DRIVER_SLOTS = 64   # the head's `trial_driver` resource: trial drivers run there and take no CPU


@contextlib.contextmanager
def simulated_cluster(nodes: list[dict], driver_slots: int = DRIVER_SLOTS):
    """A `ray.cluster_utils.Cluster`: one node per dict of `Cluster.add_node` arguments
    (`num_cpus`, `num_gpus`, `env_vars`, `resources`, ...), the first one the head, which also
    offers `trial_driver`. Not connected: call `connect(cluster.address)` (or `run_sweep(...,
    address=cluster.address)`). Ends with `ray.shutdown()` and the cluster's shutdown."""
    import ray
    from ray.cluster_utils import Cluster

    head, *others = nodes
    head = {**head, "include_dashboard": False,
            "resources": {**head.get("resources", {}), "trial_driver": driver_slots}}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for node in others:
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


class Probe:
    """A Ray Train worker function (`TrialContext.worker`) that records what Ray gave it, in
    DIR/<trial>.<rank>.json, then waits (up to wait_s) until `expect` workers have recorded, so
    that a plan that runs fewer of them at once shows as a shortfall, not a hang.

    A record: trial, rank, local_rank (Ray Train's), LOCAL_RANK and CUDA_VISIBLE_DEVICES (the
    environment Accelerate reads), gpu_ids (what Ray assigned this worker), assigned (its
    resources), node, threads (int($MLIC_CPUS_PER_PROCESS), the CPUs the sweep tells the trainer
    it may use; None when unset), peers (the records seen when it stopped waiting), pid.
    This module is pickled by value (tests/ is no package the workers could import)."""

    def __init__(self, out_dir, expect: int, wait_s: float = 90.0):
        self.out_dir, self.expect, self.wait_s = str(out_dir), expect, wait_s

    def __call__(self, loop_config: dict) -> None:
        import ray
        import ray.train

        ctx = ray.train.get_context()
        trial = Path(loop_config["config"]["train"]["output_dir"]).name
        threads = os.environ.get("MLIC_CPUS_PER_PROCESS")
        record = {"trial": trial, "rank": ctx.get_world_rank(), "local_rank": ctx.get_local_rank(),
                  "LOCAL_RANK": os.environ.get("LOCAL_RANK"),
                  "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "gpu_ids": sorted(str(g) for g in ray.get_gpu_ids()),
                  "assigned": ray.get_runtime_context().get_assigned_resources(),
                  "node": ray.get_runtime_context().get_node_id(),
                  "threads": int(threads) if threads is not None else None, "pid": os.getpid()}
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        name = f"{trial}.{record['rank']}.json"
        (out / f".{name}").write_text(json.dumps(record))
        deadline = time.time() + self.wait_s
        while self._recorded() < self.expect and time.time() < deadline:
            time.sleep(0.2)
        record["peers"] = self._recorded()   # workers alive at once with this one, itself included
        (out / name).write_text(json.dumps(record))

    def _recorded(self) -> int:
        """Workers that wrote their first (hidden) record, this one included."""
        return len(list(Path(self.out_dir).glob(".*.json")))

    def records(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(Path(self.out_dir).glob("[!.]*.json"))]


def _pickle_by_value() -> None:
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


_pickle_by_value()
