"""Image files as they come: every PIL mode to 8-bit RGB (or refused with the reason), and masks.

A leaf module: :mod:`sdtune.data.dataset` and :mod:`sdtune.data.layouts` import it, it imports neither.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdtune.errors import UserError


class DataError(UserError, ValueError):
    """The dataset cannot be used as configured; the message says what to change."""



ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white (what a viewer shows on a page)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")  # how PIL opens 16-bit grey PNG/TIFF


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha (RGBA, LA, palette with transparency) composited over white; 16-bit grey
    scaled to 8 bits (PIL's plain convert would clip it to white); 1-bit, grey, palette and YCbCr
    converted; CMYK and other colour spaces refused (their colours need a colour profile)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in SIXTEEN_BIT_MODES:
        return Image.fromarray(_eight_bit(image)).convert("RGB")
    if mode in ("1", "L", "P", "YCbCr"):
        return image.convert("RGB")
    if mode == "CMYK":
        raise DataError(
            "CMYK image: converting it without its colour profile would change its colours; save it as RGB "
            "(e.g. `magick in.jpg -colorspace sRGB out.jpg`)"
        )
    raise DataError(f"image mode {mode!r} is not supported; save the image as 8-bit RGB")


def to_mask(image: Image.Image) -> np.ndarray:
    """A mask image as float32 in [0, 1], (height, width): white = trained, black = ignored. A mask
    with an alpha channel uses the alpha; otherwise the grey level."""
    if image.mode in SIXTEEN_BIT_MODES:
        return _eight_bit(image).astype(np.float32) / 255.0
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        grey = image.convert("RGBA").getchannel("A")
    else:
        grey = image.convert("L")
    return np.asarray(grey, dtype=np.float32) / 255.0


def _eight_bit(image: Image.Image) -> np.ndarray:
    """16-bit values (0–65535, what PIL reads from a 16-bit PNG) to 8 bits: 65535 / 255 = 257."""
    values = np.asarray(image, dtype=np.float64)
    return np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
