"""Distinct real-photo JPEGs for benchmarks, made offline from scikit-image's bundled photos.

    from bench.photos import make_photo_jpegs     # or: sys.path.insert(0, "bench"); import photos
    paths = make_photo_jpegs("/tmp/photos", 500)   # 500 files, 500x375 px, ~quality 90

Synthetic noise or flat colour compresses and decodes unlike real photos, which would make
decode/encode throughput numbers meaningless; so every image is a random crop (random scale and
position), optionally mirrored, of a real photo, with half of them a 2x2 tile of four such crops
(more high-frequency content, like a busy scene), plus a small brightness jitter. Deterministic for
a given seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# bundled with scikit-image (no download); colour photos only, grayscale ones get colourised
_COLOUR = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
           "immunohistochemistry", "retina")
_GRAY = ("camera", "coins", "moon", "grass", "gravel", "brick")


def _sources() -> list[Image.Image]:
    import skimage.data

    out = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in _COLOUR]
    for i, n in enumerate(_GRAY):  # tint so they are not trivially gray
        g = Image.fromarray(getattr(skimage.data, n)()).convert("L")
        tint = [(255, 220, 180), (180, 220, 255), (220, 255, 200)][i % 3]
        out.append(Image.merge("RGB", [g.point(lambda v, t=t: v * t // 255) for t in tint]))
    return out


def _crop(src: Image.Image, size, rng) -> Image.Image:
    w, h = size
    sw, sh = src.size
    aspect = w / h
    scale = rng.uniform(0.45, 1.0)  # share of the largest crop of the target aspect ratio
    cw = int(min(sw, sh * aspect) * scale)
    ch = max(8, int(cw / aspect))
    x0, y0 = rng.integers(0, sw - cw + 1), rng.integers(0, sh - ch + 1)
    im = src.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return im


def make_photo(rng, size=(500, 375), sources=None) -> Image.Image:
    sources = sources or _sources()
    w, h = size
    if rng.random() < 0.5:
        im = _crop(sources[rng.integers(len(sources))], size, rng)
    else:
        im = Image.new("RGB", size)
        for i, (x, y) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
            tw, th = (w - w // 2 if x else w // 2), (h - h // 2 if y else h // 2)
            im.paste(_crop(sources[rng.integers(len(sources))], (tw, th), rng), (x, y))
    gain = rng.uniform(0.85, 1.15)
    return im.point(lambda v: min(255, int(v * gain)))


def make_photo_jpegs(out_dir, n: int, size=(500, 375), seed: int = 0,
                     quality: int = 90) -> list[Path]:
    """Write n distinct photo JPEGs (size = (width, height)) to out_dir/photo_NNNNNN.jpg."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = _sources()
    paths = []
    for i in range(n):
        p = out_dir / f"photo_{i:06d}.jpg"
        make_photo(rng, size, sources).save(p, "JPEG", quality=quality)
        paths.append(p)
    return paths
