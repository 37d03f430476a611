"""`LoaderBase`: what both loaders (dali.py, torch_loader.py) share: the rank plan, the epoch,
the preset, and the device-side finish of a batch (normalise, targets and mask, OR-mixup)."""
from __future__ import annotations

import torch

from ..config.choices import get_preset
from ..resources import cores_per_process
from .batch import Batch, labels_to_targets
from .mixup import mixup_pairs, or_mixup
from .normalize import Normalizer, cpu_pool
from .plan import make_plan, shard_order


def default_workers(num_workers: int) -> int:
    """data.num_workers, or this process's share of the cores (mlic_dist/resources.py)."""
    return num_workers if num_workers > 0 else cores_per_process()


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

    def state_dict(self) -> dict:
        """What a checkpoint must keep to replay the current epoch exactly, beyond (seed, epoch,
        rank): nothing here (the torch loader); DALI's reader state for the DALI loader."""
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        pass

    def close(self) -> None:
        """Release what the loader holds between epochs (DALI: its pipeline and threads)."""

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
        """This rank's positions in the epoch's tar order (`_epoch_shards`)."""
        return self.plan.id_range(self.plan.slot(self.rank, self.epoch))

    def _epoch_shards(self) -> list:
        """The split's tars (manifest.ShardInfo) in the order this epoch reads them (plan.py)."""
        order = shard_order(len(self.info.shards), self.seed, self.epoch, self.train and self.cfg.shard_shuffle)
        return [self.info.shards[k] for k in order]

    def _finish(self, images_u8: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                mix_gen: torch.Generator) -> Batch:
        images = self.normalizer(images_u8, self.pool)
        targets, mask = labels_to_targets(labels.reshape(len(ids), -1), self.cfg.difficult)
        targets = targets.to(self.device, non_blocking=True)
        mask = mask.to(self.device, non_blocking=True)
        ids = ids.reshape(-1).to(torch.int64).to(self.device, non_blocking=True)
        partner = None
        if self.mixup_active and len(ids) > 1:
            partner = mixup_pairs(len(ids), mix_gen).to(self.device)
            images, targets, mask = or_mixup(images, targets, mask, partner)
        return Batch(images, targets, mask, ids, partner)
