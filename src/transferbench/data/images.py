"""Image checks shared by the split step and validation: exists, non-empty, decodes, big enough.

A missing, zero-byte, corrupt/truncated or too-small image is never
passed on silently; each gets a reason code that the caller quarantines or reports.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

# Reason codes, in the order they are checked.
MISSING = "missing_image"
EMPTY = "empty_file"
CORRUPT = "corrupt_image"
TOO_SMALL = "too_small"


@dataclass(frozen=True)
class ImageProbe:
    """What opening one image file found; ``reason`` is None when the image is usable."""

    reason: str | None
    detail: str = ""
    width: int | None = None
    height: int | None = None
    # md5 of the file's bytes: the manifests carry it, so their hash (the cache key, the data
    # version) changes when an image does, even under the same name.
    md5: str | None = None


def probe_image(path: str | Path, *, min_side: int) -> ImageProbe:
    """Fully decode ``path`` (a truncated file fails here, not at training time)."""
    path = Path(path)
    if not path.is_file():
        return ImageProbe(MISSING, f"no file at {path}")
    content = path.read_bytes()
    if not content:
        return ImageProbe(EMPTY, f"{path} is 0 bytes")
    md5 = hashlib.md5(content).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(content)) as image:
                image.load()
                width, height = image.size
    except Exception as exc:  # PIL raises many types for undecodable data
        return ImageProbe(CORRUPT, f"{path} does not decode as an image: {type(exc).__name__}: {exc}", md5=md5)
    if min(width, height) < min_side:
        return ImageProbe(TOO_SMALL, f"{path} is {width}x{height} px, smaller than min_image_side={min_side}",
                          width, height, md5)
    return ImageProbe(None, "", width, height, md5)
