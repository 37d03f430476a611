"""OR-mixup (augmentation preset M3): average two images of the batch, OR their labels.

Runs in torch on the batch's device (the GPU when there is one), after normalisation
(normalisation is affine, so the mean of normalised images is the normalised mean image).

Pairing: a random permutation `order` of the batch; sample order[k] is mixed with order[k+1]
(cyclic), so no sample is mixed with itself when B > 1 and every sample is used twice.

Label rule, per class, for the pair (i, j):
    positive in either (target 1, mask 1)          -> target 1, mask 1 (the object is in the image)
    else ignore in either (mask 0)                 -> target 0, mask 0 (it may be in the image)
    else (negative in both)                        -> target 0, mask 1
i.e. targets = max(t_i, t_j), mask = max(targets, m_i * m_j). With data.difficult=positive an
ignore label is already (target 1, mask 1) and so is OR-ed like a positive.
"""
from __future__ import annotations

import torch


def mixup_pairs(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) int64 partner index for every row (CPU)."""
    order = torch.randperm(batch_size, generator=generator)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def or_mixup(images: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
             partner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (B, 3, S, S) float, targets/mask (B, C) float; partner (B,) from `mixup_pairs`.
    Returns new (images, targets, mask); images stay channels_last."""
    partner = partner.to(images.device)
    mixed = (images + images.index_select(0, partner)).mul_(0.5)
    mixed = mixed.contiguous(memory_format=torch.channels_last)
    t = torch.maximum(targets, targets.index_select(0, partner))
    m = torch.maximum(t, mask * mask.index_select(0, partner))
    return mixed, t, m
