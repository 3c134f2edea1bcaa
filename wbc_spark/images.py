"""Decoding and checking image bytes: every problem becomes a short, specific reason."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadImage(ValueError):
    """An image file cannot be used; the message is the reason, for the quarantine table."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes | None, *, min_side: int = 32, max_pixels: int = 40_000_000
           ) -> Image.Image:
    """Decode and fully load an image, or raise ``BadImage`` with the reason.

    The size is checked from the header before any pixel is decoded, so a decompression bomb
    costs nothing.
    """
    if data is None or len(data) == 0:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("decompression bomb (declared size too large)") from None
    except OSError as exc:
        raise BadImage(f"unreadable header: {exc}") from None
    w, h = image.size
    if w * h > max_pixels:
        raise BadImage(f"absurd size {w}x{h} (over {max_pixels} pixels)")
    if min(w, h) < min_side:
        raise BadImage(f"too small {w}x{h} (sides under {min_side} px)")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise BadImage(f"corrupt or truncated: {reason}") from None
    return image


def decode_mask(data: bytes, size: tuple[int, int]) -> np.ndarray:
    """A mask image as booleans of ``size`` (JPEG halo removed by thresholding above 127)."""
    mask = Image.open(io.BytesIO(data)).convert("L")
    if mask.size != size:
        raise BadImage(f"mask size {mask.size} differs from the image's {size}")
    return np.asarray(mask) > 127


def encode_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
