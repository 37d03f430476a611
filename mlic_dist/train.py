"""Train a multi-label classifier: one `train(cfg)` for every launcher.

CPU, one process:  python -m mlic_dist.train --config configs/demo/scenes.yaml
one GPU:           accelerate launch -m mlic_dist.train --config configs/voc2007/wang.yaml data.shards=DIR
8 GPUs:            accelerate launch --multi_gpu --num_processes 8 -m mlic_dist.train --config ... 
2 nodes x 8 GPUs:  accelerate launch --multi_gpu --num_machines 2 --machine_rank R \
                       --main_process_ip HOST --main_process_port 29500 --num_processes 16 \
                       -m mlic_dist.train --config ...
torchrun:          torchrun --nproc_per_node 2 -m mlic_dist.train --config ... (gloo on CPU)
Ray Train workers call `train(cfg)` too (launch/sweep.py). Several nodes must share
`train.output_dir` and the shards (a shared filesystem): every rank reads and writes them.

Flow: build (accelerator, manifest, model, optimizer, schedule, loaders) -> resume -> for each
epoch: train_one_epoch -> evaluate on the validation split (never test) -> schedule, best
checkpoint, early stopping -> atomic checkpoint. At the end the best weights score validation
and test, per-class thresholds are tuned on validation, and the run directory receives
config.yaml, classes.json, scores_/targets_/keys_{val,test}, thresholds.json, metrics.json.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint, metrics, rundir
from .config import Config, flatten, load_config, to_dict
from .data import build_loader, read_manifest
from .data.labels import read_split_labels
from .models import create_model
from .distributed import check_ranks_in_sync, param_digest, unwrap  # noqa: F401 (param_digest: tests)
from .scoring import evaluate, predict_split
from .tracking import Tracker


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
    run_id: str = ""               # MLflow run, re-opened after a resume
    history: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


# --------------------------------------------------------------------------- builders


def build_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    precision = cfg.train.mixed_precision
    if precision == "fp16" and not torch.cuda.is_available():
        warnings.warn("train.mixed_precision=fp16 needs a GPU; running in fp32 on this CPU")
        precision = "no"
    ddp = DistributedDataParallelKwargs(
        bucket_cap_mb=cfg.train.ddp_bucket_cap_mb,
        gradient_as_bucket_view=cfg.train.ddp_gradient_as_bucket_view,
        static_graph=cfg.train.ddp_static_graph,
    )
    # cpu=True on a machine without CUDA: Accelerate then runs torchrun/accelerate-launched
    # processes as MULTI_CPU over gloo (without it every process trains alone).
    # The AcceleratorState singleton outlives a train() call (tests, reused Ray workers); reset
    # it so this run's precision applies. The process group (PartialState) is kept.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(mixed_precision=precision, kwargs_handlers=[ddp], step_scheduler_with_optimizer=False,
                      cpu=not torch.cuda.is_available())
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: autotuned kernels pay off
    if acc.device.type == "cpu":
        # Several processes on one host share its cores; oversubscription halves throughput.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
    return acc


def build_optimizer(cfg: Config, model) -> torch.optim.Optimizer:
    backbone, head = model.param_groups()
    groups = [{"params": backbone, "lr": cfg.optim.lr, "name": "backbone"},
              {"params": head, "lr": cfg.optim.head_lr, "name": "head"}]
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                               weight_decay=cfg.optim.weight_decay)
    return torch.optim.Adam(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=cfg.optim.weight_decay)


def build_scheduler(cfg: Config, optimizer):
    """Epoch-level schedules, stepped after each epoch (the seed repo stepped at epoch start,
    which decays one epoch early on PyTorch >= 1.1)."""
    s = cfg.schedule
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_epochs, gamma=s.gamma)
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=s.plateau_factor,
                                                          patience=s.plateau_patience)
    return None


def masked_bce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over the (sample, class) entries whose mask is 1."""
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")  # (B, C)
    return (loss * mask).sum() / mask.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- epoch loops


