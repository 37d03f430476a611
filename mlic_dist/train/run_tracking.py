"""What a training run tells MLflow besides its metrics: the start (params, tags, dataset input)
and MLflow's system metrics, one sampler per node. `run` is a train.loop.Run; the Tracker and the
sampler (mlic_dist.tracking) do the talking."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .. import rundir
from ..config import flatten, to_dict
from ..tracking.system import SystemMetrics, run_id_from_record
from . import optim, teacher
from .distributed import node_rank, several_nodes


def start_tracking(run, resumed) -> None:
    """Queue the run's MLflow start: its params, the mlic.* tags (kind, world size, batch and
    learning-rate rule, teacher, data digest, what a resume changed) and the shards as a dataset input."""
    cfg = run.cfg
    tags = {"backbone": cfg.model.backbone, "augment": cfg.data.augment, "size": cfg.data.size,
            "mlic.kind": "single", "mlic.world_size": run.accelerator.num_processes,
            "mlic.global_batch_size": optim.global_batch_size(cfg, run.accelerator.num_processes)}
    rule = optim.lr_rule(cfg, run.accelerator.num_processes)
    tags.update({"mlic.lr_scaling": rule["lr_scaling"], "mlic.lr_factor": f"{rule['factor']:g}",
                 "mlic.effective_lr": f"{rule['lr']:g}", "mlic.effective_head_lr": f"{rule['head_lr']:g}"})
    if run.teacher_meta is not None:
        tags.update(teacher.tracking_tags(run.teacher_meta))
    inputs = []
    if run.manifest_sha256:
        tags["mlic.data.manifest_sha256"] = run.manifest_sha256
        shards = Path(cfg.data.shards).resolve()
        inputs.append({"name": shards.name, "digest": run.manifest_sha256, "source": str(shards)})
    previous = None
    if resumed is not None:
        previous = (rundir.load_tracking(run.out) or {}).get("run_id")
        tags["mlic.resumed_from"] = str(resumed.checkpoint)
        if resumed.changed or resumed.restarted_epoch:
            tags["mlic.resume_changes"] = (resumed.summary() or "none") + (
                "; epoch restarted from its start" if resumed.restarted_epoch else "")
    run.tracker.start(flatten(to_dict(cfg)), resume_run_id=previous, tags=tags, inputs=inputs)


def start_system_metrics(run, resumed) -> SystemMetrics:
    """MLflow's system metrics, sampled by each node's local rank 0 into the run (rank 0's
    Tracker creates it; the other nodes read its id from tracking.json in the shared run dir)."""
    acc, cfg = run.accelerator, run.cfg.tracking
    nodes = several_nodes(acc)
    if acc.num_processes > 1:   # every rank: tracking.json names this run before another node reads it
        acc.wait_for_everyone()
    leader = acc.local_process_index == 0
    source = (lambda: run.tracker.run_id) if acc.is_main_process else run_id_from_record(run.out)
    system = SystemMetrics(cfg if leader else dataclasses.replace(cfg, system_metrics=False), source,
                           node_id=f"node{node_rank() or acc.process_index}" if nodes else None,
                           resume=resumed is not None)
    system.start()
    return system
