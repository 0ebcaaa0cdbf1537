"""Decoding and preprocessing: the TurboJPEG fast path gives Pillow's pixels, and refuses what it should."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conceptlens.service import preprocess as prep
from conceptlens.service.bundle import Preprocessing
from conftest import IMAGENET, cifar_test_jpegs
from service_conftest import cmyk_jpeg_bytes, jpeg_bytes

PRE = Preprocessing(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
needs_fast = pytest.mark.skipif(prep.simplejpeg is None, reason="simplejpeg is not installed")


def pillow_only(fn, *args, **kwargs):
    """``fn`` with the fast path switched off."""
    fast, prep.simplejpeg = prep.simplejpeg, None
    try:
        return fn(*args, **kwargs)
    finally:
        prep.simplejpeg = fast


def photo(size: tuple[int, int], mode: str = "RGB", quality: int = 85) -> bytes:
    """A smooth synthetic photo-like JPEG of ``size`` (w, h) (gradients and a disc, chroma-subsampled)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1),
                    ((xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (min(w, h) / 3) ** 2) * 200], -1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(out, format="JPEG", quality=quality)
    return out.getvalue()


@needs_fast
def test_fast_path_gives_pillows_pixels_on_real_photos():
    images = cifar_test_jpegs(40) + [p.read_bytes() for p in sorted(IMAGENET.glob("*.jpg"))[:40]]
    for data in images:
        fast = prep.preprocess(data, PRE)
        slow = pillow_only(prep.preprocess, data, PRE)
        assert isinstance(prep.decode_rgb(data, draft_to=PRE.resize)[0], np.ndarray)  # it took the fast path
        assert np.array_equal(fast.input, slow.input) and np.array_equal(fast.view, slow.view)
        assert fast.size == slow.size and fast.crop == slow.crop


@needs_fast
@pytest.mark.parametrize("size", [(2049, 1537), (4000, 3000), (600, 513), (511, 700), (1023, 2048), (300, 2000)])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_reduced_size_decode_matches_pillows_draft(size, mode):
    data = photo(size, mode)
    fast, declared = prep.decode_rgb(data, draft_to=256)
    slow, slow_declared = pillow_only(prep.decode_rgb, data, draft_to=256)
    slow = np.asarray(slow)
    factor = prep.draft_factor(size, 256)
    assert declared == slow_declared == size
    assert fast.shape == slow.shape == (-(-size[1] // factor), -(-size[0] // factor), 3)
    assert np.array_equal(fast, slow)


def test_draft_factor_keeps_the_short_side():
    assert prep.draft_factor((341, 256), 256) == 1
    assert prep.draft_factor((600, 511), 256) == 1  # a factor of 2 would leave 255 < 256
    assert prep.draft_factor((600, 512), 256) == 2
    assert prep.draft_factor((4000, 3000), 256) == 8
    assert prep.draft_factor((2048, 1536), 256) == 4
    assert prep.draft_factor((4000, 3000), None) == 1


@needs_fast
def test_cmyk_and_png_are_decoded_by_pillow():
    for data in (cmyk_jpeg_bytes(1, (64, 48)), _png(jpeg_bytes(2, (64, 48)))):
        pixels, size = prep.decode_rgb(data)
        assert isinstance(pixels, Image.Image) and pixels.mode == "RGB" and size == (64, 48)


def _png(jpeg: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "pillow"])
def test_damaged_and_oversized_jpegs_are_image_errors(fast):
    decode = prep.decode_rgb if fast else (lambda *a, **k: pillow_only(prep.decode_rgb, *a, **k))
    good = photo((400, 300))
    with pytest.raises(prep.ImageError, match="truncated or corrupt"):
        decode(good[: len(good) // 2])
    with pytest.raises(prep.ImageError, match="could not be decoded"):
        decode(good[:20])
    with pytest.raises(prep.ImageError, match="more than the limit"):
        decode(good, max_pixels=400 * 300 - 1)  # refused from the header, before decoding
    with pytest.raises(prep.ImageError, match="empty"):
        decode(b"")
    pixels, size = decode(good + b"\xff\xfe" + b"trailing bytes after the end marker")
    assert size == (400, 300) and np.asarray(pixels).shape == (300, 400, 3)
