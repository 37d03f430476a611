"""Training and evaluation batches from the shards, for every rank.

    from mlic_dist.data import build_loader
    loader = build_loader(cfg.data, "train", train=True, rank=0, world_size=1, device="cpu", seed=0)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:   # Batch(images (B,3,S,S) f32 channels_last, targets, mask, ids)
            ...

`data.loader=dali` (default) or `torch`; both follow docs/contracts.md and the rank plan in
plan.py. Benchmark: `python bench/loader.py --loader dali|torch|baseline`.
"""
from __future__ import annotations

from .integrity import ShardDataError
from .manifest import Manifest, SplitInfo, read_manifest

# torch-free on import (the shard workers read data/integrity.py); the loaders import torch
__all__ = ["Manifest", "ShardDataError", "SplitInfo", "build_loader", "read_manifest"]


def build_loader(data_cfg, split: str, *, train: bool, rank: int = 0, world_size: int = 1,
                 device="cpu", seed: int = 0):
    """A loader for `split` on this rank: len() (equal on every rank), num_samples, set_epoch(),
    iteration yields `Batch`. Raises ValueError before training when the split cannot be
    divided (fewer samples than ranks, no full training batch per rank), ShardDataError (one
    line: file, sample key, fix) when a shard is truncated here or while iterating, or holds a
    sample that cannot be decoded."""
    manifest = read_manifest(data_cfg.shards)
    if data_cfg.loader == "dali":
        from .dali import DaliLoader as cls
    elif data_cfg.loader == "torch":
        from .torch_loader import TorchLoader as cls
    else:
        raise ValueError(f"data.loader={data_cfg.loader!r} is not valid; use dali or torch")
    return cls(data_cfg, manifest, split, train=train, rank=rank, world_size=world_size,
               device=device, seed=seed)
