"""What both loaders share: the Batch, label/mask conversion, normalisation, and the rank plan.

Rank plan (both loaders, so they agree sample for sample): a split of N samples in id order
(ids are written in shard order, so position == id) is cut into W contiguous ranges
[N*s//W, N*(s+1)//W) -- the same cut DALI's reader makes with shard_id=s, num_shards=W. Every rank
runs M = ceil(N/W) sample slots; a rank whose range holds M-1 samples fills the last slot with a
repeat (train) or a padding row with id -1 (eval).
- train: slot range s = (rank + epoch) % W (ranges rotate over epochs, as DALI does without
  stick_to_shard), batches = M // batch (the partial last batch is dropped: BatchNorm and
  equal step counts); shuffled within the range.
- eval: s = rank, batches = ceil(M / batch), every batch has `batch` rows, rows past the
  rank's samples have id -1 (so shapes are equal on every rank and all_gather works).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .presets import get_preset

# 0-255 scale: normalise uint8 pixels directly
MEAN_STD = {
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "half": ((0.5 * 255,) * 3, (0.5 * 255,) * 3),
}


@dataclass
class Batch:
    images: torch.Tensor   # (B, 3, S, S) float32, normalised, channels_last, on the device
    targets: torch.Tensor  # (B, C) float32 multi-hot
    mask: torch.Tensor     # (B, C) float32, 0 = ignore (do not train)
    ids: torch.Tensor      # (B,) int64 sample ids, -1 = padding (do not score)


def labels_to_targets(labels: torch.Tensor, difficult: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) int8 {1, 0, -1} -> targets, mask (B, C) float32.
    difficult="positive": -1 trains as a positive (target 1, mask 1; the seed repo's rule);
    difficult="ignore":   -1 is left out of the loss (target 0, mask 0)."""
    labels = labels.to(torch.int8)
    if difficult == "positive":
        targets = (labels != 0).float()
        mask = torch.ones_like(targets)
    else:
        targets = (labels == 1).float()
        mask = (labels != -1).float()
    return targets, mask


class BufferPool:
    """Reuses large CPU output buffers once nobody else holds them.

    A fresh 77 MB float batch (32 x 448 x 448 x 3) costs ~1 ms per image in page faults on CPU
    (glibc mmaps allocations > 32 MB and unmaps them on free); reusing a buffer the consumer has
    dropped costs nothing. "Dropped" = the storage's use count is back to the pool's own
    reference (torch._C._storage_Use_Count; without it, or on a GPU, every call allocates)."""

    def __init__(self, keep: int = 4):
        self.keep, self.buffers = keep, []
        self._count = getattr(torch._C, "_storage_Use_Count", None)

    def _free(self, buf: torch.Tensor) -> bool:
        # our list entry + the temporary storage object = 2 when no batch/view holds it
        return self._count(buf.untyped_storage()._cdata) <= 2

    def empty(self, shape, dtype) -> torch.Tensor:
        if self._count is None:
            return torch.empty(shape, dtype=dtype)
        for buf in self.buffers:
            if buf.shape == shape and buf.dtype == dtype and self._free(buf):
                return buf.view(shape)     # a view: it (and views of it) raise the use count
        buf = torch.empty(shape, dtype=dtype)
        if len(self.buffers) < self.keep:
            self.buffers.append(buf)
        return buf.view(shape)


class Normalizer:
    """uint8 images -> float32 (x - mean) / std, channels_last, on `device`.

    Accepts (B, H, W, 3) or (B, 3, H, W) uint8 on any device. The uint8 bytes are moved first
    (4x less traffic than float), then one converting copy into an NHWC float buffer and one
    fused multiply-add with per-row patterns: the innermost dim is W*3 long, so it vectorises
    (a (3,) broadcast over NHWC does not; `(x.float() - mean) / std` was 4-6x slower on CPU)."""

    def __init__(self, normalize: str, device):
        self.device = torch.device(device)
        mean, std = MEAN_STD[normalize]
        self.scale = 1.0 / torch.tensor(std, dtype=torch.float32)
        self.shift = -torch.tensor(mean, dtype=torch.float32) * self.scale
        self._patterns: dict = {}
        self.buffers = BufferPool() if self.device.type == "cpu" else None

    def _pattern(self, width: int):
        if width not in self._patterns:
            self._patterns[width] = (self.scale.repeat(width).to(self.device),
                                     self.shift.repeat(width).to(self.device))
        return self._patterns[width]

    def __call__(self, images: torch.Tensor, pool: "ThreadPoolExecutor | None" = None) -> torch.Tensor:
        if images.shape[-1] != 3:           # (B, 3, H, W) -> NHWC view
            images = images.permute(0, 2, 3, 1)
        b, h, w, _ = images.shape
        images = images.to(self.device, non_blocking=True)
        if self.buffers is not None:
            out = self.buffers.empty(torch.Size((b, h, w, 3)), torch.float32)
        else:
            out = torch.empty((b, h, w, 3), dtype=torch.float32, device=self.device)
        scale, shift = self._pattern(w)

        def run(j0, j1):
            out[j0:j1].copy_(images[j0:j1])
            rows = out[j0:j1].view((j1 - j0) * h, w * 3)
            torch.addcmul(shift, rows, scale, out=rows)

        if pool is None or self.device.type != "cpu":
            run(0, b)
        else:   # CPU: image chunks on single-threaded pool threads (no OpenMP barriers)
            step = max(1, math.ceil(b / getattr(pool, "_max_workers", 1)))
            list(pool.map(lambda j: run(j, min(b, j + step)), range(0, b, step)))
        return out.permute(0, 3, 1, 2)     # (B, 3, H, W) view, channels_last strides


