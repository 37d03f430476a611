"""Train a multi-label classifier: one `train(cfg)` for every launcher.

CPU, one process:  python -m mlic_dist.train --config configs/demo/scenes.yaml
one GPU:           accelerate launch -m mlic_dist.train --config configs/voc2007/wang.yaml data.shards=DIR
8 GPUs:            accelerate launch --multi_gpu --num_processes 8 -m mlic_dist.train --config ...
                       (global batch 8 x 16 = 128: add optim.lr_scaling=linear optim.warmup_epochs=1
                       to scale the paper's learning rates, made for 16, and model.sync_bn=true)
2 nodes x 8 GPUs:  accelerate launch --multi_gpu --num_machines 2 --machine_rank R \\
                       --main_process_ip HOST --main_process_port 29500 --num_processes 16 \\
                       -m mlic_dist.train --config ...
torchrun:          torchrun --nproc_per_node 2 -m mlic_dist.train --config ... (gloo on CPU)
Ray Train workers call `train(cfg)` too (launch/sweep.py). Several nodes must share
`train.output_dir` and the shards (a shared filesystem): every rank reads and writes them.

Flow: build (accelerator, manifest, model, optimizer, schedule, loaders) -> resume -> for each
epoch: train_one_epoch -> evaluate on the validation split (never test) -> schedule, best
checkpoint, early stopping -> atomic checkpoint. At the end the best weights score validation
and test, per-class thresholds are tuned on validation, and the run directory receives its
files (mlic_dist/rundir.py). Bad input exits with status 2 and one line; a run whose loss stays
non-finite stops with status 1, naming the epoch, the step and the last good checkpoint.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from .. import metrics, rundir
from ..config import Config, to_dict
from ..data import build_loader, read_manifest
from ..data.labels import read_split_labels
from ..data.manifest import content_digest
from ..data.plan import mix_seed
from ..errors import DivergenceError, UserError
from ..losses import build_loss
from ..models import check_pretrained, convert_sync_batchnorm, create_model
from ..tracking import tracker as tracking
from ..tracking.tracker import Tracker
from . import checkpoint, optim, teacher
from .distributed import build_accelerator, check_ranks_in_sync, check_shared_dir, gather, unwrap
from .ema import build_ema, check_in_sync as check_ema_in_sync, sync_buffers
from .run_tracking import start_system_metrics, start_tracking
from .resume import best_file, maybe_resume, publish_best, save_checkpoint
from .scoring import evaluate, predict_split


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs, in checkpoint-safe types."""
    epoch: int = 0                 # epoch in progress (or next to start)
    step_in_epoch: int = 0         # optimizer steps already done in `epoch`
    global_step: int = 0
    best_value: float = float("nan")
    best_epoch: int = -1
    bad_epochs: int = 0            # epochs since the best (early stopping)
    stopped: bool = False          # early stopping fired (survives a crash right after it)
    bad_steps: int = 0             # optimizer steps in a row with a non-finite loss/gradient
    skipped_steps: int = 0         # all such steps (skipped, not applied)
    history: list = field(default_factory=list)
    # the epoch in progress so far (a mid-epoch resume continues its numbers, not just its data)
    epoch_loss_sum: float = 0.0    # summed losses of the non-ignored entries, all ranks (losses.py)
    epoch_loss_count: float = 0.0  # those entries, all ranks
    epoch_seen: int = 0            # training images per rank
    epoch_skipped: int = 0
    epoch_time_s: float = 0.0
    best_source: str = "raw"       # raw | ema: which weights best_model.pt holds (train.ema_decay)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def next_epoch(self) -> None:
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.epoch_loss_sum, self.epoch_seen, self.epoch_skipped, self.epoch_time_s = 0.0, 0, 0, 0.0
        self.epoch_loss_count = 0.0


