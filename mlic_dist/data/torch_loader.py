"""Pure-PyTorch loader: webdataset tars -> torchvision decode + transforms v2 -> DataLoader workers.

Same rank plan as DALI (see plan.py): rank r reads the contiguous range of its slot in the
epoch's tar order, so both loaders give every rank the same batch count whatever the shard count,
and in evaluation the same samples per rank (in training DALI orders the tars itself). Within a rank, the batches are dealt to the K DataLoader workers in
contiguous runs (worker k: batches [nb*k//K, nb*(k+1)//K)), so each worker yields only full
batches (bar the very last of an eval epoch) and `len(loader)` is exact. Splitting by sample id
range, not by shard, means a split with fewer shards than ranks x workers still works: each
worker opens only the shards overlapping its range (ids are in shard order, so it skips the
head of its first shard without decoding and stops at the end of its range); more shards than
readers costs nothing extra.

Bad data: a sample that cannot be read or decoded becomes a `ShardDataError` naming the tar and
the sample key (and a truncated tar says so, with its size). A worker does not raise it -- the
DataLoader would re-raise it wrapped in the worker's traceback text -- it yields the exception as
its last item, and the main process stops the workers and raises it as one line.

Determinism: the worker's shuffle buffer and torch RNG (transforms v2) are seeded from
(seed, epoch, rank, worker); the DataLoader takes batches from workers round-robin, so for a
fixed data.num_workers an epoch replays identically.
"""
from __future__ import annotations

import random
import tarfile

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config.choices import get_preset
from .augment import torch_extras
from .base import LoaderBase, default_workers
from .integrity import REQUIRED_EXTS, ShardDataError, decoder_reason, sample_error, shard_size_error, size_problem
from .plan import mix_seed, segments
from .transforms import EvalTransform


def _identity(urls):
    return urls


def _worker_init(_):
    torch.set_num_threads(1)


def _transform(train: bool, data_cfg):
    """The preset's per-image steps (data/augment.py) on a (3, H, W) uint8 image -> (3, S, S) uint8."""
    from torchvision.transforms import v2

    preset, size = get_preset(data_cfg.augment), data_cfg.size
    if not train:
        return EvalTransform(size)   # the one evaluation transform (predict uses it too)
    if preset.crop == "rrc":
        # mostly upsampling (500 px photos -> 448 crops): no antialias (faster, same result)
        steps = [v2.RandomResizedCrop((size, size), scale=tuple(data_cfg.rrc_scale),
                                      ratio=tuple(data_cfg.rrc_ratio), antialias=False)]
    else:
        steps = [v2.Resize((size, size), antialias=True)]   # squash, like the seed's Resize((S, S))
    if preset.flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    extras = torch_extras(preset, data_cfg)   # RandAugment / Cutout
    if extras is not None:
        steps.append(extras)
    return v2.Compose(steps)


