"""The Ray Tune side of a sweep: the Tuner, the per-trial driver and the Ray Train worker.

Ray 2.60 (Train V2): `Tuner(run_trial)` runs one driver per grid point; the driver builds a
`TorchTrainer` whose `ScalingConfig(num_workers=G)` workers each call the project's one
`train(cfg, epoch_hook=...)`. Ray Train sets up the torch process group (gloo on CPU, NCCL on
GPU) and RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, so `Accelerator()` inside `train()` sees
the G workers as one DDP job. The epoch hook reports each epoch with `ray.train.report`; the
trainer's `TuneReportCallback` forwards rank 0's metrics to Tune (ASHA, the progress view).
Before `train()`, each worker (`worker_entry`) checks that LOCAL_RANK names a GPU Ray gave it
and tells the trainer how many CPUs it may use ($MLIC_CPUS_PER_PROCESS: those Ray reserved).
A trial ASHA stops is killed with its workers (no actor reuse: see make_tuner), recorded at once
in sweep.json (make_stop_recorder) and kept stopped by a --resume.

Faults: `ray.train.FailureConfig(max_failures)` restarts a trial's worker group when a worker
dies; `train()` then resumes from the newest checkpoint in the trial's output directory
(`train.resume=auto`), not from epoch 0. Tune state lives in SWEEP.root/NAME/_tune, Train state
in .../_train, so `Tuner.restore` (`--resume`) finds a killed sweep and resumes it.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..config import config_from_dict, to_dict
from ..resources import ASSIGNED_CPUS_ENV
from ..train.loop import train
from .cluster import Plan
from .spec import SweepError, SweepSpec, trial_name
from .state import record_stopped, stopped_early

TRIAL_LOG = "train.log"          # rank 0's output, in the trial's output directory
TUNE_DIR, TRAIN_DIR = "_tune", "_train"


def train_worker(loop_config: dict) -> None:
    """What every Ray Train worker runs after the sweep's setup (`worker_entry`): `train(cfg)`
    with an epoch hook that reports to Tune. Rank 0 appends its output to OUTPUT_DIR/train.log,
    starting with a line naming its pid."""
    import ray
    import ray.train

    cfg = config_from_dict(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    pg = ray.util.get_current_placement_group()
    pg_hex = pg.id.hex() if pg is not None else ""

    def report(record: dict) -> None:  # called on every rank after each epoch (a collective)
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metrics["epochs_done"] = record["epoch"] + 1   # ASHA's clock, also after a resume
        metrics["placement_group"] = pg_hex            # for PlacementGroupReleaser
        ray.train.report(metrics)

    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if rank == 0:
            log = stack.enter_context(open(out / TRIAL_LOG, "a", buffering=1))
            if log.tell() and _last_byte(out / TRIAL_LOG) != b"\n":
                log.write("\n")  # a killed attempt may have left a progress bar mid-line
            stack.enter_context(contextlib.redirect_stdout(log))
            stack.enter_context(contextlib.redirect_stderr(log))
        node = ray.get_runtime_context().get_node_id()
        print(f"[sweep] worker rank {rank}/{world} pid {os.getpid()} on {socket.gethostname()} node {node} "
              f"started {time.strftime('%Y-%m-%d %H:%M:%S')} (mlic_dist from {Path(__file__).resolve().parents[1]})",
              flush=True)
        t0 = time.perf_counter()
        try:
            train(cfg, epoch_hook=report)
        finally:
            print(f"[sweep] train() ended after {time.perf_counter() - t0:.1f} s", flush=True)


@dataclass(frozen=True)
class TrialContext:
    """What every trial driver needs besides its grid point (sent once through the object store)."""
    spec: SweepSpec
    plan: Plan
    tracking_uri: str
    parent_run_id: Optional[str]
    worker: Callable[[dict], None] = train_worker
    """What each Ray Train worker runs after `worker_entry`'s setup (tests inject a probe)."""
    backend: Optional[str] = None
    """torch.distributed backend; None = Ray Train's (NCCL with GPUs, gloo without). Tests on
    logical GPUs (a CPU machine) pass gloo: NCCL needs real ones."""