@dataclass
class Run:
    cfg: Config
    accelerator: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    train_loader: object
    val_loader: object
    test_loader: object            # None when there is no test split to score
    classes: list
    out: Path
    tracker: Tracker
    state: TrainState
    manifest_sha256: Optional[str] = None
    last_good_checkpoint: Optional[Path] = None
    ema: Optional[torch.nn.Module] = None   # AveragedModel (mlic_dist/train/ema.py) when train.ema_decay > 0
    loss_fn: Optional[Callable] = None      # losses.MultiLabelLoss; None = built from cfg.loss
    lock: Optional[rundir.RunLock] = None   # rank 0's ownership of `out` for the run's life
    teacher: Optional[torch.Tensor] = None  # (N_train, C) float32 on the device: distill.teacher_scores
    teacher_meta: Optional[dict] = None     # its .json (train/teacher.py)

    def __post_init__(self):
        if self.loss_fn is None:
            self.loss_fn = build_loss(self.cfg.loss)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


# --------------------------------------------------------------------------- builders


def _own_output_dir(acc, out: Path) -> rundir.RunLock:
    """Rank 0 takes the run directory's lock (rundir.RunLock); every rank learns the outcome, so
    a refusal is the same one line on every rank and none waits at a barrier."""
    lock = rundir.RunLock(out)
    error = None
    if acc.is_main_process:
        try:
            lock.acquire()
        except rundir.RunDirLocked as e:
            error = str(e)
        if lock.previous:
            warnings.warn(f"{out} was left by a training that is gone ({rundir.describe_holder(lock.previous)}); "
                          f"taking it over (train.resume=auto continues from its last checkpoint)")
    error = gather(acc, error)[0]
    if error:
        raise UserError(error)
    return lock


def _prepare_output_dir(cfg: Config) -> Path:
    """Every rank checks and creates it (before any collective: an error here is the same on
    every rank, so none waits forever at a barrier)."""
    out = Path(cfg.train.output_dir)
    used = [f for f in (rundir.CHECKPOINTS, rundir.HISTORY, rundir.BEST_MODEL) if (out / f).exists()]
    if cfg.train.resume == "never" and used:
        raise UserError(f"train.output_dir={str(out)!r} already holds a run ({', '.join(used)}) and "
                        f"train.resume=never would mix the two: use a new output_dir, or "
                        f"train.resume=auto to continue that run")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"train.output_dir={str(out)!r} cannot be created or written ({e.strerror or e}); "
                        f"choose a writable directory") from None
    return out


def seed_rank(seed: int, rank: int) -> None:
    """After the model exists (the same initial weights on every rank): each rank's own stream
    for what it draws while training (dropout masks, torch-side augmentation), so N ranks see N
    different masks a step instead of one mask N times. Rank 0 keeps `seed` (a 1-process run
    draws as before); rank r > 0 a seed mixed from (seed, r). A resume restores each rank's
    saved RNG state on top (checkpoint.py), so kill -9 resume stays exact."""
    if rank > 0:
        from accelerate.utils import set_seed

        set_seed(mix_seed(seed, rank, 8))


def check_inputs(cfg: Config):
    """What can be checked before any process group exists, in every rank's process alike: the
    shards (manifest, splits), the model (backbone, weight files) and a distillation teacher's
    cache (distill.teacher_scores against the training split). Returns the manifest;
    raises UserError. `build_run` calls it before the Accelerator, so under torchrun /
    accelerate launch each rank prints its one line and exits 2 without reaching the
    rendezvous (docs/training.md, "Errors")."""
    return _check_inputs(cfg)[0]


def _check_inputs(cfg: Config):
    """(manifest, the teacher's cache or None): `check_inputs`."""
    cache = None
    try:
        if not cfg.data.shards:
            raise UserError("data.shards is not set: pass data.shards=DIR (a directory written by "
                            "python -m mlic_dist.shard)")
        manifest = read_manifest(cfg.data.shards)
        for split in (cfg.data.train_split, cfg.data.val_split):
            if split not in manifest.splits:
                raise UserError(f"data.shards={cfg.data.shards!r} has no {split!r} split (it has "
                                f"{sorted(manifest.splits)}); re-shard with a validation split")
        test = cfg.data.test_split
        if cfg.train.eval_test and test and test not in manifest.splits and test != "test":
            # a name the user typed: never skip it silently (a missing default "test" is skipped)
            raise UserError(f"data.test_split={test!r} is not a split of data.shards={cfg.data.shards!r} (it has "
                            f"{sorted(manifest.splits)}); name one of them, or data.test_split='' for none")
        check_pretrained(cfg.model.backbone, cfg.model.pretrained, cfg.model.weights)
        if cfg.distill.teacher_scores:
            cache = teacher.check_cache(cfg.distill.teacher_scores, manifest, cfg.data.train_split)
    except UserError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        raise UserError(str(e)) from None
    return manifest, cache


