"""Weight EMA (`train.ema_decay > 0`): an exponential moving average of the model's weights.

    ema = build_ema(model, decay=0.999, device)        # before accelerator.prepare(model)
    ...after every optimizer step that was applied:  ema.update_parameters(plain_model)
    evaluate ema.module beside the raw model; save / load ema.state_dict() with the checkpoint

torch's `AveragedModel` with `get_ema_multi_avg_fn(decay)` and `use_buffers=True` (BatchNorm's
running statistics are averaged too, as timm's ModelEmaV2 and ASL's ModelEma do):
    ema_0 = w_0 (the first update copies),  ema_t = decay * ema_{t-1} + (1 - decay) * w_t
Its memory is about 1 / (1 - decay) optimizer steps: ASL's 0.9997 suits ~640 steps an epoch
for 40 epochs; a run of a few hundred steps wants 0.99-0.999.

DDP: every rank applies the same all-reduced step to the same weights, so every rank's EMA
parameters are bit-identical (`check_in_sync`, at the end of training, proves it). BatchNorm's running
statistics are the exception: each rank updates them from its own batch (DDP re-broadcasts the
model's from rank 0 at the next forward, but the EMA is no DDP module), so `sync_buffers` copies
rank 0's EMA buffers to every rank before the EMA is evaluated or saved; rank 0's EMA is what a
checkpoint holds, and a resumed run continues it exactly.

The copy is made before `accelerator.prepare` wraps the model: Accelerate patches the prepared
module's forward with autocast, and a deep copy of that patch would call the original module.
Evaluate the EMA under `accelerator.autocast()` instead.
"""
from __future__ import annotations

import hashlib

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .distributed import gather


def build_ema(model: torch.nn.Module, decay: float, device) -> AveragedModel | None:
    """An EMA copy of `model` (a plain module, not yet prepared) on `device`; None when decay == 0."""
    if not decay:
        return None
    ema = AveragedModel(model, device=torch.device(device), multi_avg_fn=get_ema_multi_avg_fn(decay),
                        use_buffers=True)
    ema.requires_grad_(False)
    ema.eval()  # never trained: its BatchNorm layers use the averaged running statistics
    return ema


def sync_buffers(ema: AveragedModel | None, accelerator) -> None:
    """Rank 0's EMA buffers (BatchNorm statistics, n_averaged) on every rank (no-op alone)."""
    if ema is None or accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    for buf in ema.buffers():
        dist.broadcast(buf.data, src=0)


def digest(ema: AveragedModel) -> str:
    """A checksum of the EMA's floating-point state (parameters and BatchNorm buffers)."""

    h = hashlib.sha256()
    for name, t in ema.module.state_dict().items():
        if t.is_floating_point():
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_in_sync(ema: AveragedModel, accelerator) -> str:
    """Sync the buffers from rank 0, then the digest, which must be the same on every rank."""

    sync_buffers(ema, accelerator)
    digests = gather(accelerator, digest(ema))
    if len(set(digests)) != 1:
        raise RuntimeError(f"the weight EMA differs across ranks after training: {digests}")
    return digests[0]
