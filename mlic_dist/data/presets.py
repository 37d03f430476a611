"""Augmentation presets: the one table both loaders (and `data.augment`'s validation) read.

    from mlic_dist.data.presets import get_preset
    p = get_preset("RA")   # Preset(crop="rrc", flip=True, mixup=False, randaugment=True, cutout=False)

Training images go through, in this order (evaluation is always a squash resize, nothing else):
  crop        squash (resize the whole image to S x S, the seed repo's Resize((S, S))) or rrc
              (random-resized-crop with data.rrc_scale / data.rrc_ratio, then S x S)
  flip        horizontal, probability 0.5
  randaugment RandAugment (Cubuk et al. 2020): data.randaugment_ops operations per image at
              magnitude data.randaugment_magnitude of 31 bins, on the uint8 S x S image
              (torchvision `v2.RandAugment`; DALI `nvidia.dali.auto_aug.rand_augment`)
  cutout      one rectangle erased (RandomErasing's sampling: area fraction uniform in
              data.cutout_scale, aspect ratio log-uniform in CUTOUT_RATIO, fully inside the image)
              with probability data.cutout_p, filled with the normalisation mean, i.e. zero after
              normalisation, as in DeVries & Taylor's Cutout (torchvision `v2.RandomErasing`;
              DALI `fn.erase`)
  mixup       OR-mixup of two images of the batch on odd epochs (mixup.py), after normalisation

M0-M3 are the seed paper's presets (cumulative, as its author confirmed); RA and CO are the
ASL / ML-Decoder / query2labels training augmentations on top of M2 (those repos pair Cutout
with RandAugment on a squash resize; here each is its own preset so a sweep grid measures each).
Every random draw is seeded from (seed, epoch, rank) by the loaders, so an epoch replays exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

CUTOUT_RATIO = (0.3, 3.3)   # aspect-ratio range of the erased rectangle (torchvision's default)
RANDAUGMENT_BINS = 31       # magnitude bins (torchvision's and DALI's default)
RANDAUGMENT_FILL = 128      # pixels a rotation / shear / translation uncovers (DALI's default, ASL's)
TRANSLATE_REL = 150 / 331   # largest translation, fraction of the side (torchvision's; DALI's is 100/224)


@dataclass(frozen=True)
class Preset:
    name: str
    crop: str           # "squash" | "rrc"
    flip: bool
    mixup: bool         # OR-mixup on odd epochs
    randaugment: bool
    cutout: bool
    doc: str

    @property
    def per_image_extras(self) -> bool:
        """RandAugment or Cutout: per-image operations on the resized S x S uint8 image."""
        return self.randaugment or self.cutout


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("M0", "squash", False, False, False, False, "squash resize only"),
    Preset("M1", "squash", True, False, False, False, "squash + flip"),
    Preset("M2", "rrc", True, False, False, False, "random-resized-crop + flip"),
    Preset("M3", "rrc", True, True, False, False, "M2 + OR-mixup on every other epoch"),
    Preset("RA", "rrc", True, False, True, False, "M2 + RandAugment"),
    Preset("CO", "rrc", True, False, False, True, "M2 + Cutout"),
)}

NAMES: tuple[str, ...] = tuple(PRESETS)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"data.augment={name!r} is not valid; choose one of {list(NAMES)}")
    return PRESETS[name]


def describe() -> str:
    """'M0 = squash resize only; ...' (the data.augment docstring and the README row)."""
    return "; ".join(f"{p.name} = {p.doc}" for p in PRESETS.values()) + "."


def fill_value(normalize: str) -> list[int]:
    """Cutout's fill: the normalisation mean in 0-255, so the erased area is ~0 after normalising."""
    from .common import MEAN_STD

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
    import math

    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

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