class _RankStream(IterableDataset):
    """Yields (images (B, S, S, 3) uint8, labels (B, C) int8, ids (B,) int64) for one rank."""

    def __init__(self, shards, plan, lo: int, hi: int, train: bool, transform, shuffle_buffer: int,
                 seed: int, epoch: int, rank: int):
        self.shards, self.plan, self.lo, self.hi = shards, plan, lo, hi
        self.train, self.transform, self.shuffle_buffer = train, transform, shuffle_buffer
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def _raw(self, pos_lo: int, pos_hi: int):
        """(jpeg bytes, label bytes, id, key, tar) for positions [pos_lo, pos_hi) of the epoch's
        tar order (`self.shards`), each tar read in id order."""
        for k, id_lo, id_hi in segments(self.shards, pos_lo, pos_hi):
            yield from self._read(self.shards[k], id_lo, id_hi)

    def _read(self, shard, id_lo: int, id_hi: int):
        """The samples with ids in [id_lo, id_hi) of one tar, in id order."""
        import webdataset as wds

        url, last = str(shard.path), shard.first_id - 1
        ds = wds.WebDataset([url], shardshuffle=False, nodesplitter=_identity, workersplitter=_identity,
                            empty_check=False)
        try:
            for sample in ds:
                key = sample.get("__key__")
                missing = [e for e in REQUIRED_EXTS if e not in sample]
                if missing:   # a cut-off last sample: say the file is short, if it is
                    problem = size_problem(shard)
                    if problem:
                        raise shard_size_error(shard, problem)
                    raise sample_error(url, key, None, "lacks " + ", ".join(f".{e}" for e in missing))
                sid = int.from_bytes(sample["id"], "little", signed=True)
                if sid <= last:
                    raise ShardDataError(f"{url}: sample {key!r} has id {sid} after {last}; shards must "
                                         f"hold ids in written order (contracts.md); re-run mlic_dist.shard")
                last = sid
                if sid < id_lo:
                    continue
                if sid >= id_hi:
                    return
                yield sample["jpg"], sample["lbl"], sid, key, url
        except (tarfile.TarError, OSError, EOFError) as e:   # webdataset re-raises tarfile's errors
            raise shard_size_error(shard, size_problem(shard) or f"cannot be read ({e})") from None
        if last + 1 < id_hi:   # the tar ended early: cut at a sample boundary
            problem = size_problem(shard)
            if problem:
                raise shard_size_error(shard, problem)
            raise ShardDataError(f"ids {max(last + 1, id_lo)}..{id_hi - 1} are not in {url} as manifest.json "
                                 f"says; re-run mlic_dist.shard")

    def _shuffled(self, items, rng: random.Random):
        buf = []
        for item in items:
            buf.append(item)
            if len(buf) >= self.shuffle_buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _decode(self, jpeg: bytes, sid: int, key: str, url: str) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            img = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as e:   # libjpeg's message names no sample
            raise sample_error(url, key, sid, f"cannot be decoded as a JPEG ({decoder_reason(e)})") from None
        return self.transform(img).permute(1, 2, 0)      # (S, S, 3) view

    def __iter__(self):
        try:
            yield from self._batches()
        except ShardDataError as e:
            yield e      # raised by TorchLoader in the main process, as one line

    def _batches(self):
        info = get_worker_info()
        k, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        nb, bsz = self.plan.num_batches, self.plan.batch_size
        p0, p1 = nb * k // nw * bsz, nb * (k + 1) // nw * bsz   # this worker's slot positions
        real = self.hi - self.lo
        torch.manual_seed(mix_seed(self.seed, self.epoch, self.rank, k, 4))
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, k, 5))
        items = self._raw(self.lo + p0, self.lo + min(p1, real))
        if self.train:
            items = self._shuffled(items, rng)
        images, labels, ids, seen, last_row = [], [], [], [], None
        for pos in range(p0, p1):
            if pos < real:
                try:
                    jpeg, lbl, sid, key, url = next(items)
                except StopIteration:
                    raise ShardDataError(f"the samples at positions {self.lo + p0}..{self.lo + min(p1, real) - 1} "
                                         f"are not all in the shards listed in manifest.json; re-run "
                                         f"mlic_dist.shard") from None
                if self.train and len(seen) < 8:
                    seen.append((jpeg, lbl, sid, key, url))
                img = self._decode(jpeg, sid, key, url)
            elif self.train:   # this rank has M-1 samples: repeat one (fresh augmentation)
                jpeg, lbl, sid, key, url = seen[(pos - real) % len(seen)] if seen else self._one(self.lo)
                img = self._decode(jpeg, sid, key, url)
            else:              # eval padding: a copy of the rank's last row, id -1
                if last_row is None:
                    jpeg, lbl, psid, key, url = self._one(self.lo + real - 1)
                    last_row = (self._decode(jpeg, psid, key, url), lbl)
                img, lbl = last_row
                sid = -1
            images.append(img); labels.append(lbl); ids.append(sid)
            last_row = (img, lbl)
            if len(images) == bsz:
                yield self._collate(images, labels, ids)
                images, labels, ids = [], [], []
        if images:
            yield self._collate(images, labels, ids)

    def _one(self, pos: int):
        return next(iter(self._raw(pos, pos + 1)))

    @staticmethod
    def _collate(images, labels, ids):
        lbl = torch.frombuffer(bytearray(b"".join(labels)), dtype=torch.int8).view(len(ids), -1)
        return torch.stack(images), lbl, torch.tensor(ids, dtype=torch.int64)


class TorchLoader(LoaderBase):
    def __init__(self, data_cfg, manifest, split, *, train, rank, world_size, device, seed):
        super().__init__(data_cfg, manifest, split, train=train, rank=rank, world_size=world_size,
                         device=device, seed=seed)
        self.num_workers = default_workers(data_cfg.num_workers)
        self.transform = _transform(train, data_cfg)

    def __iter__(self):
        lo, hi = self._epoch_range()
        stream = _RankStream(self._epoch_shards(), self.plan, lo, hi, self.train, self.transform,
                             max(1, self.cfg.shuffle_buffer), self.seed, self.epoch, self.rank)
        workers = min(self.num_workers, len(self))
        # Its own generator: DataLoader otherwise draws its base seed from the global torch RNG at
        # every iter(), which shifts dropout after a mid-epoch resume (workers seed themselves).
        dl = DataLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=_worker_init,
                        pin_memory=self.device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if workers else None,
                        generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank, 6)))
        mix_gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, self.rank, 3))
        count, error, batches = 0, None, iter(dl)
        for item in batches:
            if isinstance(item, ShardDataError):   # a worker's last item (see the module docstring)
                error = item
                break
            count += 1
            yield self._finish(*item, mix_gen)
        if error is not None:
            del batches  # stop the workers now, before the error travels up with this frame
            raise error
        if count != len(self):
            raise RuntimeError(f"torch loader yielded {count} batches for split {self.split!r}, expected "
                               f"{len(self)}: the shards do not match manifest.json; re-run mlic_dist.shard")
