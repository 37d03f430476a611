"""What a loader yields: the `Batch`, and the shards' {1, 0, -1} labels as targets and a mask."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Batch:
    images: torch.Tensor   # (B, 3, S, S) float32, normalised, channels_last, on the device
    targets: torch.Tensor  # (B, C) float32 multi-hot
    mask: torch.Tensor     # (B, C) float32, 0 = ignore (do not train)
    ids: torch.Tensor      # (B,) int64 sample ids, -1 = padding (do not score)
    # (B,) int64 OR-mixup partner rows (mixup.mixup_pairs): row i holds images i and partner[i],
    # `ids` stays row i's own id; None when the batch is not mixed (distillation mixes the
    # teacher's targets with it, train/teacher.py)
    partner: Optional[torch.Tensor] = None


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
