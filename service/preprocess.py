"""Image decoding and preprocessing shared by precompute, the service and the TorchServe handler.

Resize the short side to ``resize`` with the manifest's interpolation, center crop ``crop``, scale
to [0, 1], normalize by mean/std, channels first: torchvision's ``Resize(resize)``,
``CenterCrop(crop)``, ``ToTensor()``, ``Normalize(mean, std)`` on a PIL image, pixel for pixel (the
long side is truncated, the crop offset rounded, as torchvision does), which is also what timm's
eval transform does with resize = floor(crop / crop_pct). JPEG is decoded at reduced size (``draft``) when the image is much larger than
needed, which is most of the decode cost for camera-sized photos.

YCbCr and grayscale JPEGs are decoded by libjpeg-turbo's TurboJPEG API (``simplejpeg``) straight
into a numpy array: the same library with the same settings as Pillow's decoder, so the same
pixels (tested), in about 60 % of Pillow's time on ImageNet-sized photos. Everything else (PNG,
WebP, CMYK JPEG, and any JPEG the fast path refuses) is decoded by Pillow, which then also decides
what is an error.
"""
from __future__ import annotations

import functools
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # a speed-up only: Pillow decodes the same pixels
    simplejpeg = None

from .bundle import Preprocessing
from .errors import InvalidInputError

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard, width * height
MAX_ASPECT_RATIO = 20  # long side / short side: a 1 x N image would be resized to resize x (resize * N) first
FORMATS = ("JPEG", "PNG", "WEBP")
FAST_JPEG_COLORSPACES = ("YCbCr", "Gray")  # TurboJPEG converts these to RGB exactly as Pillow does


class ImageError(InvalidInputError):
    """An image that cannot be used: empty, truncated, not an image, too large, odd mode."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_to: int | None = None,
                 formats: tuple[str, ...] = FORMATS) -> tuple[Image.Image, tuple[int, int]]:
    """Decode JPEG/PNG/WebP bytes to (an RGB PIL image, its declared (w, h)); raise ImageError
    with a clear reason. The declared size is the image's, before any reduced-size decode.

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
        if draft_to and img.format == "JPEG":
            factor = draft_factor((w, h), draft_to)
            if factor > 1:
                img.draft("RGB", (w // factor, h // factor))  # Pillow picks this factor
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except Exception as e:
        raise ImageError(f"image data is truncated or corrupt: {e}") from None
    return to_rgb(img), (w, h)


def draft_factor(size: tuple[int, int], draft_to: int | None) -> int:
    """The JPEG reduced-size decode factor (1, 2, 4 or 8) for an image of ``size`` (w, h): the
    largest that keeps the short side at least ``draft_to`` pixels."""
    w, h = size
    if not draft_to or min(w, h) < 2 * draft_to:
        return 1
    scale = min(w, h) // draft_to
    return next(f for f in (8, 4, 2, 1) if f <= scale)


def _decode_jpeg_fast(data: bytes, max_pixels: int, draft_to: int | None) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(H, W, 3) uint8 RGB and the declared (w, h) of a YCbCr or grayscale JPEG, or None where Pillow
    must decode it (not such a JPEG, or one TurboJPEG refuses: Pillow then decodes it or says why not)."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    if colorspace not in FAST_JPEG_COLORSPACES or w <= 0 or h <= 0:
        return None
    if w * h > max_pixels:
        raise ImageError(f"image declares {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
    factor = draft_factor((w, h), draft_to)
    try:
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=-(-w // factor),
                                     min_height=-(-h // factor), min_factor=factor)
    except ValueError:  # strict about recoverable damage, unlike Pillow: let Pillow judge
        return None
    return rgb, (w, h)


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_to: int | None = None
               ) -> tuple[np.ndarray | Image.Image, tuple[int, int]]:
    """Image bytes -> (RGB pixels: an (H, W, 3) uint8 array or an RGB PIL image, declared (w, h)).

    As :func:`decode_image`, with the TurboJPEG fast path for ordinary JPEGs (same pixels)."""
    fast = _decode_jpeg_fast(data, max_pixels, draft_to) if data else None
    if fast is not None:
        return fast
    return decode_image(data, max_pixels=max_pixels, draft_to=draft_to)


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


RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_crop(img: Image.Image | np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Short side to ``pre.resize`` (``pre.interpolation``), then the central ``pre.crop`` square:
    (crop, crop, 3) uint8.

    ``img``: an RGB PIL image or (H, W, 3) uint8 array. The crop is a numpy view of the pixels
    (cheaper than PIL's crop and conversion).
    """
    size = (img.shape[1], img.shape[0]) if isinstance(img, np.ndarray) else img.size
    if max(size) > MAX_ASPECT_RATIO * min(size):
        raise ImageError(f"image is {size[0]}x{size[1]}: an aspect ratio beyond {MAX_ASPECT_RATIO}:1 is not "
                         f"supported (resizing its short side to {pre.resize} would make a huge image)")
    nw, nh, left, top = _resized_crop(size, pre)
    if (nw, nh) != size:
        img = (Image.fromarray(img) if isinstance(img, np.ndarray) else img).resize((nw, nh),
                                                                                   RESAMPLE[pre.interpolation])
    return np.asarray(img)[top:top + pre.crop, left:left + pre.crop]


def _resized_crop(size: tuple[int, int], pre: Preprocessing) -> tuple[int, int, int, int]:
    """(resized width, resized height, crop left, crop top) for an image of ``size`` (w, h)."""
    w, h = size
    if w <= h:  # torchvision: the short side becomes ``resize``, the long one int(resize * long / short)
        nw, nh = pre.resize, int(pre.resize * h / w)
    else:
        nw, nh = int(pre.resize * w / h), pre.resize
    nw, nh = max(pre.crop, nw), max(pre.crop, nh)
    return nw, nh, int(round((nw - pre.crop) / 2.0)), int(round((nh - pre.crop) / 2.0))


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
    scale, offset = _affine(tuple(pre.mean), tuple(pre.std))
    out = np.empty((3, *a.shape[:2]), np.float32)
    for c in range(3):
        np.multiply(a[..., c], scale[c], out=out[c], dtype=np.float32)
        out[c] += offset[c]
    return out


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (scale, offset) of :func:`normalize`, float32-rounded, once per preprocessing."""
    s = np.asarray(std, np.float64)
    scale = (1.0 / (255.0 * s)).astype(np.float32)
    offset = (-np.asarray(mean, np.float64) / s).astype(np.float32)
    return tuple(np.float32(v) for v in scale), tuple(np.float32(v) for v in offset)


@dataclass
class Preprocessed:
    input: np.ndarray  # (3, crop, crop) float32, normalized
    view: np.ndarray  # (crop, crop, 3) uint8 RGB: what the model sees
    size: tuple[int, int]  # (width, height) of the image as sent
    crop: tuple[int, int, int, int]  # the model's crop in those pixels


def preprocess(data: bytes, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> Preprocessed:
    """Bytes -> model input, the view it comes from, the image's size and the crop box."""
    pixels, size = decode_rgb(data, max_pixels=max_pixels, draft_to=pre.resize)
    view = resize_crop(pixels, pre)
    return Preprocessed(normalize(view, pre), view, size, crop_box(size, pre))


def preprocess_bytes(data: bytes, pre: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Bytes -> (model input (3, crop, crop) float32, the (crop, crop, 3) uint8 view the model sees)."""
    p = preprocess(data, pre, max_pixels)
    return p.input, p.view