class TrialNamer:
    """Tune names each trial after its grid point (the progress view and Tune's folders use it)."""

    def __init__(self, keys: list[str]):
        self.keys = list(keys)

    def __call__(self, trial) -> str:
        return trial_name(self.keys, {k: trial.config[k] for k in self.keys})


def trial_config(ctx: TrialContext, point: dict) -> dict:
    """The trial's full training config as a plain dict: base + grid point + output dir + tracking."""

    cfg = to_dict(ctx.spec.trial(point).cfg)
    cfg["tracking"].update(uri=ctx.tracking_uri, parent_run_id=ctx.parent_run_id)
    return cfg


def run_trial(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: a Ray Train run of `train_worker` on `ctx.plan.workers` workers."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    point = {k: config[k] for k in ctx.spec.grid}
    name = ctx.spec.trial_name(point)
    if name in stopped_early(ctx.spec.root_dir):
        return   # ASHA stopped it before the sweep was killed: a --resume keeps it stopped
    plan = ctx.plan
    trainer = TorchTrainer(
        worker_entry,
        train_loop_config={"config": trial_config(ctx, point), "worker": ctx.worker},
        torch_config=TorchConfig(backend=ctx.backend) if ctx.backend else None,
        scaling_config=ray.train.ScalingConfig(num_workers=plan.workers, use_gpu=plan.use_gpu,
                                               resources_per_worker=plan.worker_resources),
        run_config=ray.train.RunConfig(
            # The same (storage_path, name) on a retry or --resume: Train restores its own state.
            name=name, storage_path=str(ctx.spec.root_dir / TRAIN_DIR),
            failure_config=ray.train.FailureConfig(max_failures=ctx.spec.settings.max_failures),
            callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def worker_entry(loop_config: dict) -> None:
    """Runs on every Ray Train worker: sizes its threads from what Ray reserved for it, checks
    that its device is its own, then runs `loop_config["worker"]` (train_worker)."""
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    # The cores this worker may use are what Ray reserved for it, not the machine's cores shared
    # among this trial's processes on the node: co-located trials would oversubscribe the node.
    os.environ[ASSIGNED_CPUS_ENV] = str(cpus_for_threads(assigned))   # resources.cores_per_process reads it
    if assigned.get("GPU"):
        check_local_device(int(os.environ.get("LOCAL_RANK", "0")), os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                           [str(g) for g in ray.get_gpu_ids()])
    loop_config["worker"](loop_config)


def cpus_for_threads(assigned: dict) -> int:
    """Threads for a worker Ray assigned `assigned` ({"CPU": 0.5, "GPU": 1.0}): its whole CPUs, at
    least 1 (Ray sets OMP_NUM_THREADS the same way)."""
    return max(1, math.floor(assigned.get("CPU", 1)))


def check_local_device(local_rank: int, visible_devices: str, own_gpus: list[str]) -> None:
    """Accelerate (and DALI's device_id) use cuda:LOCAL_RANK, an index into CUDA_VISIBLE_DEVICES
    (Ray Train sets it to the sorted union of the GPUs of the trial's workers on this node): that
    device must be one Ray assigned to this worker, else two ranks share a GPU or one drives
    another's. SweepError naming the values otherwise."""
    visible = [d.strip() for d in visible_devices.split(",") if d.strip()]
    if local_rank < len(visible) and visible[local_rank] in own_gpus:
        return
    device = visible[local_rank] if local_rank < len(visible) else "none"
    raise SweepError(f"worker LOCAL_RANK={local_rank} would drive visible device {local_rank} (GPU {device}) but "
                     f"Ray assigned it GPU(s) {own_gpus} (CUDA_VISIBLE_DEVICES={visible_devices!r}); each worker "
                     f"needs one whole GPU of its own: use --gpus-per-worker 1")


def make_releaser():
    """A Tune callback that removes the placement group of a trial's Ray Train workers once the
    trial is over.

    Ray Train's controller removes its workers' placement group when a run ends normally. When
    a trial's driver is killed instead (ASHA stops it, or it crashes), the group outlives it (a
    placement group lives as long as the job that made it) and Ray Train's PlacementGroupCleaner
    can only free it through Ray's state API, i.e. where the dashboard runs. Without it the
    reserved CPUs/GPUs stay taken and later trials wait forever. A finished trial's group is no
    longer in use, so removing it (if still there) is always safe."""
    from ray import tune

    class PlacementGroupReleaser(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            self._release(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._release(trial)

        @staticmethod
        def _release(trial) -> None:
            import ray
            from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

            pg_hex = (trial.last_result or {}).get("placement_group")
            if not pg_hex:
                return
            pg = PlacementGroup(ray.PlacementGroupID.from_hex(pg_hex))
            if placement_group_table(pg).get("state") not in (None, "REMOVED"):
                remove_placement_group(pg)

    return PlacementGroupReleaser()


def make_stop_recorder(spec: SweepSpec):
    """A Tune callback that records each trial ASHA stops in sweep.json as soon as it is stopped
    (state.record_stopped): ASHA's STOP marks the result `done` before the last planned epoch."""
    from ray import tune

    planned = {t.name: t.cfg.train.epochs for t in spec.trials()}

    class StopRecorder(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            name = str(trial)
            if result.get("done") and int(result.get("epochs_done", 0)) < planned.get(name, 0):
                record_stopped(spec, name)

    return StopRecorder()


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def make_tuner(ctx: TrialContext, callbacks: list, resume: bool):
    """A new Tuner over the grid, or (resume) the one stored under SWEEP.root/NAME/_tune."""
    from ray import tune

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), ctx.plan.driver_resources)
    path = ctx.spec.root_dir / TUNE_DIR
    if resume and tune.Tuner.can_restore(str(path)):
        # Finished trials stay finished; running and errored ones run again and resume from
        # their checkpoints. The grid and concurrency are the stored ones.
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    s = ctx.spec.settings
    scheduler = None
    if s.asha:
        from ray.tune.schedulers import ASHAScheduler

        # max_t one past the last epoch: at max_t ASHA stops a trial, which would kill the
        # final scoring (val/test, thresholds, metrics.json) that follows the last epoch.
        scheduler = ASHAScheduler(time_attr="epochs_done", metric="val_mAP", mode="max",
                                  max_t=ctx.spec.epochs + 1, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space={k: tune.grid_search(v) for k, v in ctx.spec.grid.items()},
        # No actor reuse: in Ray 2.60 a trial ASHA stops is cached for reuse while its
        # trainer.fit() still waits on the Train controller (nothing in Train V2 reacts to a Tune
        # stop), so the next trial's reset_config fails ("Could not re-use actor") and that trial
        # errors. Without reuse Tune kills the driver, the controller and workers die with it, and
        # PlacementGroupReleaser frees their placement group. Each trial pays one new process.
        tune_config=tune.TuneConfig(max_concurrent_trials=ctx.plan.max_concurrent, scheduler=scheduler,
                                    reuse_actors=False,
                                    trial_name_creator=TrialNamer(list(ctx.spec.grid)),
                                    trial_dirname_creator=TrialNamer(list(ctx.spec.grid))),
        run_config=tune.RunConfig(
            name=TUNE_DIR, storage_path=str(ctx.spec.root_dir), verbose=0, callbacks=callbacks,
            # Worker deaths are Ray Train's to retry; a trial that still fails is marked failed
            # and `--resume` retries it (resume_errored).
            failure_config=tune.FailureConfig(max_failures=0)),
    )