def build_run(cfg: Config) -> Run:
    """Everything a run needs. Bad input raises UserError (before any collective operation;
    what needs no process group, `check_inputs`, before the Accelerator exists)."""
    manifest, cache = _check_inputs(cfg)
    acc = build_accelerator(cfg)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the same initial weights on every rank
    try:
        optim.check_batch_policy(cfg, acc.num_processes)   # config only: every rank raises alike
        classes = list(manifest.classes)
        test = cfg.data.test_split
        if cfg.train.eval_test and test and test not in manifest.splits and acc.is_main_process:
            print(f"no test split in {cfg.data.shards}: the run scores validation only", flush=True)
        check_shared_dir(acc, Path(cfg.train.output_dir))   # before anything in it is read or written
        lock = _own_output_dir(acc, Path(cfg.train.output_dir))
        out = _prepare_output_dir(cfg)
        model = create_model(cfg.model.backbone, len(classes), cfg.model.pretrained, cfg.model.dropout,
                             cfg.model.weights, cfg.model.grad_checkpointing, cfg.data.size)
        loader_args = dict(rank=acc.process_index, world_size=acc.num_processes, device=acc.device, seed=cfg.seed)
        train_loader = build_loader(cfg.data, cfg.data.train_split, train=True, **loader_args)
        val_loader = build_loader(cfg.data, cfg.data.val_split, train=False, **loader_args)
        test_loader = None  # built now so a split too small for the world size fails before training
        if cfg.train.eval_test and cfg.data.test_split and cfg.data.test_split in manifest.splits:
            test_loader = build_loader(cfg.data, cfg.data.test_split, train=False, **loader_args)
    except UserError:
        if "lock" in locals():
            lock.release()
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if "lock" in locals():
            lock.release()
        raise UserError(str(e)) from None
    if cfg.model.sync_bn and acc.num_processes > 1:
        if acc.device.type == "cuda":
            model = convert_sync_batchnorm(model, cfg.model.backbone)
        else:
            warnings.warn("model.sync_bn=true needs GPUs (SyncBatchNorm has no CPU kernel): "
                          "BatchNorm statistics stay per process")
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = build_ema(model, cfg.train.ema_decay, acc.device)  # a copy of the unprepared model (ema.py)
    optimizer = optim.build_optimizer(cfg, model, acc.num_processes)
    scheduler = optim.build_scheduler(cfg, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)
    seed_rank(cfg.seed, acc.process_index)
    tracker = Tracker(cfg.tracking, out, active=acc.is_main_process)
    return Run(cfg, acc, model, optimizer, scheduler, train_loader, val_loader, test_loader, classes, out,
               tracker, TrainState(), manifest_sha256=content_digest(cfg.data.shards),
               ema=ema, lock=lock, teacher=None if cache is None else torch.from_numpy(cache.probs).to(acc.device),
               teacher_meta=None if cache is None else cache.meta)


# --------------------------------------------------------------------------- epoch loop


def _targets(run: Run, batch) -> torch.Tensor:
    """(B, C) what the loss trains towards: the labels, blended with the teacher's probabilities
    when distilling (train/teacher.py; validation and selection use the labels alone)."""
    if run.teacher is None:
        return batch.targets
    return teacher.blend_targets(batch.targets, batch.mask, batch.ids, batch.partner, run.teacher,
                                 run.cfg.distill.alpha)


