"""Load any Pillow-readable image as RGB uint8 and apply the SOLO resize rule.

Decisions (see docs/format.md):
- EXIF orientation IS applied (the picture is used the way a viewer shows it, which is what captions describe).
- Transparency is composited onto WHITE (a transparent logo or screenshot is meant to be seen on a page).
- 16-bit / 32-bit integer grayscale is scaled to 8 bits (v / 257, rounded), not clipped.
- Multi-frame files (GIF, APNG, TIFF, ...) use their first frame.
- Images over ``max_pixels`` (default 64 Mpx) are refused before decoding (decompression-bomb limit).
- The resize is PIL's bilinear (as released), computed by ``megatron_solo._C.resize_bilinear``: bit-identical to the
  installed Pillow's ``Image.resize(size, BILINEAR)`` and 2-5x faster (csrc/resize.h). Which of Pillow's two pass
  orders applies is probed once per process; should the probe ever disagree, or ``SOLO_RESIZE=pillow`` is set, Pillow
  itself resizes.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from megatron_solo import _C
from megatron_solo.format.layout import PATCH_SIZE

MAX_LONG_SIDE = 1024  # released SOLO: the long side is capped at 1024 px (32 patches)
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # decompression-bomb limit, checked from the header before decoding

ImageSource = str | bytes | os.PathLike
_EXIF_ORIENTATION = 0x0112
RESIZE_ENV = "SOLO_RESIZE"  # "pillow": resize with Pillow itself (the reference) instead of the C++ copy of it
# (in_h, in_w) -> (out_h, out_w) of random images on which Pillow's two pass orders give different bytes (tested), so
# the probe tells them apart: tall images shrinking (Pillow >= 13 runs those vertical-first) and a plain case.
_RESIZE_PROBES = (((400, 50), (37, 45)), ((257, 64), (96, 61)), ((50, 71), (96, 128)))
_WHITE = (255, 255, 255)


class ImageLoadError(ValueError):
    """An image cannot be read / converted; the message names the input."""


def solo_resize_shape(width: int, height: int) -> tuple[int, int]:
    """(new_w, new_h) by the released SOLO rule, with the fix that a side never rounds to 0 patches.

    long' = min(ceil(long / 32) * 32, 1024); short' = ceil(int(long' * short / long) / 32) * 32, at least 32.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height} (W x H)")
    long_side, short_side = max(width, height), min(width, height)
    new_long = min(math.ceil(long_side / PATCH_SIZE) * PATCH_SIZE, MAX_LONG_SIDE)
    # Same float expression as the released code, then the fix: never 0 patches on the short side.
    new_short = math.ceil(int(new_long * short_side / long_side) / PATCH_SIZE) * PATCH_SIZE
    new_short = max(new_short, PATCH_SIZE)
    return (new_long, new_short) if width >= height else (new_short, new_long)


def _pillow_resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(img, "RGB").resize(size, Image.Resampling.BILINEAR))


@functools.cache
def resize_policy() -> str:
    """How this process resizes: "pillow13" (C++, vertical pass first where Pillow >= 13 does so), "horizontal" (C++,
    horizontal pass first, as Pillow < 13) or "pillow" (Pillow itself: forced by SOLO_RESIZE=pillow, or neither C++
    order reproduces the installed Pillow on the probe images)."""
    if os.environ.get(RESIZE_ENV, "").lower() == "pillow":
        return "pillow"
    rng = np.random.default_rng(0)
    probes = [(rng.integers(0, 256, (*src, 3), np.uint8), dst) for src, dst in _RESIZE_PROBES]
    for policy in ("pillow13", "horizontal"):
        if all(np.array_equal(_pillow_resize(img, (w, h)), _resize_cpp(img, (w, h), policy)) for img, (h, w) in probes):
            return policy
    return "pillow"


def _resize_cpp(img: np.ndarray, size: tuple[int, int], policy: str) -> np.ndarray:
    w, h = size
    vertical_first = policy == "pillow13" and _C.pillow13_vertical_first(img.shape[0], img.shape[1], h, w)
    return _C.resize_bilinear(img, w, h, vertical_first)


def resize_bilinear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[size[1], size[0], 3], bytes equal to PIL ``Image.resize(size, BILINEAR)``."""
    policy = resize_policy()
    return _pillow_resize(img, size) if policy == "pillow" else _resize_cpp(img, size, policy)


def resize_for_solo(img: np.ndarray) -> np.ndarray:
    """uint8[H, W, 3] -> uint8[H', W', 3] with (W', H') = solo_resize_shape(W, H), PIL bilinear (as released)."""
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"resize_for_solo expects uint8[H, W, 3], got {img.dtype}{list(img.shape)}")
    h, w = img.shape[:2]
    size = solo_resize_shape(w, h)
    if size == (w, h):
        return img
    return resize_bilinear(img, size)


def _describe(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and source.startswith("data:"):
        return f"<data URL of {len(source)} chars>"
    return str(source)


def _open(source: ImageSource, label: str) -> Image.Image:
    try:
        if isinstance(source, bytes):
            return Image.open(io.BytesIO(source))
        if isinstance(source, str) and source.startswith("data:"):
            _, sep, payload = source.partition(",")
            if not sep or ";base64" not in source[: len(source) - len(payload)]:
                raise ImageLoadError(f"{label}: only base64 data URLs are supported")
            return Image.open(io.BytesIO(base64.b64decode(payload, validate=False)))
        return Image.open(Path(source))
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{label}: file not found") from None
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{label}: refused as a decompression bomb: {e}") from e
    except (UnidentifiedImageError, binascii.Error) as e:
        raise ImageLoadError(f"{label}: not a readable image ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(f"{label}: cannot open image: {e}") from e


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not lose the picture
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        if mode == "F" and a.size and float(a.max()) <= 1.0:
            a = a * 255.0  # float images in [0, 1]
        elif mode != "F":
            a = np.clip(a, 0, 65535) / 257.0  # 16-bit range -> 8-bit
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if mode == "RGBa" or mode == "La":
        im = im.convert(mode.replace("a", "A"))
    if has_alpha:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _load(
    source: ImageSource, name: str | None, max_pixels: int, apply_exif_orientation: bool, fast_decode: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """(RGB uint8 array, (width, height) of the full image as displayed)."""
    label = _describe(source, name)
    im = _open(source, label)
    try:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageLoadError(
                f"{label}: {w}x{h} = {w * h} pixels exceeds the decompression-bomb limit of {max_pixels} pixels"
            )
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        orientation = _orientation(im) if apply_exif_orientation else 1
        swapped = orientation in (5, 6, 7, 8)  # transposed / rotated by 90 degrees
        full_size = (h, w) if swapped else (w, h)
        if fast_decode and im.format == "JPEG":
            tw, th = solo_resize_shape(*full_size)
            im.draft(None, (th, tw) if swapped else (tw, th))  # decoded size stays >= the target
        im.load()
        if orientation != 1:
            im = ImageOps.exif_transpose(im)
        out = np.asarray(_to_rgb(im), dtype=np.uint8)
        if out.ndim != 3 or out.shape[2] != 3:
            raise ImageLoadError(f"{label}: conversion to RGB gave shape {out.shape}")
        return np.ascontiguousarray(out), full_size
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"{label}: refused as a decompression bomb: {e}") from e
    except (OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError) as e:
        raise ImageLoadError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e
    finally:
        im.close()


def load_image(
    source: ImageSource,
    name: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    apply_exif_orientation: bool = True,
) -> np.ndarray:
    """Any Pillow-readable image (path, file bytes, or base64 ``data:`` URL) -> uint8[H, W, 3] RGB.

    ``name`` labels the input in errors (default: the path). Raises ImageLoadError naming the input.
    """
    return _load(source, name, max_pixels, apply_exif_orientation, fast_decode=False)[0]


def load_and_resize(
    source: ImageSource,
    name: str | None = None,
    *,
    fast_decode: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    apply_exif_orientation: bool = True,
) -> np.ndarray:
    """load_image + the SOLO resize: uint8[H', W', 3] with H', W' multiples of 32 (ready for patchify).

    ``fast_decode=True`` (opt-in) decodes a large JPEG at reduced scale (1/2, 1/4, 1/8, via Pillow's draft mode)
    while the decoded size stays >= the target, then does the exact bilinear resize. Much faster on big photos;
    pixels differ slightly from the default path (see tests/test_image.py PSNR check). The output size is the
    same either way: the rule is applied to the file's full (oriented) size.
    """
    img, full_size = _load(source, name, max_pixels, apply_exif_orientation, fast_decode)
    size = solo_resize_shape(*full_size)
    if (img.shape[1], img.shape[0]) == size:
        return img
    return resize_bilinear(img, size)
