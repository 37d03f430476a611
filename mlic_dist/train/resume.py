"""Saving a training run's state, and resuming it without silently changing what it means.

A resume compares the command's config with the one the checkpoint was written with (the key
classes are mlic_dist/config/schema.py's RESUME_FREE / RESUME_REPLAY):
  - FREE keys (how long, how often, where to log, performance knobs) may change; the change is
    recorded (resumes.jsonl, MLflow tags).
  - REPLAY keys (which loader, its workers, its shuffle buffer) and the number of processes may
    change, but the position inside an epoch is only exact under the old values: a mid-epoch
    resume then restarts that epoch from its start (the checkpoint at the epoch boundary, which
    pruning always keeps), with a warning that says so.
  - every other key changes the training's meaning (learning rates, sizes, augmentation, model,
    data): refused, naming each key with both values, unless `train.resume_accept=KEY,...` (or
    `all`) accepts it on purpose; accepted learning-rate changes are applied to the restored
    optimizer (which would otherwise keep the checkpoint's rates).
`data.shards` may move: the manifest digest decides whether it is the same data.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import rundir
from ..atomic import replace_with
from ..config import RESUME_FREE, RESUME_FREE_PREFIXES, RESUME_REPLAY, ConfigError, config_from_dict, flatten, to_dict
from ..errors import UserError
from . import checkpoint, optim
from .distributed import unwrap

RESUMES = "resumes.jsonl"


@dataclass
class Resumed:
    """What a resume did, for the log, resumes.jsonl and MLflow."""
    checkpoint: Path
    changed: dict = field(default_factory=dict)      # key -> [old, new]
    old_world_size: int = 1
    restarted_epoch: bool = False

    def summary(self) -> str:
        return ", ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in self.changed.items())


def config_changes(old: dict, new: dict) -> dict:
    """Flat key -> [old value, new value] for every key that differs (nested plain dicts in).
    Both are read through today's schema first, so keys added since a checkpoint was written
    compare at their defaults (a checkpoint from an older version still resumes)."""
    def normal(cfg: dict) -> dict:
        try:
            return to_dict(config_from_dict(cfg))
        except ConfigError:   # a key that no longer exists: compare what is there
            return cfg

    def same_rule(flat: dict) -> dict:
        # a run that started under lr_scaling=ask trained at the recipe's rates, as `none` does
        # (ask refuses the runs where the two would differ); earlier releases wrote `none`
        if flat.get("optim.lr_scaling") == "ask":
            flat["optim.lr_scaling"] = "none"
        if flat.get("optim.lr_scaling") == "none":   # then the declared batch changes no number
            flat.pop("optim.base_batch_size", None)
        return flat

    a, b = same_rule(flatten(normal(old))), same_rule(flatten(normal(new)))
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _accepted(accept: str) -> set | None:
    """None = all."""
    keys = {k.strip() for k in accept.split(",") if k.strip()}
    return None if "all" in keys else keys


def check_changes(changed: dict, accept: str, same_data: bool, ckpt: Path) -> None:
    allowed = _accepted(accept)
    refused = {}
    if not same_data and (allowed is None or "data.shards" not in allowed):
        old, new = changed.get("data.shards", [None, None])
        refused["data.shards"] = ("the data it was trained on", "different data (another shard "
                                  "manifest)" + (f" at {new}" if new else " at the same path"))
    for key, (old, new) in changed.items():
        if key == "data.shards":
            continue
        elif key in RESUME_FREE or key.startswith(RESUME_FREE_PREFIXES) or key in RESUME_REPLAY:
            continue
        elif allowed is None or key in allowed:
            continue
        else:
            refused[key] = (old, new)
    if refused:
        lines = "; ".join(f"{k}: checkpoint {v[0]!r}, now {v[1]!r}" for k, v in refused.items())
        raise UserError(
            f"resuming {ckpt} would change what the run means: {lines}. Resume with the "
            f"checkpoint's values, or accept the change on purpose with "
            f"train.resume_accept={','.join(refused)} (or all), or start a new run in another "
            f"train.output_dir")


def save_checkpoint(run) -> Path:
    acc = run.accelerator
    payload = None
    if run.is_main:
        payload = {
            "model": unwrap(acc, run.model).state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
            "scaler": acc.scaler.state_dict() if getattr(acc, "scaler", None) is not None else None,
            "trainer": run.state.to_dict(),
            # rank 0's EMA (its BatchNorm statistics are the ones every rank evaluates: ema.py)
            "ema": run.ema.state_dict() if getattr(run, "ema", None) is not None else None,
            "config": to_dict(run.cfg),
            "manifest_sha256": run.manifest_sha256,
        }
    # Saved during a non-finite streak: the last good checkpoint survives pruning (a divergence
    # names it as the place to go back to).
    protect = (run.last_good_checkpoint,) if run.state.bad_steps and run.last_good_checkpoint else ()
    path = checkpoint.save(run.out, epoch=run.state.epoch, step=run.state.step_in_epoch,
                           rank=acc.process_index, world_size=acc.num_processes, payload=payload,
                           barrier=acc.wait_for_everyone, keep=run.cfg.train.keep_checkpoints,
                           protect=protect, meta={"best_epoch": run.state.best_epoch},
                           rank_state=run.train_loader.state_dict())
    if run.state.bad_steps == 0:
        run.last_good_checkpoint = path
    return path


def best_file(out: Path, epoch: int) -> Path:
    return out / rundir.CHECKPOINTS / f"best-e{epoch:04d}.pt"


def publish_best(run) -> None:
    """best_model.pt <- the weights of the epoch the trainer state calls best (rank 0).

    New best weights are written as checkpoints/best-eNNNN.pt *before* the checkpoint whose
    state names them, and published here *after* it: a crash anywhere in between leaves either
    an unreferenced candidate (deleted here on resume) or a stale best_model.pt (replaced here),
    never a best_model.pt that disagrees with the state. A candidate that a kept checkpoint still
    names stays (resuming that older checkpoint needs it)."""
    if not run.is_main or run.state.best_epoch < 0:
        return
    src = best_file(run.out, run.state.best_epoch)
    if src.is_file():
        # A copy, not a hard link: a tool that rewrites best_model.pt in place must not
        # change the file the checkpoint refers to.
        with replace_with(run.out / rundir.BEST_MODEL) as tmp:
            shutil.copyfile(src, tmp)
    named = {run.state.best_epoch} | {checkpoint.read_meta(c).get("best_epoch")
                                      for c in checkpoint.list_checkpoints(run.out)}
    for p in (run.out / rundir.CHECKPOINTS).glob("best-e*.pt"):
        if int(p.stem[len("best-e"):]) not in named:
            p.unlink(missing_ok=True)


def maybe_resume(run) -> Resumed | None:
    """Restore the newest (or the given) checkpoint into `run`; None when starting fresh."""
    mode = run.cfg.train.resume
    if mode == "never":
        return None
    path = _whole_checkpoint(run) if mode == "auto" else Path(mode)
    if path is None:
        return None
    if mode != "auto" and checkpoint.damage(path):
        raise UserError(f"train.resume={mode}: {path} is not a complete checkpoint ({checkpoint.damage(path)}); "
                        f"resume from another one, or train.resume=auto for the newest whole one")
    acc = run.accelerator
    state, rng = checkpoint.load(path, acc.process_index)
    old_cfg = state.get("config") or {}
    changed = config_changes(old_cfg, to_dict(run.cfg))
    same_data = state.get("manifest_sha256") in (None, run.manifest_sha256)
    check_changes(changed, run.cfg.train.resume_accept, same_data, path)
    old_world = int(state.get("world_size", acc.num_processes))
    info = Resumed(path, changed, old_world)
    mid_epoch = int(state["trainer"].get("step_in_epoch", 0)) > 0
    replay_changed = sorted(set(changed) & RESUME_REPLAY)
    if mid_epoch and (old_world != acc.num_processes or replay_changed):
        why = (f"{old_world} -> {acc.num_processes} processes" if old_world != acc.num_processes
               else ", ".join(replay_changed) + " changed")
        epoch = int(state["trainer"]["epoch"])
        boundary = path.parent / f"e{epoch:04d}-s{0:07d}"
        info.restarted_epoch = True
        if boundary.is_dir() and not checkpoint.damage(boundary):
            warnings.warn(f"{path} is mid-epoch {epoch} and {why}: the batches already seen cannot be "
                          f"skipped exactly, so epoch {epoch} restarts from its start ({boundary})")
            state, rng = checkpoint.load(boundary, acc.process_index)
            info.checkpoint = path = boundary
        else:
            warnings.warn(f"{path} is mid-epoch {epoch} and {why}, and no checkpoint marks that "
                          f"epoch's start: training restarts from scratch")
            if run.is_main:   # the abandoned start must not be resumed next time
                for c in checkpoint.list_checkpoints(run.out):
                    shutil.rmtree(c, ignore_errors=True)
            _record(run, info)
            return info
    unwrap(acc, run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state.get("scheduler") is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and getattr(acc, "scaler", None) is not None:
        acc.scaler.load_state_dict(state["scaler"])
    ema = getattr(run, "ema", None)
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    elif ema is not None:
        warnings.warn(f"{path} holds no weight EMA (train.ema_decay was 0 when it was written): the EMA "
                      f"starts from the resumed weights")
    known = {f.name for f in dataclasses.fields(run.state)}   # a field an earlier release wrote is dropped
    run.state = type(run.state)(**{k: v for k, v in state["trainer"].items() if k in known})
    _find_best_weights(run, path)
    if run.is_main and path.parent == checkpoint.checkpoint_dir(run.out):
        checkpoint.remove_after(run.out, path)   # the abandoned trajectory must not win next time
    _apply_optimizer_changes(run, old_cfg, old_world)
    if rng is not None and old_world == acc.num_processes and not info.restarted_epoch:
        checkpoint.set_rng_state(rng)
        run.train_loader.load_state_dict(rng.get("loader"))   # DALI's reader where the epoch began
    elif old_world != acc.num_processes:
        warnings.warn(f"{path} was written by {old_world} processes, this run has {acc.num_processes}: "
                      f"model and optimizer resume, the random streams restart (not bit-identical "
                      f"to an uninterrupted run)")
    run.last_good_checkpoint = path
    publish_best(run)
    _record(run, info)
    if run.is_main:
        extra = f"; changed: {info.summary()}" if changed else ""
        print(f"resumed from {path} (epoch {run.state.epoch}, step {run.state.step_in_epoch}){extra}",
              flush=True)
    return info


def _whole_checkpoint(run) -> Path | None:
    """The newest whole checkpoint of the run; every damaged newer one is named in a warning (on
    rank 0) with what its loss costs. No whole one among several: one line, exit 2."""
    path, damaged = checkpoint.latest_whole(run.out)
    if damaged and path is None:
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged)
        raise UserError(f"no checkpoint in {checkpoint.checkpoint_dir(run.out)} can be resumed ({listed}); restore "
                        f"the files, or train.resume=never to start over")
    if run.is_main:
        for p, why in damaged:
            warnings.warn(f"skipping checkpoint {p}: {why}. Resuming from {path.name} instead: the training "
                          f"between the two is done again")
    return path


def _find_best_weights(run, path: Path) -> None:
    """The best weights the restored state names: in this run's checkpoints/, or beside the
    checkpoint resumed from (train.resume=PATH into another run directory, copied in). When they
    are gone, selection restarts rather than scoring weights the state does not describe."""
    epoch = run.state.best_epoch
    if epoch < 0:
        return
    mine, beside = best_file(run.out, epoch), path.parent / best_file(run.out, epoch).name
    if mine.is_file() or beside.is_file():   # decided before any copy: every rank agrees
        if run.is_main and not mine.is_file():
            checkpoint.save_weights(torch.load(beside, map_location="cpu", weights_only=True), mine)
        return
    warnings.warn(f"{path} names the weights of epoch {epoch} as its best, and they are gone "
                  f"(neither {mine} nor {beside} exists): model selection restarts from here")
    run.state.best_value, run.state.best_epoch, run.state.bad_epochs = float("nan"), -1, 0


def _apply_optimizer_changes(run, old_cfg: dict, old_world: int) -> None:
    """The restored optimizer holds the checkpoint's hyperparameters; apply accepted changes."""
    try:
        old = config_from_dict(old_cfg) if old_cfg else None
    except ValueError:  # a config from another version: leave the optimizer as restored
        old = None
    if old is None:
        return
    new_lrs = optim.group_lrs(run.cfg, run.accelerator.num_processes)
    old_lrs = optim.group_lrs(old, old_world)
    factors = {g: new_lrs[g] / old_lrs[g] for g in new_lrs if old_lrs[g] and new_lrs[g] != old_lrs[g]}
    if factors:
        optim.rescale_lrs(run.optimizer, run.scheduler, factors)
    for group in run.optimizer.param_groups:
        for key, value in (("momentum", run.cfg.optim.momentum), ("weight_decay", run.cfg.optim.weight_decay),
                           ("betas", tuple(run.cfg.optim.betas))):
            if key in group:
                group[key] = value


def _record(run, info: Resumed) -> None:
    if not run.is_main:
        return
    line = {"time": time.time(), "checkpoint": str(info.checkpoint), "changed": info.changed,
            "world_size": [info.old_world_size, run.accelerator.num_processes],
            "restarted_epoch": info.restarted_epoch}
    with open(run.out / RESUMES, "a") as f:
        f.write(json.dumps(line, default=str) + "\n")