def cpu_pool(threads: int) -> ThreadPoolExecutor:
    """Threads for per-image CPU work in the main process. Each runs torch single-threaded
    (torch.set_num_threads is per thread with OpenMP): parallelism comes from the pool, and no
    OpenMP barrier waits on a core that DALI's threads or the DataLoader workers hold."""
    return ThreadPoolExecutor(max_workers=threads, initializer=torch.set_num_threads, initargs=(1,),
                              thread_name_prefix="mlic-data")


@dataclass(frozen=True)
class RankPlan:
    num_samples: int      # N, the split
    world_size: int
    batch_size: int
    train: bool

    @property
    def slots(self) -> int:
        """M: sample slots per rank and epoch (equal on every rank)."""
        return math.ceil(self.num_samples / self.world_size)

    @property
    def num_batches(self) -> int:
        return self.slots // self.batch_size if self.train else math.ceil(self.slots / self.batch_size)

    def slot(self, rank: int, epoch: int) -> int:
        return (rank + epoch) % self.world_size if self.train else rank

    def id_range(self, slot: int) -> tuple[int, int]:
        n, w = self.num_samples, self.world_size
        return n * slot // w, n * (slot + 1) // w


def make_plan(split: str, num_samples: int, world_size: int, batch_size: int, train: bool) -> RankPlan:
    if num_samples < world_size:
        raise ValueError(f"split {split!r} has {num_samples} samples, fewer than world_size={world_size} "
                         f"ranks: every rank needs at least one sample; use fewer processes or more data")
    plan = RankPlan(num_samples, world_size, batch_size, train)
    if train and plan.num_batches == 0:
        raise ValueError(f"split {split!r} has {num_samples} samples = {plan.slots} per rank at world_size="
                         f"{world_size}, fewer than data.batch_size_per_gpu={batch_size}: no full batch; "
                         f"lower data.batch_size_per_gpu to at most {plan.slots}")
    return plan


def mix_seed(*parts: int) -> int:
    """A 31-bit seed from (seed, epoch, rank, ...) (DALI wants a non-negative int32)."""
    h = 0x9E3779B1
    for p in parts:
        h = (h * 1000003 + int(p) + 0x7F4A7C15) % (2**61 - 1)
    return h % (2**31 - 1)


def default_workers(num_workers: int) -> int:
    """data.num_workers, or the cores of this process divided among the local processes."""
    if num_workers > 0:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local))


class LoaderBase:
    """`len`, `num_samples`, `set_epoch` and the device-side finish shared by both loaders."""

    def __init__(self, data_cfg, manifest, split: str, *, train: bool, rank: int,
                 world_size: int, device, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in 0..world_size-1 (world_size={world_size})")
        self.info = manifest.split(split)
        batch = data_cfg.batch_size_per_gpu if train else data_cfg.eval_batch_size
        plan = make_plan(split, self.info.num_samples, world_size, batch, train)
        num_classes = manifest.num_classes
        self.cfg, self.split, self.plan = data_cfg, split, plan
        self.preset = get_preset(data_cfg.augment)
        self.train, self.rank, self.world_size = train, rank, world_size
        self.device = torch.device(device)
        self.seed, self.num_classes = seed, num_classes
        self.batch_size = plan.batch_size
        self.epoch = 0
        self.normalizer = Normalizer(data_cfg.normalize, self.device)
        self.pool = cpu_pool(default_workers(data_cfg.num_workers)) if self.device.type == "cpu" else None

    def __len__(self) -> int:
        return self.plan.num_batches

    @property
    def num_samples(self) -> int:
        return self.plan.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def mixup_active(self) -> bool:
        """M3 mixes on odd epochs (1, 3, 5, ...), training only."""
        return self.train and self.preset.mixup and self.epoch % 2 == 1

    def _epoch_range(self) -> tuple[int, int]:
        return self.plan.id_range(self.plan.slot(self.rank, self.epoch))

    def _finish(self, images_u8: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                mix_gen: torch.Generator) -> Batch:
        from .mixup import mixup_pairs, or_mixup

        images = self.normalizer(images_u8, self.pool)
        targets, mask = labels_to_targets(labels.reshape(len(ids), -1), self.cfg.difficult)
        targets = targets.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        ids = ids.reshape(-1).to(torch.int64).to(self.device, non_blocking=True)
        if self.mixup_active and len(ids) > 1:
            images, targets, mask = or_mixup(images, targets, mask, mixup_pairs(len(ids), mix_gen))
        return Batch(images, targets, mask, ids)
