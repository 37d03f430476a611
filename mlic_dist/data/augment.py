"""The augmentation presets' per-image operations (RandAugment, Cutout) for both loaders: torchvision
v2 on the CPU path, DALI graph operators on the DALI path. What each preset means is the table in
mlic_dist/config/choices.py.
"""
from __future__ import annotations

import math

from ..config.choices import CUTOUT_RATIO, MEAN_STD, RANDAUGMENT_BINS, RANDAUGMENT_FILL, TRANSLATE_REL, Preset


def fill_value(normalize: str) -> list[int]:
    """Cutout's fill: the normalisation mean in 0-255, so the erased area is ~0 after normalising."""
    return [int(round(m)) for m in MEAN_STD[normalize][0]]


def torch_extras(preset: Preset, data_cfg):
    """torchvision v2 transforms for RandAugment / Cutout on a (3, S, S) uint8 tensor, or None.
    They draw from torch's global RNG: callers seed it (per worker, or inside `fork_rng`)."""
    if not preset.per_image_extras:
        return None
    from torchvision.transforms import v2

    steps = []
    if preset.randaugment:
        steps.append(v2.RandAugment(num_ops=data_cfg.randaugment_ops, magnitude=data_cfg.randaugment_magnitude,
                                    num_magnitude_bins=RANDAUGMENT_BINS, fill=[RANDAUGMENT_FILL] * 3))
    if preset.cutout:
        steps.append(v2.RandomErasing(p=data_cfg.cutout_p, scale=tuple(data_cfg.cutout_scale),
                                      ratio=CUTOUT_RATIO, value=fill_value(data_cfg.normalize)))
    return v2.Compose(steps)


def dali_extras(images, preset: Preset, data_cfg, size: int):
    """The same operations in a DALI graph on (B, S, S, 3) uint8 HWC images (CPU or GPU); must be
    called inside a pipeline built with enable_conditionals=True (rand_augment needs it)."""

    from nvidia.dali import fn, math as dmath, types

    if preset.randaugment:
        from nvidia.dali.auto_aug import rand_augment

        images = rand_augment.rand_augment(images, n=data_cfg.randaugment_ops, m=data_cfg.randaugment_magnitude,
                                           num_magnitude_bins=RANDAUGMENT_BINS, shape=[size, size],
                                           max_translate_rel=TRANSLATE_REL, fill_value=RANDAUGMENT_FILL)
    if preset.cutout:
        # RandomErasing's draw in normalised units: area a, ratio r -> h = sqrt(a r), w = sqrt(a / r),
        # clamped to the image (torchvision redraws up to 10 times instead), anchor uniform so that
        # the rectangle lies inside; shape 0 = not applied (probability 1 - cutout_p).
        area = fn.random.uniform(range=list(data_cfg.cutout_scale))
        ratio = dmath.exp(fn.random.uniform(range=[math.log(CUTOUT_RATIO[0]), math.log(CUTOUT_RATIO[1])]))
        h = dmath.min(dmath.sqrt(area * ratio), 1.0)
        w = dmath.min(dmath.sqrt(area / ratio), 1.0)
        on = fn.cast(fn.random.coin_flip(probability=data_cfg.cutout_p), dtype=types.FLOAT)
        anchor = fn.stack(fn.random.uniform(range=[0.0, 1.0]) * (1.0 - h),
                          fn.random.uniform(range=[0.0, 1.0]) * (1.0 - w))
        images = fn.erase(images, anchor=anchor, shape=fn.stack(h * on, w * on), axis_names="HW",
                          normalized_anchor=True, normalized_shape=True,
                          fill_value=fill_value(data_cfg.normalize))
    return images
