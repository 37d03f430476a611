"""uint8 images -> normalised float32 on the device (`Normalizer`), with the CPU helpers that keep
it fast: reused output buffers (`BufferPool`) and single-threaded pool threads (`cpu_pool`).
The mean and std of each `data.normalize` choice: mlic_dist/config/choices.py."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from ..config.choices import MEAN_STD


def storage_use_count(tensor: torch.Tensor) -> "int | None":
    """How many references hold `tensor`'s storage (None where torch does not say): torch's
    private `torch._C._storage_Use_Count(storage._cdata)`, checked against torch 2.11-2.14
    (tests/test_private_apis.py fails when it stops counting views)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(tensor.untyped_storage()._cdata)


class BufferPool:
    """Reuses large CPU output buffers once nobody else holds them.

    A fresh 77 MB float batch (32 x 448 x 448 x 3) costs ~1 ms per image in page faults on CPU
    (glibc mmaps allocations > 32 MB and unmaps them on free); reusing a buffer the consumer has
    dropped costs nothing. "Dropped" = the storage's use count is back to the pool's own
    reference (torch._C._storage_Use_Count; without it, or on a GPU, every call allocates)."""

    def __init__(self, keep: int = 4):
        self.keep, self.buffers = keep, []
        self.reuse = storage_use_count(torch.empty(0)) is not None

    def _free(self, buf: torch.Tensor) -> bool:
        # our list entry + the temporary storage object = 2 when no batch/view holds it
        return storage_use_count(buf) <= 2

    def empty(self, shape, dtype) -> torch.Tensor:
        if not self.reuse:
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
            step = max(1, math.ceil(b / getattr(pool, "threads", 1)))
            list(pool.map(lambda j: run(j, min(b, j + step)), range(0, b, step)))
        return out.permute(0, 3, 1, 2)     # (B, 3, H, W) view, channels_last strides


class CpuPool(ThreadPoolExecutor):
    """A thread pool that says how many threads it has (`threads`)."""

    def __init__(self, threads: int, **kwargs):
        super().__init__(max_workers=threads, **kwargs)
        self.threads = threads


def cpu_pool(threads: int) -> CpuPool:
    """Threads for per-image CPU work in the main process. Each runs torch single-threaded
    (torch.set_num_threads is per thread with OpenMP): parallelism comes from the pool, and no
    OpenMP barrier waits on a core that DALI's threads or the DataLoader workers hold."""
    return CpuPool(threads, initializer=torch.set_num_threads, initargs=(1,), thread_name_prefix="mlic-data")
