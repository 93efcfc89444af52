"""Image checks shared by the split step and validation: exists, non-empty, not a decompression bomb,
decodes, big enough.

``probe_image`` decodes with ``imaging.decode_rgb``, the one way an image file becomes pixels (the
engine's cache, ``engine.data.load_rgb``, and the served model call it too), so an image that passes the
split also loads in training, with the same pixels. A bad image is never passed on silently; each gets
a reason code that the caller quarantines or reports."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from transferbench.imaging import decode_rgb

# Reason codes, in the order they are checked.
MISSING = "missing_image"
EMPTY = "empty_file"
DECOMPRESSION_BOMB = "decompression_bomb"
CORRUPT = "corrupt_image"
TOO_SMALL = "too_small"

@dataclass(frozen=True)
class ImageProbe:
    """What opening one image file found; ``reason`` is None when the image is usable."""

    reason: str | None
    detail: str = ""
    # the size of the decoded image, upright (EXIF orientation applied)
    width: int | None = None
    height: int | None = None
    # md5 of the file's bytes: the manifests carry it, so their hash (the cache key, the data
    # version) changes when an image does, even under the same name.
    md5: str | None = None


def probe_image(path: str | Path, *, min_side: int) -> ImageProbe:
    """Fully decode ``path`` as training will (``decode_rgb``): a truncated file fails here, not at training time."""
    path = Path(path)
    if not path.is_file():
        return ImageProbe(MISSING, f"no file at {path}")
    content = path.read_bytes()
    if not content:
        return ImageProbe(EMPTY, f"{path} is 0 bytes")
    md5 = hashlib.md5(content).hexdigest()
    try:
        width, height = decode_rgb(io.BytesIO(content)).size
    except Image.DecompressionBombError as exc:
        return ImageProbe(DECOMPRESSION_BOMB, f"{path} is not decoded: {exc}", md5=md5)
    except Exception as exc:  # PIL raises many types for undecodable data
        return ImageProbe(CORRUPT, f"{path} does not decode as an image: {type(exc).__name__}: {exc}", md5=md5)
    if min(width, height) < min_side:
        return ImageProbe(TOO_SMALL, f"{path} is {width}x{height} px, smaller than min_image_side={min_side}",
                          width, height, md5)
    return ImageProbe(None, "", width, height, md5)
