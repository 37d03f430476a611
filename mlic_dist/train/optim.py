"""Optimizer, epoch schedule, the global-batch learning-rate rule and warmup.

Parameter groups: the backbone trains at `optim.lr`, the fully connected layers and the new head
at `optim.head_lr` (`MultiLabelNet.param_groups`). The global batch is
`data.batch_size_per_gpu x processes x train.grad_accum_steps`; the paper's recipe (0.01 / 0.1,
batch 16) declares the batch it was tuned for, `optim.base_batch_size: 16`. On 8 GPUs the same
config would train at 128, so a run whose global batch differs from the declared one does not
start until the user picks the rule (`optim.lr_scaling=ask`, the default, refuses in one line):
`linear` multiplies both learning rates by global / base batch (Goyal et al. 2017), best with
`optim.warmup_epochs`; `none` keeps them. The rule, its factor and the effective rates are
printed, written to metrics.json ("learning_rates") and tagged on the MLflow run
(`lr_rule(...)`). docs/training.md defends the policy.
"""
from __future__ import annotations

import contextlib

import torch

from ..config import ConfigError

GROUPS = ("backbone", "head")


def global_batch_size(cfg, num_processes: int) -> int:
    return cfg.data.batch_size_per_gpu * num_processes * cfg.train.grad_accum_steps


def lr_factor(cfg, num_processes: int) -> float:
    """What the global-batch rule multiplies both learning rates by (1 unless linear applies)."""
    base = cfg.optim.base_batch_size
    if cfg.optim.lr_scaling == "linear" and base > 0:
        return global_batch_size(cfg, num_processes) / base
    return 1.0


def group_lrs(cfg, num_processes: int) -> dict[str, float]:
    """The learning rate of each parameter group after the global-batch rule."""
    scale = lr_factor(cfg, num_processes)
    return {"backbone": cfg.optim.lr * scale, "head": cfg.optim.head_lr * scale}


def check_batch_policy(cfg, num_processes: int) -> None:
    """Refuse a run whose global batch differs from the one its learning rates were tuned for
    while the rule is unchosen (optim.lr_scaling=ask): one line naming both batches and the fix."""
    g, base = global_batch_size(cfg, num_processes), cfg.optim.base_batch_size
    if cfg.optim.lr_scaling != "ask" or base == 0 or g == base:
        return
    keep = base * cfg.data.batch_size_per_gpu // g if base * cfg.data.batch_size_per_gpu % g == 0 else None
    raise ConfigError(
        f"global batch {g} = data.batch_size_per_gpu {cfg.data.batch_size_per_gpu} x {num_processes} process(es) x "
        f"train.grad_accum_steps {cfg.train.grad_accum_steps}, but the learning rates (optim.lr {cfg.optim.lr:g}, "
        f"optim.head_lr {cfg.optim.head_lr:g}) were tuned for optim.base_batch_size={base}: choose "
        f"optim.lr_scaling=linear (both x {g / base:g}; with optim.warmup_epochs=1) or optim.lr_scaling=none "
        f"(keep them)" + (f", or data.batch_size_per_gpu={keep} to train at {base}" if keep else ""))


def lr_rule(cfg, num_processes: int) -> dict:
    """The global-batch rule as applied: recorded in metrics.json and on the MLflow run."""
    lrs = group_lrs(cfg, num_processes)
    return {"global_batch_size": global_batch_size(cfg, num_processes), "base_batch_size": cfg.optim.base_batch_size,
            "lr_scaling": cfg.optim.lr_scaling, "factor": lr_factor(cfg, num_processes),
            "lr": lrs["backbone"], "head_lr": lrs["head"], "warmup_epochs": cfg.optim.warmup_epochs}


def describe_batch(cfg, num_processes: int) -> str:
    g = global_batch_size(cfg, num_processes)
    lrs = group_lrs(cfg, num_processes)
    line = (f"global batch {g} = {cfg.data.batch_size_per_gpu} per process x {num_processes} "
            f"process(es) x {cfg.train.grad_accum_steps} accumulation step(s); lr backbone "
            f"{lrs['backbone']:.4g}, head {lrs['head']:.4g}")
    base = cfg.optim.base_batch_size
    if cfg.optim.lr_scaling == "linear" and base:
        line += f" (optim.lr_scaling=linear: x {g}/{base})"
    elif base and g != base:
        line += f" (optim.lr_scaling=none: not scaled from optim.base_batch_size={base})"
    if cfg.optim.warmup_epochs:
        line += f", warmup {cfg.optim.warmup_epochs:g} epoch(s)"
    return line