def _optimizer_step(run: Run, warmup: optim.Warmup, nonfinite: optim.NonfiniteSteps) -> Optional[bool]:
    """Clip, check, step. Non-finite gradients (bf16 / fp32: checked on the all-reduced
    gradients, so every rank decides alike) skip the step. Without a weight EMA that decision
    stays on the device (the fused optimizer's found_inf, counted by `nonfinite`) and this
    returns None: no host synchronisation in a step. With an EMA (which must see applied steps
    only) or the fp16 loss scaler (whose skips are its way of finding a scale) it returns
    whether the step was applied."""
    cfg, acc, opt = run.cfg, run.accelerator, run.optimizer
    scaler = getattr(acc, "scaler", None)
    norm = None
    if cfg.optim.grad_clip:
        norm = acc.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
    elif scaler is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
    if scaler is None and run.ema is None:
        bad = ~torch.isfinite(norm)
        with warmup.applied(opt, run.state.global_step):
            optim.step_unless(opt, bad)
        nonfinite.record(bad)
        opt.zero_grad(set_to_none=True)
        return None
    if scaler is None and not bool(torch.isfinite(norm)):  # the EMA's host sync
        opt.zero_grad(set_to_none=True)
        return False
    with warmup.applied(opt, run.state.global_step):
        opt.step()
    opt.zero_grad(set_to_none=True)
    return not (scaler is not None and acc.optimizer_step_was_skipped)


def _diverged(run: Run, epoch: int, step: int, what: str) -> DivergenceError:
    ckpt = run.last_good_checkpoint
    lrs = ", ".join(f"{g['name']} {g['lr']:.3g}" for g in run.optimizer.param_groups)
    where = (f"the last good checkpoint is {ckpt}" if ckpt else
             "there is no good checkpoint (it diverged before the first one)")
    return DivergenceError(
        f"training diverged at epoch {epoch}, step {step}: {what}; {where}. Lower the learning "
        f"rates (now {lrs}: optim.lr, optim.head_lr), set optim.grad_clip or optim.warmup_epochs"
        + (f"; continue from the checkpoint with train.resume={ckpt} train.resume_accept=optim.lr,"
           f"optim.head_lr and the new values" if ckpt else ""))


