"""The evaluation transform: how an image becomes a model input when a model is scored or used.

One definition, used by the torch loader's eval path, the DALI loader's CPU resize and
`mlic_dist.predict`, so training-time evaluation and prediction cannot drift apart:

    from mlic_dist.data.transforms import load_rgb, eval_resize
    img = load_rgb(Path("photo.png").read_bytes())   # (3, H, W) uint8 RGB, upright
    img = eval_resize(img, size)                      # (3, S, S) uint8: squash, bilinear, antialias
    x = Normalizer(cfg.data.normalize, device)(img[None])   # (1, 3, S, S) float32 (data/normalize.py)

- `load_rgb` converts like `python -m mlic_dist.shard` does (`mlic_dist.images`: EXIF
  rotation applied, transparency flattened onto white, grayscale / CMYK / palette / 16-bit to
  8-bit RGB), so a PNG or a rotated phone photo given to `predict` looks like its shard copy.
- `eval_resize` squashes to S x S (no crop, no aspect ratio kept: the seed's `Resize((S, S))`)
  with bilinear interpolation and antialiasing on uint8, writing straight into `out` when given
  (the DALI CPU path resizes into its batch buffer). DALI on a GPU resizes inside its graph with
  `fn.resize` (linear, antialiased): the same filter, NVIDIA's kernel.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..images import decode


def squash_resize(images: torch.Tensor, size: int, antialias: bool = True,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (3, H, W) or (B, 3, H, W) -> (..., 3, S, S), bilinear (antialiased when asked).

    With `out` (a (1, 3, S, S) view, e.g. of a batch buffer) the kernel writes there directly:
    0.28 ms per 448 px image against 1.18 ms through F.interpolate, whose fresh output costs
    page faults and a copy (measured on this project's 2-core machine)."""
    batched = images.dim() == 4
    src = images if batched else images.unsqueeze(0)
    if out is None:
        out = torch.empty((src.shape[0], src.shape[1], size, size), dtype=src.dtype, device=src.device)
    try:
        _bilinear_into(src, size, antialias, out)
    except (AttributeError, RuntimeError, TypeError):  # a torch without these ops' out= form
        out.copy_(F.interpolate(src, size=(size, size), mode="bilinear", antialias=antialias,
                                align_corners=False))
    return out if batched else out[0]


def _bilinear_into(src: torch.Tensor, size: int, antialias: bool, out: torch.Tensor) -> None:
    """F.interpolate's bilinear kernel writing into `out`: aten's `_upsample_bilinear2d_aa` /
    `upsample_bilinear2d` out= overloads under the private `torch._C._nn`, checked against torch
    2.11-2.14 (tests/test_private_apis.py checks they equal F.interpolate bit for bit)."""
    op = torch._C._nn._upsample_bilinear2d_aa if antialias else torch._C._nn.upsample_bilinear2d
    op(src, (size, size), False, None, None, out=out)


def eval_resize(images: torch.Tensor, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """THE evaluation resize: squash to size x size, bilinear, antialiased, uint8 in and out."""
    return squash_resize(images, size, antialias=True, out=out)


class EvalTransform:
    """Callable (3, H, W) uint8 -> (3, S, S) uint8 for the torch loader's eval path (picklable
    for DataLoader workers)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return eval_resize(image, self.size)


def load_rgb(data: bytes) -> torch.Tensor:
    """Encoded image bytes (any format PIL reads) -> (3, H, W) uint8 RGB, upright
    (mlic_dist/images.py's rule). Raises ValueError naming what is wrong when the bytes are not a
    readable image."""
    return torch.from_numpy(np.asarray(decode(data), dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
