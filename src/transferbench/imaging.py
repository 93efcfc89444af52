"""The one way an image file becomes pixels: the split's probe (``data.images``), the training cache and the
served model (``engine.data.load_rgb``) all decode with ``decode_rgb``, so an image that passes the split also
loads in training, with the same pixels. Depends on PIL alone (a bottom layer: data and engine import it)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps

HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "F")  # 16-bit and float images, rescaled to 8 bit by their maximum


def _open(source: str | Path | BinaryIO) -> Image.Image:
    """``Image.open`` that refuses an image of more than ``Image.MAX_IMAGE_PIXELS`` pixels before decoding it:
    PIL only warns up to twice that; here both raise ``Image.DecompressionBombError``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(source)
        except Image.DecompressionBombWarning as exc:  # Image.open has closed the file it opened
            raise Image.DecompressionBombError(str(exc)) from None


def decode_rgb(source: str | Path | BinaryIO | Image.Image) -> Image.Image:
    """An image (a file, an open binary stream or a decoded image) as RGB at full size: turned upright by
    its EXIF orientation, 16-bit and float images rescaled to 8 bit by their maximum, then converted to RGB
    (grayscale repeated, CMYK and palette converted, alpha dropped).

    Raises ``Image.DecompressionBombError`` for a decompression bomb (before decoding it), and what PIL
    raises for a file it cannot decode (``OSError`` mostly)."""
    with source if isinstance(source, Image.Image) else _open(source) as image:
        ImageOps.exif_transpose(image, in_place=True)
        if image.mode in HIGH_DEPTH_MODES:
            peak = max(image.getextrema()[1], 1)
            image = image.point(lambda v: v * (255.0 / peak)).convert("L")
        elif image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # the RGB that convert("RGB") gives, without PIL's warning about it
        return image.convert("RGB")