def train_one_epoch(run: Run, epoch: int) -> dict:
    cfg, acc, model, opt = run.cfg, run.accelerator, run.model, run.optimizer
    accum = cfg.train.grad_accum_steps
    loader = run.train_loader
    loader.set_epoch(epoch)
    n_batches = len(loader)
    if cfg.train.max_steps_per_epoch:
        n_batches = min(n_batches, cfg.train.max_steps_per_epoch * accum)
    steps_total = math.ceil(n_batches / accum)
    skip_batches = run.state.step_in_epoch * accum  # data position after a mid-epoch resume
    model.train()
    loss_sum = torch.zeros((), device=acc.device)
    seen = 0
    t0 = time.perf_counter()
    bar = tqdm(total=steps_total, initial=run.state.step_in_epoch, disable=not run.is_main,
               desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)
    for i, batch in enumerate(itertools.islice(loader, n_batches)):
        if i < skip_batches:  # the loaders replay an epoch exactly, so skipping restores the position
            continue
        last_micro = (i + 1) % accum == 0 or i + 1 == n_batches
        # A short last window (n_batches not a multiple of accum) averages over its own size.
        window = min(accum, n_batches - (i // accum) * accum)
        ctx = acc.no_sync(model) if not last_micro else contextlib.nullcontext()
        with ctx:
            logits = model(batch.images)  # (B, C); autocast comes from accelerator.prepare
            loss = masked_bce(logits, batch.targets, batch.mask)
            acc.backward(loss / window)
        loss_sum += loss.detach()
        seen += batch.images.shape[0]
        if not last_micro:
            continue
        if cfg.optim.grad_clip:
            acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.state.step_in_epoch += 1
        run.state.global_step += 1
        if run.state.step_in_epoch % cfg.train.log_every_steps == 0 or run.state.step_in_epoch == steps_total:
            dt = time.perf_counter() - t0
            lr = opt.param_groups[0]["lr"]
            imgs = seen * acc.num_processes / max(dt, 1e-9)
            loss_now = loss.item()  # the one host sync of a logging step
            bar.set_postfix(loss=f"{loss_now:.4f}", lr=f"{lr:.2e}", img_s=f"{imgs:.1f}")
            run.tracker.log_metrics({"train_loss_step": loss_now}, step=run.state.global_step)
        bar.update(1)
        every = cfg.train.checkpoint_every_steps
        if every and run.state.step_in_epoch % every == 0 and run.state.step_in_epoch < steps_total:
            save_checkpoint(run)
    bar.close()
    dt = time.perf_counter() - t0
    micro = max(1, min(n_batches, len(loader)) - skip_batches)
    mean_loss = acc.reduce(loss_sum, reduction="mean").item() / micro
    images_per_s = seen * acc.num_processes / max(dt, 1e-9)
    return {"train_loss": mean_loss, "images_per_s": images_per_s, "epoch_time_s": dt}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run) -> Path:
    acc = run.accelerator
    payload = None
    if run.is_main:
        payload = {
            "model": unwrap(acc, run.model).state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
            "trainer": run.state.to_dict(),
            "config": to_dict(run.cfg),
        }
    return checkpoint.save(run.out, epoch=run.state.epoch, step=run.state.step_in_epoch,
                           rank=acc.process_index, world_size=acc.num_processes, payload=payload,
                           barrier=acc.wait_for_everyone, keep=run.cfg.train.keep_checkpoints)


def _best_file(out: Path, epoch: int) -> Path:
    return out / rundir.CHECKPOINTS / f"best-e{epoch:04d}.pt"


def publish_best(run: Run) -> None:
    """best_model.pt <- the weights of the epoch the trainer state calls best (rank 0).

    New best weights are written as checkpoints/best-eNNNN.pt *before* the checkpoint whose
    state names them, and published here *after* it: a crash anywhere in between leaves either
    an unreferenced candidate (deleted here on resume) or a stale best_model.pt (replaced here),
    never a best_model.pt that disagrees with the state."""
    if not run.is_main or run.state.best_epoch < 0:
        return
    src = _best_file(run.out, run.state.best_epoch)
    if src.is_file():
        tmp = run.out / (rundir.BEST_MODEL + ".tmp")
        # A copy, not a hard link: a tool that rewrites best_model.pt in place must not
        # change the file the checkpoint refers to.
        shutil.copyfile(src, tmp)
        os.replace(tmp, run.out / rundir.BEST_MODEL)
    for p in (run.out / rundir.CHECKPOINTS).glob("best-e*.pt"):
        if p != src:
            p.unlink(missing_ok=True)


def maybe_resume(run: Run) -> None:
    mode = run.cfg.train.resume
    if mode == "never":
        return
    path = checkpoint.latest(run.out) if mode == "auto" else Path(mode)
    if path is None:
        return
    state, rng = checkpoint.load(path, run.accelerator.process_index)
    unwrap(run.accelerator, run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state.get("scheduler") is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and getattr(run.accelerator, "scaler", None) is not None:
        run.accelerator.scaler.load_state_dict(state["scaler"])
    run.state = TrainState(**state["trainer"])
    if rng is not None:
        checkpoint.set_rng_state(rng)
    elif state.get("world_size") != run.accelerator.num_processes:
        warnings.warn(f"{path} was written by {state.get('world_size')} processes, this run has "
                      f"{run.accelerator.num_processes}: model and optimizer resume, RNG streams restart")
    publish_best(run)
    if run.is_main:
        print(f"resumed from {path} (epoch {run.state.epoch}, step {run.state.step_in_epoch})", flush=True)


# --------------------------------------------------------------------------- fit


def _improved(cfg: Config, value: float, best: float) -> bool:
    if math.isnan(best):
        return not math.isnan(value)
    return value > best if cfg.train.select_metric == "val_mAP" else value < best


def build_run(cfg: Config) -> Run:
    acc = build_accelerator(cfg)
    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the same initial weights on every rank
    if not cfg.data.shards:
        raise ValueError("data.shards is not set: pass data.shards=DIR (a directory written by mlic_dist.shard)")
    manifest = read_manifest(cfg.data.shards)
    classes = list(manifest.classes)
    for split in (cfg.data.train_split, cfg.data.val_split):
        if split not in manifest.splits:
            raise ValueError(f"data.shards={cfg.data.shards!r} has no {split!r} split (it has "
                             f"{sorted(manifest.splits)}); re-shard with a validation split")
    model = create_model(cfg.model.backbone, len(classes), cfg.model.pretrained, cfg.model.dropout)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    loader_args = dict(rank=acc.process_index, world_size=acc.num_processes, device=acc.device, seed=cfg.seed)
    train_loader = build_loader(cfg.data, cfg.data.train_split, train=True, **loader_args)
    val_loader = build_loader(cfg.data, cfg.data.val_split, train=False, **loader_args)
    test_loader = None  # built now so a split too small for the world size fails before training
    if cfg.train.eval_test and cfg.data.test_split and cfg.data.test_split in manifest.splits:
        test_loader = build_loader(cfg.data, cfg.data.test_split, train=False, **loader_args)
    if cfg.model.compile:
        model = torch.compile(model)
    model, optimizer = acc.prepare(model, optimizer)
    out = Path(cfg.train.output_dir)
    used = [f for f in (rundir.CHECKPOINTS, rundir.HISTORY, rundir.BEST_MODEL) if (out / f).exists()]
    if cfg.train.resume == "never" and used:
        raise ValueError(f"train.output_dir={str(out)!r} already holds a run ({', '.join(used)}) and "
                         f"train.resume=never would mix the two: use a new output_dir, or "
                         f"train.resume=auto to continue that run")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    tracker = Tracker(cfg.tracking, out, active=acc.is_main_process)
    return Run(cfg, acc, model, optimizer, scheduler, train_loader, val_loader, test_loader, classes, out,
               tracker, TrainState())


def train(cfg: Config, epoch_hook: Callable[[dict], None] | None = None) -> dict:
    """Train, select on validation, score val/test with the best weights; returns metrics.json's dict.

    `epoch_hook(record)` is called on every rank after each epoch (Ray Tune reporting uses it).
    """
    run = build_run(cfg)
    maybe_resume(run)
    out, acc = run.out, run.accelerator
    if run.is_main:
        rundir.write_config(out, to_dict(cfg))
        rundir.write_classes(out, run.classes)
    val_keys, val_labels = read_split_labels(cfg.data.shards, cfg.data.val_split)
    run.state.run_id = run.tracker.start(flatten(to_dict(cfg)), resume_run_id=run.state.run_id or None,
                                         tags={"backbone": cfg.model.backbone, "augment": cfg.data.augment,
                                               "size": cfg.data.size}) or run.state.run_id
    status = "FAILED"
    try:
        while run.state.epoch < cfg.train.epochs and not run.state.stopped:
            epoch = run.state.epoch
            record = {"epoch": epoch, **train_one_epoch(run, epoch)}
            val = evaluate(run, run.val_loader, val_labels)
            record.update(val_loss=val["loss"], val_mAP=val["mAP"], lr=run.optimizer.param_groups[0]["lr"],
                          head_lr=run.optimizer.param_groups[-1]["lr"])
            if isinstance(run.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                run.scheduler.step(val["loss"])
            elif run.scheduler is not None:
                run.scheduler.step()
            value = record[cfg.train.select_metric]
            if _improved(cfg, value, run.state.best_value):
                run.state.best_value, run.state.best_epoch, run.state.bad_epochs = value, epoch, 0
                if run.is_main:  # a candidate until the checkpoint below names it (publish_best)
                    checkpoint.save_weights(unwrap(acc, run.model).state_dict(), _best_file(out, epoch))
            else:
                run.state.bad_epochs += 1
            record["best_" + cfg.train.select_metric] = run.state.best_value
            run.state.history.append(record)
            run.state.stopped = bool(cfg.train.early_stopping) and run.state.bad_epochs >= cfg.train.early_stopping
            run.state.epoch, run.state.step_in_epoch = epoch + 1, 0
            save_checkpoint(run)
            publish_best(run)
            if run.is_main:
                rundir.write_history(out, run.state.history)
            if run.is_main:
                print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
            run.tracker.log_metrics({k: v for k, v in record.items() if k != "epoch"}, step=epoch)
            if epoch_hook is not None:
                epoch_hook(record)
        if run.state.stopped and run.is_main:
            print(f"early stopping: no {cfg.train.select_metric} improvement for {run.state.bad_epochs} "
                  f"epochs (best epoch {run.state.best_epoch})", flush=True)
        result = finalize(run, val_keys, val_labels)
        status = "FINISHED"
        return result
    finally:
        run.tracker.finish(status)


def finalize(run: Run, val_keys: list[str], val_labels: np.ndarray) -> dict:
    """Best weights -> val/test scores, thresholds tuned on val, files in the run directory."""
    cfg, acc, out = run.cfg, run.accelerator, run.out
    last_digest = check_ranks_in_sync(acc, run.model)
    publish_best(run)
    acc.wait_for_everyone()
    best_file = out / rundir.BEST_MODEL
    if best_file.is_file():
        sd = torch.load(best_file, map_location="cpu", weights_only=True)
        unwrap(acc, run.model).load_state_dict(sd)
    splits = {"val": (run.val_loader, cfg.data.val_split)}
    if run.test_loader is not None:
        splits["test"] = (run.test_loader, cfg.data.test_split)
    result: dict = {"best_epoch": run.state.best_epoch, "epochs_run": len(run.state.history),
                    "select_metric": cfg.train.select_metric, "world_size": acc.num_processes,
                    "param_digest": last_digest}
    thresholds = None
    for name, (loader, split) in splits.items():
        keys, labels = (val_keys, val_labels) if name == "val" else read_split_labels(cfg.data.shards, split)
        probs, loss = predict_split(run, loader, len(labels))
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
        flat = {}
        for name in splits:
            r = result[name]
            prefix = "final_val" if name == "val" else name  # val_* names the per-epoch curves
            flat[f"{prefix}_mAP"], flat[f"{prefix}_eAP"] = r["mAP"], r.get("eAP")
            for rule in [k for k in r if isinstance(r[k], dict) and k != "settings"]:
                for m, v in r[rule].items():
                    if isinstance(v, (int, float)):
                        flat[f"{prefix}_{rule}_{m}"] = v
        run.tracker.log_metrics(flat, step=len(run.state.history))
        run.tracker.log_artifacts(rundir.artifact_files(out))
        print(json.dumps({"val_mAP": result["val"]["mAP"],
                          "test_mAP": result.get("test", {}).get("mAP")}), flush=True)
    acc.wait_for_everyone()
    return result


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> Config:
    p = argparse.ArgumentParser(prog="python -m mlic_dist.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.size=512")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        sys.exit(0)
    return cfg


def main(argv=None) -> None:
    from .config import ConfigError

    try:
        cfg = parse_args(argv)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    train(cfg)


if __name__ == "__main__":
    main()
