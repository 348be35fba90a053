"""Image rules shared by the reader and the shard writer: which members are images, how an image
becomes a uint8 array of the training size."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes JPEG too, about 7x slower
    simplejpeg = None

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff")
"""File extensions treated as images, in the order a reader picks the first one present."""


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the shorter side to `size` (bicubic; box-reduce for exact integer factors),
    then crop the centre `size` x `size`."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    short = min(w, h)
    if short % size == 0 and short > size:
        img = img.reduce(short // size)
    elif short != size:
        scale = size / short
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(data: bytes, ext: str, size: int, channels: int) -> np.ndarray:
    """Image bytes -> uint8 array (size, size, channels): converted to L or RGB (alpha dropped),
    shorter side scaled to `size` and centre-cropped. JPEGs already at that size (the common
    case) go straight from libjpeg-turbo into the array."""
    if ext in ("jpg", "jpeg") and simplejpeg is not None:
        try:  # may scale down by 1/2..1/8 inside the DCT while staying >= size
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB" if channels == 3 else "GRAY",
                                         min_height=size, min_width=size)
        except ValueError:
            arr = None  # e.g. CMYK: let PIL try (and raise if the data is corrupt)
        if arr is not None:
            if arr.shape[0] == size and arr.shape[1] == size:
                return arr
            img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
            return np.asarray(resize_center_crop(img, size)).reshape(size, size, channels)
    img = to_8bit(Image.open(io.BytesIO(data))).convert("RGB" if channels == 3 else "L")
    return np.asarray(resize_center_crop(img, size)).reshape(size, size, channels)


def to_8bit(img: Image.Image) -> Image.Image:
    """16- and 32-bit integer images (16-bit PNG opens as I;16 or I) scaled to 8 bits: PIL's own
    convert("L") clips them, which turns almost every 16-bit pixel white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.int64)
        peak = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        return Image.fromarray((np.clip(arr, 0, peak) * 255 // peak).astype(np.uint8), mode="L")
    return img