def build_optimizer(cfg, model, num_processes: int = 1) -> torch.optim.Optimizer:
    backbone, head = model.param_groups()
    lrs = group_lrs(cfg, num_processes)
    groups = [{"params": backbone, "lr": lrs["backbone"], "name": "backbone"},
              {"params": head, "lr": lrs["head"], "name": "head"}]
    # fused: one kernel per step on a GPU, and a step skipped on the device (found_inf) when the
    # gradients are not finite, with no host synchronisation (NonfiniteSteps)
    if cfg.optim.name == "sgd":
        return torch.optim.SGD(groups, lr=lrs["backbone"], momentum=cfg.optim.momentum,
                               weight_decay=cfg.optim.weight_decay, fused=True)
    return torch.optim.Adam(groups, lr=lrs["backbone"], betas=cfg.optim.betas,
                            weight_decay=cfg.optim.weight_decay, fused=True)


def step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """`optimizer.step()`, skipped on the device where `bad` (a 0-d bool tensor) is true: the
    fused kernels' `found_inf` (as torch's GradScaler drives them), so the host never waits for
    the decision. Fused SGD leaves a momentum buffer it creates on a skipped first step
    uninitialised: zero buffers are made first (with dampening 0 the first step then equals the
    usual buf = grad)."""
    inner = getattr(optimizer, "optimizer", optimizer)   # accelerate's AcceleratedOptimizer
    if isinstance(inner, torch.optim.SGD):
        for group in inner.param_groups:
            if group["momentum"]:
                for param in group["params"]:
                    state = inner.state[param]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    inner.grad_scale, inner.found_inf = None, bad.to(torch.float32).reshape(())
    try:
        optimizer.step()
    finally:
        del inner.grad_scale, inner.found_inf


class NonfiniteSteps:
    """Skipped (non-finite) optimizer steps counted on the device: `record(bad)` per step costs
    no host synchronisation; `read()` (logging steps, checkpoints, the epoch's end) returns
    (skipped since the last read, the longest run of consecutive skips since then, the run now)."""

    def __init__(self, device, run_before: int = 0):
        self.run = torch.full((), int(run_before), dtype=torch.int64, device=device)
        self.longest = self.run.clone()
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, bad: torch.Tensor) -> None:
        b = bad.to(torch.int64)
        self.run = (self.run + 1) * b
        self.longest = torch.maximum(self.longest, self.run)
        self.skipped = self.skipped + b

    def read(self) -> tuple[int, int, int]:
        skipped, longest, run = torch.stack([self.skipped, self.longest, self.run]).tolist()
        self.skipped = torch.zeros_like(self.skipped)
        self.longest = self.run.clone()
        return int(skipped), int(longest), int(run)


def build_scheduler(cfg, optimizer):
    """Epoch-level schedules, stepped after each epoch (the seed repo stepped at epoch start,
    which decays one epoch early on PyTorch >= 1.1)."""
    s = cfg.schedule
    if s.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=s.step_epochs, gamma=s.gamma)
    if s.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=s.plateau_factor,
                                                          patience=s.plateau_patience)
    return None


def rescale_lrs(optimizer, scheduler, factors: dict[str, float]) -> None:
    """Multiply each group's current and base learning rate (a resume that accepts a changed
    optim.lr / head_lr, or a changed global batch under lr_scaling=linear)."""
    for i, group in enumerate(optimizer.param_groups):
        f = factors.get(group.get("name", GROUPS[min(i, 1)]), 1.0)
        group["lr"] *= f
        if "initial_lr" in group:
            group["initial_lr"] *= f
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs[i] *= f
        if scheduler is not None:
            _scale_last_lr(scheduler, i, f)


def _scale_last_lr(scheduler, group: int, factor: float) -> None:
    """What `get_last_lr()` reports for `group`, scaled with it: torch's LRScheduler keeps it in
    the private `_last_lr` (checked against torch 2.11-2.14; tests/test_private_apis.py)."""
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr[group] *= factor


class Warmup:
    """Linear warmup over the first `optim.warmup_epochs` epochs, per optimizer step, on top of
    the epoch schedule: the scheduled rate is scaled only while the step runs, so the schedule
    (and its checkpointed state) never sees the warmup factor."""

    def __init__(self, warmup_epochs: float, steps_per_epoch: int):
        self.total_steps = int(round(warmup_epochs * steps_per_epoch))

    def factor(self, global_step: int) -> float:
        if global_step >= self.total_steps:
            return 1.0
        return (global_step + 1) / self.total_steps

    @contextlib.contextmanager
    def applied(self, optimizer, global_step: int):
        f = self.factor(global_step)
        if f == 1.0:
            yield
            return
        saved = [g["lr"] for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * f
        try:
            yield
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr
