"""One decode rule for every image this package reads: the shard writer (before encoding a
sample), predict, the exported model's docs and the MLflow server all see the same pixels.

    im = decode(data)        # encoded bytes (any format PIL reads) -> upright 8-bit RGB PIL image
    im = to_rgb(opened)      # an opened PIL image -> the same

Upright: the EXIF orientation is applied. 8-bit RGB: transparency is flattened onto white (as a
browser shows it), 16-bit is scaled down, grayscale / CMYK / palette are converted.
"""
from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError


def to_rgb(im: Image.Image) -> Image.Image:
    """A decoded image upright (EXIF orientation applied) in 8-bit RGB."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")  # flatten transparency onto white, like a browser would
        im = Image.new("RGB", rgba.size, (255, 255, 255))
        im.paste(rgba, mask=rgba.getchannel("A"))
    elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L").convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    return im


def decode(data: bytes) -> Image.Image:
    """Encoded image bytes -> an upright 8-bit RGB image, fully decoded (a truncated file fails
    here, not later). Raises ValueError naming what is wrong when the bytes are not an image."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return to_rgb(im)
    except UnidentifiedImageError:
        raise ValueError("not a recognised image format") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        raise ValueError(f"cannot decode image: {type(e).__name__}: {e}"[:300]) from None
