"""Image decoding and preprocessing shared by precompute, the service and the TorchServe handler.

Resize the short side to ``resize``, center crop ``crop``, scale to [0, 1], normalize by mean/std,
channels first. JPEG is decoded at reduced size (``draft``) when the image is much larger than
needed, which is most of the decode cost for camera-sized photos.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .bundle import Preprocessing

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard, width * height
FORMATS = ("JPEG", "PNG", "WEBP")


class ImageError(ValueError):
    """An image that cannot be used: empty, truncated, not an image, too large, odd mode."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_to: int | None = None,
                 formats: tuple[str, ...] = FORMATS) -> Image.Image:
    """Decode JPEG/PNG/WebP bytes to an RGB PIL image; raise ImageError with a clear reason.

    The declared size is checked against ``max_pixels`` before any pixel is decoded.
    ``draft_to``: for JPEG, let libjpeg decode at 1/2, 1/4 or 1/8 scale while the short side stays
    at least this many pixels.
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
    except Image.DecompressionBombError as e:
        raise ImageError(f"image declares too many pixels: {e}") from None
    except Exception:
        raise ImageError(f"image could not be decoded: not a {'/'.join(formats)} image "
                         f"({len(data)} bytes)") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has an empty size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(f"image declares {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    if img.mode not in ("RGB", "L", "RGBA", "P", "LA", "CMYK", "I;16", "I;16B", "I;16L", "I", "YCbCr", "LAB"):
        raise ImageError(f"image mode {img.mode} is not supported")
    try:
        if draft_to and img.format == "JPEG" and min(w, h) >= 2 * draft_to:
            img.draft("RGB", (max(draft_to, w * draft_to // min(w, h)), max(draft_to, h * draft_to // min(w, h))))
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:
        raise ImageError(f"image data is truncated or corrupt: {e}") from None
    rgb = to_rgb(img)
    rgb.info["declared_size"] = (w, h)  # before any reduced-size (draft) decode
    return rgb


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB view of any supported mode; 16-bit grayscale is scaled down to 8 bits, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_crop(img: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Short side to ``pre.resize`` (bilinear), then the central ``pre.crop`` square: (crop, crop, 3) uint8.

    The crop is a numpy view of the decoded pixels (cheaper than PIL's crop and conversion).
    """
    nw, nh, left, top = _resized_crop(img.size, pre)
    if (nw, nh) != img.size:
        img = img.resize((nw, nh), Image.BILINEAR)
    return np.asarray(img)[top:top + pre.crop, left:left + pre.crop]


def _resized_crop(size: tuple[int, int], pre: Preprocessing) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) for an image of ``size`` (w, h)."""
    w, h = size
    scale = pre.resize / min(w, h)
    nw, nh = max(pre.crop, round(w * scale)), max(pre.crop, round(h * scale))
    return nw, nh, (nw - pre.crop) // 2, (nh - pre.crop) // 2


def crop_box(size: tuple[int, int], pre: Preprocessing) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the model's crop in the pixels of an image of ``size`` (w, h)."""
    w, h = size
    nw, nh, left, top = _resized_crop(size, pre)
    return (round(left * w / nw), round(top * h / nh), round((left + pre.crop) * w / nw),
            round((top + pre.crop) * h / nh))


def normalize(view: Image.Image | np.ndarray, pre: Preprocessing) -> np.ndarray:
    """(crop, crop, 3) uint8 RGB -> (3, crop, crop) float32 normalized model input.

    One fused multiply-add per channel into the output (5x faster than float conversion, then
    subtract, then divide, then transpose): x = a / (255 std) - mean / std.
    """
    a = np.asarray(view)
    std = np.asarray(pre.std, np.float64)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    offset = (-np.asarray(pre.mean, np.float64) / std).astype(np.float32)
    out = np.empty((3, *a.shape[:2]), np.float32)
    for c in range(3):
        np.multiply(a[..., c], scale[c], out=out[c], dtype=np.float32)
        out[c] += offset[c]
    return out


@dataclass
class Preprocessed:
    input: np.ndarray  # (3, crop, crop) float32, normalized
    view: np.ndarray  # (crop, crop, 3) uint8 RGB: what the model sees
    size: tuple[int, int]  # (width, height) of the image as sent
    crop: tuple[int, int, int, int]  # the model's crop in those pixels


def preprocess(data: bytes, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> Preprocessed:
    """Bytes -> model input, the view it comes from, the image's size and the crop box."""
    img = decode_image(data, max_pixels=max_pixels, draft_to=pre.resize)
    size = img.info.get("declared_size", img.size)
    view = resize_crop(img, pre)
    return Preprocessed(normalize(view, pre), view, size, crop_box(size, pre))


def preprocess_bytes(data: bytes, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Bytes -> (model input (3, crop, crop) float32, the (crop, crop, 3) uint8 view the model sees)."""
    p = preprocess(data, pre, max_pixels)
    return p.input, p.view