def train_one_epoch(run: Run, epoch: int) -> dict:
    cfg, acc, model = run.cfg, run.accelerator, run.model
    accum = cfg.train.grad_accum_steps
    loader = run.train_loader
    loader.set_epoch(epoch)
    n_batches = len(loader)
    if cfg.train.max_steps_per_epoch:
        n_batches = min(n_batches, cfg.train.max_steps_per_epoch * accum)
    steps_total = math.ceil(n_batches / accum)
    warmup = optim.Warmup(cfg.optim.warmup_epochs, steps_total)
    skip_batches = run.state.step_in_epoch * accum  # data position after a mid-epoch resume
    st = run.state
    prior = (st.epoch_loss_sum, st.epoch_seen, st.epoch_skipped, st.epoch_time_s,  # before a resume
             st.epoch_loss_count)
    model.train()
    plain = unwrap(acc, model)  # what the EMA averages
    # summed over the non-ignored entries and counted (losses.py's scale), float64: exact counts
    loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    count_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
    seen = skipped = 0
    t0 = time.perf_counter()
    nonfinite = optim.NonfiniteSteps(acc.device, run_before=st.bad_steps)

    def settle_skips() -> None:  # the device's count of skipped steps, read (a host sync)
        nonlocal skipped
        n, longest, now = nonfinite.read()
        st.skipped_steps, st.bad_steps = st.skipped_steps + n, now
        skipped += n
        limit = cfg.train.max_nonfinite_steps
        if longest >= limit:
            more = f" ({longest} by this step, where the device's count is read)" if longest > limit else ""
            raise _diverged(run, epoch, st.step_in_epoch,
                            f"the loss or its gradients were non-finite for {limit} optimizer steps in a "
                            f"row{more} (skipped, not applied)")

    def so_far() -> None:  # the epoch's numbers up to now, into the state a checkpoint saves
        settle_skips()
        total, count = acc.reduce(torch.stack([loss_sum, count_sum]), reduction="sum").tolist()
        st.epoch_loss_sum, st.epoch_loss_count = prior[0] + total, prior[4] + count
        st.epoch_seen, st.epoch_skipped = prior[1] + seen, prior[2] + skipped
        st.epoch_time_s = prior[3] + time.perf_counter() - t0

    bar = tqdm(total=steps_total, initial=run.state.step_in_epoch, disable=not run.is_main,
               desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)
    try:  # the bar is closed on errors too: the error line must start a line of its own
        for i, batch in enumerate(itertools.islice(loader, n_batches)):
            if i < skip_batches:  # the loaders replay an epoch exactly, so skipping restores the position
                continue
            last_micro = (i + 1) % accum == 0 or i + 1 == n_batches
            # A short last window (n_batches not a multiple of accum) averages over its own size.
            window = min(accum, n_batches - (i // accum) * accum)
            ctx = acc.no_sync(model) if not last_micro else contextlib.nullcontext()
            with ctx:
                logits = model(batch.images)  # (B, C); autocast comes from accelerator.prepare
                entries = run.loss_fn.entries(logits, _targets(run, batch), batch.mask)  # (B, C) float32
                count = batch.mask.sum()
                loss = entries.sum() / count.clamp_min(1.0)   # mean over the non-ignored entries
                acc.backward(loss / window)
            loss_sum += torch.nan_to_num(entries.detach().sum(), nan=0.0, posinf=0.0, neginf=0.0)
            count_sum += count
            seen += batch.images.shape[0]
            if not last_micro:
                continue
            applied = _optimizer_step(run, warmup, nonfinite)
            if applied is None:
                pass   # decided on the device; settle_skips() reads it at logging steps
            elif applied:
                run.state.bad_steps = 0
                if run.ema is not None:  # applied steps only: a skipped step never reaches the EMA
                    run.ema.update_parameters(plain)
            else:
                run.state.bad_steps += 1
                run.state.skipped_steps += 1
                skipped += 1
                if run.state.bad_steps >= cfg.train.max_nonfinite_steps:
                    raise _diverged(run, epoch, run.state.step_in_epoch + 1,
                                    f"the loss or its gradients were non-finite for {run.state.bad_steps} "
                                    f"optimizer steps in a row (skipped, not applied)")
            run.state.step_in_epoch += 1
            run.state.global_step += 1
            if run.state.step_in_epoch % cfg.train.log_every_steps == 0 or run.state.step_in_epoch == steps_total:
                dt = time.perf_counter() - t0
                lr = run.optimizer.param_groups[0]["lr"]
                imgs = seen * acc.num_processes / max(dt, 1e-9)
                loss_now = loss.item()  # the host syncs of a logging step: the loss, the skips
                settle_skips()
                bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{lr:.2e}", img_s=f"{imgs:.1f}")
                run.tracker.log_metrics({"train_loss_step": loss_now}, step=run.state.global_step, step_level=True)
            bar.update(1)
            every = cfg.train.checkpoint_every_steps
            if every and run.state.step_in_epoch % every == 0 and run.state.step_in_epoch < steps_total:
                so_far()
                save_checkpoint(run)
    finally:
        bar.close()
    so_far()
    images_per_s = st.epoch_seen * acc.num_processes / max(st.epoch_time_s, 1e-9)
    train_loss = st.epoch_loss_sum / st.epoch_loss_count if st.epoch_loss_count else float("nan")
    return {"train_loss": train_loss, "images_per_s": images_per_s,
            "epoch_time_s": st.epoch_time_s, "skipped_steps": st.epoch_skipped}


# --------------------------------------------------------------------------- fit


def _improved(cfg: Config, value: float, best: float) -> bool:
    if math.isnan(best):
        return not math.isnan(value)
    return value > best if cfg.train.select_metric == "val_mAP" else value < best


def train(cfg: Config, epoch_hook: Callable[[dict], None] | None = None) -> dict:
    """Train, select on validation, score val/test with the best weights; returns metrics.json's dict.

    `epoch_hook(record)` is called on every rank after each epoch (Ray Tune reporting uses it).
    """
    run = build_run(cfg)
    try:
        return fit(run, epoch_hook)
    finally:
        for loader in (run.train_loader, run.val_loader, run.test_loader):
            if loader is not None:   # DALI's pipelines and threads, in a process that goes on
                loader.close()
        if run.lock is not None:
            run.lock.release()


def fit(run: Run, epoch_hook: Callable[[dict], None] | None = None) -> dict:
    """Resume, the epochs, the final scoring of a built run (`train` owns its directory's lock)."""
    cfg = run.cfg
    try:
        resumed = maybe_resume(run)
    except UserError:
        raise
    except (ValueError, OSError, KeyError, RuntimeError) as e:  # a wrong path, another model's state
        raise UserError(f"cannot resume from {cfg.train.resume if cfg.train.resume != 'auto' else cfg.train.output_dir}: "
                        f"{e}") from None
    out, acc = run.out, run.accelerator
    if run.is_main:
        rundir.write_config(out, to_dict(cfg))
        rundir.write_classes(out, run.classes)
        print(optim.describe_batch(cfg, acc.num_processes), flush=True)
    val_keys, val_labels = read_split_labels(cfg.data.shards, cfg.data.val_split)
    start_tracking(run, resumed)
    system = start_system_metrics(run, resumed)
    status = "FAILED"
    chance_logged = False
    try:
        while run.state.epoch < cfg.train.epochs and not run.state.stopped:
            epoch = run.state.epoch
            record = {"epoch": epoch, **train_one_epoch(run, epoch)}
            val = evaluate(run, run.val_loader, val_labels, desc=f"val {epoch}")
            if not np.isfinite(val["probs"]).all():
                raise _diverged(run, epoch, run.state.step_in_epoch,
                                "the model's validation scores are not finite after this epoch")
            record.update(val_loss=val["loss"], val_mAP=val["mAP"], val_chance_mAP=val["chance_mAP"],
                          lr=run.optimizer.param_groups[0]["lr"],
                          head_lr=run.optimizer.param_groups[-1]["lr"])
            if run.ema is not None:
                sync_buffers(run.ema, acc)
                ema_val = evaluate(run, run.val_loader, val_labels, desc=f"val ema {epoch}", model=run.ema.module)
                record.update(val_loss_ema=ema_val["loss"], val_mAP_ema=ema_val["mAP"])
            if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                run.scheduler.step(val["loss"])
            elif run.scheduler is not None:
                run.scheduler.step()
            value, source = record[cfg.train.select_metric], "raw"
            if run.ema is not None:  # the EMA competes with the raw weights for "best"
                if _improved(cfg, record[cfg.train.select_metric + "_ema"], value):
                    value, source = record[cfg.train.select_metric + "_ema"], "ema"
                record["select_source"] = source
            if _improved(cfg, value, run.state.best_value):
                run.state.best_value, run.state.best_epoch, run.state.bad_epochs = value, epoch, 0
                run.state.best_source = source
                if run.is_main:  # a candidate until the checkpoint below names it (publish_best)
                    weights = run.ema.module if source == "ema" else unwrap(acc, run.model)
                    checkpoint.save_weights(weights.state_dict(), best_file(out, epoch))
            else:
                run.state.bad_epochs += 1
            record["best_" + cfg.train.select_metric] = run.state.best_value
            run.state.history.append(record)
            run.state.stopped = bool(cfg.train.early_stopping) and run.state.bad_epochs >= cfg.train.early_stopping
            run.state.next_epoch()
            save_checkpoint(run)
            publish_best(run)
            if run.is_main:
                rundir.write_history(out, run.state.history)
                print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
            # val_chance_mAP depends on the labels only: one point (per process) is its curve
            run.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"
                                     and (k != "val_chance_mAP" or not chance_logged)}, step=epoch)
            chance_logged = True
            if epoch_hook is not None:
                epoch_hook(record)
        if run.state.stopped and run.is_main:
            print(f"early stopping: no {cfg.train.select_metric} improvement for {run.state.bad_epochs} "
                  f"epochs (best epoch {run.state.best_epoch})", flush=True)
        result = finalize(run, val_keys, val_labels)
        status = "FINISHED"
        return result
    except DivergenceError as e:
        run.tracker.set_tags({"mlic.failure": str(e)[:4000]})
        raise
    finally:
        system.stop()            # its last samples go in before the run ends
        run.tracker.finish(status)


