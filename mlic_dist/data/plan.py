"""The rank plan: which samples each rank reads in an epoch. Both loaders follow its counts and its
cut (evaluation: sample for sample; training: see below): a split of N samples in id order
(ids are written in shard order, so position == id) is cut into W contiguous ranges
[N*s//W, N*(s+1)//W) -- the same cut DALI's reader makes with shard_id=s, num_shards=W. Every rank
runs M = ceil(N/W) sample slots; a rank whose range holds M-1 samples fills the last slot with a
repeat (train) or a padding row with id -1 (eval).
- train: slot range s = (rank + epoch) % W (ranges rotate over epochs, as DALI does without
  stick_to_shard), batches = M // batch (the partial last batch is dropped: BatchNorm and
  equal step counts); shuffled within the range. The ranges are positions in the epoch's tar
  order (the torch loader: `shard_order`, the tars permuted per seed and epoch, the same on every
  rank, unless data.shard_shuffle=false; DALI: its reader's own `shuffle_after_epoch` permutation,
  one seed on every rank, so the two loaders read different samples per rank in training), so the
  order of the samples changes beyond the shuffle buffer from one epoch to the next; `segments`
  maps positions back to ids.
- eval: s = rank, batches = ceil(M / batch), every batch has `batch` rows, rows past the
  rank's samples have id -1 (so shapes are equal on every rank and all_gather works).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Sequence


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


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The order in which an epoch reads a split's tars: a permutation drawn from (seed, epoch),
    identical on every rank and in every replay of the epoch (exact resume); written order when
    `shuffle` is off (evaluation, data.shard_shuffle=false)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(mix_seed(seed, epoch, 11)).shuffle(order)
    return order


def segments(shards: Sequence, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Positions [lo, hi) of the concatenation of `shards` (manifest.ShardInfo, in the epoch's
    order) as (shard index in that list, first id, end id) runs, in reading order."""
    out, start = [], 0
    for k, shard in enumerate(shards):
        end = start + shard.num_samples
        a, b = max(lo, start), min(hi, end)
        if a < b:
            out.append((k, shard.first_id + a - start, shard.first_id + b - start))
        start = end
    return out


def mix_seed(*parts: int) -> int:
    """A 31-bit seed from (seed, epoch, rank, ...) (DALI wants a non-negative int32)."""
    h = 0x9E3779B1
    for p in parts:
        h = (h * 1000003 + int(p) + 0x7F4A7C15) % (2**61 - 1)
    return h % (2**31 - 1)
