"""The named choices config values pick from: the augmentation presets (`data.augment`), the
normalisations (`data.normalize`) and the losses (`loss.name`). Tables only: the config validates
against them, the loaders (mlic_dist/data/augment.py, normalize.py) and mlic_dist/losses.py
implement them.

    from mlic_dist.config.choices import get_preset
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
  mixup       OR-mixup of two images of the batch on odd epochs (data/mixup.py), after normalisation

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

NAMES: tuple[str, ...] = tuple(PRESETS)   # data.augment


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"data.augment={name!r} is not valid; choose one of {list(NAMES)}")
    return PRESETS[name]


def describe() -> str:
    """'M0 = squash resize only; ...' (the data.augment docstring and the README row)."""
    return "; ".join(f"{p.name} = {p.doc}" for p in PRESETS.values()) + "."


# data.normalize -> (mean, std) per RGB channel on the 0-255 scale (uint8 pixels are normalised directly)
MEAN_STD = {
    "imagenet": ((0.485 * 255, 0.456 * 255, 0.406 * 255), (0.229 * 255, 0.224 * 255, 0.225 * 255)),
    "half": ((0.5 * 255,) * 3, (0.5 * 255,) * 3),
    "clip": ((0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255),      # OpenAI CLIP's image towers
             (0.26862954 * 255, 0.26130258 * 255, 0.27577711 * 255)),
    "unit": ((0.0,) * 3, (255.0,) * 3),                                  # pixels in 0..1 (TResNet)
}

LOSSES = ("bce", "asl", "focal")   # loss.name (mlic_dist/losses.py)
