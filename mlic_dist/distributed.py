"""What DDP ranks need to agree on: the plain module under the wrappers, and proof that every
rank holds the same weights. Functions take an Accelerate `Accelerator` (or any object with its
`unwrap_model`, `num_processes`)."""
from __future__ import annotations

import hashlib

import torch


def unwrap(accelerator, model) -> torch.nn.Module:
    """The plain module under DDP and torch.compile, whatever their order: checkpoints have the
    same keys for 1 or N processes, compiled or not. (Accelerate looks for a compiled model only
    above DDP; `compile` then `prepare` puts it below, so `_orig_mod` is stripped here too.)"""
    try:
        m = accelerator.unwrap_model(model, keep_torch_compile=False)
    except TypeError:  # older accelerate
        m = accelerator.unwrap_model(model)
    while hasattr(m, "_orig_mod"):
        m = m._orig_mod
    return m


def param_digest(model) -> str:
    """A checksum of the parameters (DDP ranks must agree bit for bit)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def gather(accelerator, obj) -> list:
    """`obj` from every rank, in rank order (a one-element list in a single process)."""
    if accelerator.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def check_ranks_in_sync(accelerator, model) -> str:
    """The parameters' digest; raises if the ranks' parameters diverged (a DDP bug shows here first)."""
    digests = gather(accelerator, param_digest(unwrap(accelerator, model)))
    if len(set(digests)) != 1:
        raise RuntimeError(f"parameters differ across ranks after training: {digests}")
    return digests[0]