def finalize(run: Run, val_keys: list[str], val_labels: np.ndarray) -> dict:
    """Best weights -> val/test scores, thresholds tuned on val, files in the run directory."""
    cfg, acc, out = run.cfg, run.accelerator, run.out
    last_digest = check_ranks_in_sync(acc, run.model)
    ema_digest = check_ema_in_sync(run.ema, acc) if run.ema is not None else None  # as the weights do
    publish_best(run)
    acc.wait_for_everyone()
    if run.state.best_epoch >= 0:  # the weights the state names (resume made sure they exist)
        best = best_file(out, run.state.best_epoch)
        unwrap(acc, run.model).load_state_dict(torch.load(best, map_location="cpu", weights_only=True))
    splits = {"val": (run.val_loader, cfg.data.val_split)}
    if run.test_loader is not None:
        splits["test"] = (run.test_loader, cfg.data.test_split)
    result: dict = {"best_epoch": run.state.best_epoch, "epochs_run": len(run.state.history),
                    "select_metric": cfg.train.select_metric, "world_size": acc.num_processes,
                    "global_batch_size": optim.global_batch_size(cfg, acc.num_processes),
                    "learning_rates": optim.lr_rule(cfg, acc.num_processes),
                    "skipped_steps": run.state.skipped_steps, "param_digest": last_digest,
                    "best_source": run.state.best_source}
    if ema_digest is not None:
        result["ema_digest"] = ema_digest
    result["forward_passes"] = 1       # one network per image at inference
    if run.teacher_meta is not None:   # a distilled student, and its teacher
        result["kind"] = "distill"
        result["distill"] = {"teacher": run.teacher_meta.get("teacher"),
                             "teacher_run_id": run.teacher_meta.get("teacher_run_id"),
                             "teacher_members": len(run.teacher_meta.get("members") or []),
                             "alpha": cfg.distill.alpha, "cache": str(cfg.distill.teacher_scores)}
    thresholds = None
    for name, (loader, split) in splits.items():
        keys, labels = (val_keys, val_labels) if name == "val" else read_split_labels(cfg.data.shards, split)
        # fp32 (autocast off): the scores predict / export / serving reproduce, thresholds tuned on them
        probs, loss = predict_split(run, loader, len(labels), desc=f"score {name}", fp32=True)
        if not np.isfinite(probs).all():   # a failed run (exit 1), not bad input
            raise _diverged(run, run.state.epoch, 0, f"the best weights' {name} scores are not finite")
        if name == "val":
            thresholds = metrics.tune_thresholds(probs, labels)
        report = metrics.evaluate(probs, labels, classes=run.classes, thresholds=thresholds)
        report["loss"] = loss
        result[name] = report
        if run.is_main:
            rundir.write_split(out, name, probs, labels, keys)
    if run.is_main:
        rundir.write_thresholds(out, thresholds, run.classes)
        rundir.write_metrics(out, result)
        run.tracker.log_metrics(tracking.final_metrics(result), step=len(run.state.history))
        run.tracker.log_artifacts(rundir.artifact_files(out) + [p for p in [out / rundir.BEST_MODEL] if p.is_file()])
        print(json.dumps({"val_mAP": result["val"]["mAP"], "val_chance_mAP": result["val"]["chance_mAP"],
                          "test_mAP": result.get("test", {}).get("mAP"),
                          "test_chance_mAP": result.get("test", {}).get("chance_mAP")}), flush=True)
    acc.wait_for_everyone()
    return result
