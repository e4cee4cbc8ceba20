"""Image loading (modes, EXIF, errors, bomb limit), the SOLO resize rule, and real photos through the whole path."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from megatron_solo import _C
from megatron_solo.format import image as image_mod
from megatron_solo.format.image import (
    ImageLoadError,
    load_and_resize,
    load_image,
    resize_bilinear,
    resize_for_solo,
    resize_policy,
    solo_resize_shape,
)
from megatron_solo.format.layout import image_layout, image_token_count, patchify, unpatchify

SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"
PHOTOS = ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"]  # shipped with matplotlib (PyPI)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


# --- the resize rule -----------------------------------------------------------------------------------------------

# (width, height) -> (new_w, new_h), worked out by hand from the released rule:
#   long' = min(ceil(long/32)*32, 1024); short' = ceil(int(long' * short / long) / 32) * 32; fix: short' >= 32.
RESIZE_CASES = [
    ((32, 32), (32, 32)),  # exact multiple stays (the paper's int(x/32+1)*32 would give 64)
    ((64, 64), (64, 64)),
    ((96, 64), (96, 64)),
    ((64, 96), (64, 96)),
    ((1, 1), (32, 32)),  # ceil(1/32)*32 = 32 on both sides
    ((1024, 1024), (1024, 1024)),
    ((1025, 1025), (1024, 1024)),  # ceil -> 1056, capped at 1024
    ((5000, 3), (1024, 32)),  # released rule: int(1024*3/5000) = 0 -> 0 patches; fixed to 1 patch
    ((3, 5000), (32, 1024)),
    ((2048, 1536), (1024, 768)),  # int(1024*1536/2048) = 768
    ((1536, 2048), (768, 1024)),
    ((1920, 1080), (1024, 576)),  # int(1024*1080/1920) = 576 = 18*32
    ((800, 600), (800, 608)),  # 600 -> ceil(600/32) = 19 -> 608
    ((640, 480), (640, 480)),
    ((500, 375), (512, 384)),  # long 500 -> 512; int(512*375/500) = 384
    ((512, 600), (544, 608)),  # grace_hopper.jpg: long 600 -> 608; int(608*512/600) = 518 -> 17*32 = 544
    ((100, 30), (128, 64)),  # long 128; int(128*30/100) = 38 -> 64
    ((33, 1), (64, 32)),  # int(64*1/33) = 1 -> 32
    ((31, 17), (32, 32)),  # int(32*17/31) = 17 -> 32
    ((2000, 33), (1024, 32)),  # int(1024*33/2000) = 16 -> 32
    ((3000, 100), (1024, 64)),  # int(1024*100/3000) = 34 -> 64
    ((5000, 10), (1024, 32)),  # int(1024*10/5000) = 2 -> 32 (released rule already fine here)
    ((4000, 3000), (1024, 768)),
]


@pytest.mark.parametrize("size,expected", RESIZE_CASES)
def test_resize_shape_by_hand(size, expected):
    assert solo_resize_shape(*size) == expected


def released_rule(width: int, height: int) -> tuple[int, int]:
    """The released SOLO rule WITHOUT the fix (independent reference for every non-degenerate size)."""
    long_side, short_side = max(width, height), min(width, height)
    new_long = min(math.ceil(long_side / 32) * 32, 1024)
    new_short = math.ceil(int(new_long * short_side / long_side) / 32) * 32
    return (new_long, new_short) if width >= height else (new_short, new_long)


def test_resize_rule_equals_released_rule_except_the_zero_patch_fix():
    sizes = [1, 2, 3, 5, 17, 31, 32, 33, 63, 64, 65, 100, 255, 333, 511, 512, 513, 777, 1000, 1023, 1024, 1025]
    sizes += [1500, 2047, 2048, 3001, 4096, 5000, 10000, 40000]
    fixed = 0
    for w in sizes:
        for h in sizes:
            new = solo_resize_shape(w, h)
            assert all(s % 32 == 0 and 32 <= s <= 1024 for s in new), (w, h, new)
            ref = released_rule(w, h)
            if min(ref) == 0:
                fixed += 1
                assert new == tuple(32 if r == 0 else r for r in ref)
            else:
                assert new == ref, (w, h)
    assert fixed > 0  # the grid does include degenerate sizes


def test_resize_rejects_empty():
    with pytest.raises(ValueError):
        solo_resize_shape(0, 10)


def test_resize_for_solo_shapes_and_passthrough():
    rng = np.random.default_rng(0)
    for w, h in [(1, 1), (5000, 3), (3, 700), (200, 150)]:
        out = resize_for_solo(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        nw, nh = solo_resize_shape(w, h)
        assert out.shape == (nh, nw, 3) and out.dtype == np.uint8
    ok = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert resize_for_solo(ok) is ok  # already a SOLO size: untouched
    # A flat colour stays that colour through bilinear resampling.
    flat = np.full((70, 50, 3), (12, 200, 77), dtype=np.uint8)
    assert (resize_for_solo(flat) == (12, 200, 77)).all()
    with pytest.raises(ValueError, match="uint8"):
        resize_for_solo(np.zeros((10, 10, 3), np.float32))


BILINEAR = Image.Resampling.BILINEAR


def _pillow(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(img, "RGB").resize(size, Image.Resampling.BILINEAR))


def test_cpp_resize_is_bit_identical_to_the_installed_pillow():
    """The C++ resize against Pillow itself: upscales, downscales (to 1/40), one-pixel and very thin images, both pass
    orders, SOLO rule sizes and arbitrary ones, strided (cropped) input."""
    assert resize_policy() != "pillow"  # this Pillow is reproduced (else every resize would silently use Pillow)
    rng = np.random.default_rng(0)
    shapes = [((1, 1), (32, 32)), ((5000, 3), None), ((3, 700), None), ((2000, 1200), (50, 30)), ((33, 1), (1, 64))]
    shapes += [((int(rng.integers(1, 600)), int(rng.integers(1, 600))), None) for _ in range(150)]
    shapes += [
        ((int(rng.integers(1, 400)), int(rng.integers(1, 400))), tuple(rng.integers(1, 500, 2))) for _ in range(150)
    ]
    n_vertical_first = 0
    for (w, h), size in shapes:
        size = tuple(int(v) for v in size) if size is not None else solo_resize_shape(w, h)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        assert np.array_equal(resize_bilinear(img, size), _pillow(img, size)), (w, h, size)
        n_vertical_first += _C.pillow13_vertical_first(h, w, size[1], size[0])
    assert n_vertical_first > 20  # the vertical-first order was exercised
    big = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    crop = big[10:250, 7:400]  # rows strided, pixels contiguous
    assert np.array_equal(resize_bilinear(crop, (200, 333)), _pillow(np.ascontiguousarray(crop), (200, 333)))


def test_resize_policy_probes_tell_the_pass_orders_apart(monkeypatch):
    """Each probe gives different bytes under the two orders, so the policy cannot pick the wrong one: Pillow >= 13
    (here), a Pillow < 13 and a Pillow matching neither are told apart; SOLO_RESIZE=pillow makes Pillow resize."""
    rng = np.random.default_rng(0)
    for src, (h, w) in image_mod._RESIZE_PROBES:
        img = rng.integers(0, 256, (*src, 3), np.uint8)
        assert not np.array_equal(_C.resize_bilinear(img, w, h, True), _C.resize_bilinear(img, w, h, False)), src

    # A Pillow < 13 (always horizontal first) is recognised: emulate it with two one-pass Pillow resizes.
    def pillow_12(img, size):
        im = Image.fromarray(img, "RGB")
        return np.asarray(im.resize((size[0], im.size[1]), BILINEAR).resize(size, BILINEAR))

    monkeypatch.setattr(image_mod, "_pillow_resize", pillow_12)
    image_mod.resize_policy.cache_clear()
    assert resize_policy() == "horizontal"
    tall = rng.integers(0, 256, (300, 40, 3), dtype=np.uint8)
    assert np.array_equal(resize_bilinear(tall, (32, 64)), pillow_12(tall, (32, 64)))
    monkeypatch.setattr(image_mod, "_pillow_resize", lambda img, size: np.zeros((size[1], size[0], 3), np.uint8))
    image_mod.resize_policy.cache_clear()
    assert resize_policy() == "pillow"  # reproduces neither order: Pillow itself resizes
    monkeypatch.undo()
    monkeypatch.setenv(image_mod.RESIZE_ENV, "pillow")
    image_mod.resize_policy.cache_clear()
    try:
        assert resize_policy() == "pillow"
        img = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
        assert np.array_equal(resize_for_solo(img), _pillow(img, solo_resize_shape(50, 70)))
    finally:
        monkeypatch.delenv(image_mod.RESIZE_ENV)
        image_mod.resize_policy.cache_clear()


# --- real photos through the whole path ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_real_photo_whole_path(name):
    path = SAMPLE_DATA / name
    with Image.open(path) as im:
        w, h = im.size
    img = load_image(path)
    assert img.dtype == np.uint8 and img.shape == (h, w, 3)
    resized = load_and_resize(str(path))
    nw, nh = solo_resize_shape(w, h)
    assert resized.shape == (nh, nw, 3)
    assert np.array_equal(resized, resize_for_solo(img))
    patches = patchify(resized)
    n_h, n_w = nh // 32, nw // 32
    assert patches.shape == (n_h * n_w, 3072)
    assert np.array_equal(unpatchify(patches, n_h, n_w), resized)  # bit for bit
    ids, pidx = image_layout(n_h, n_w, 32000, 32001, 32002, 32004)
    assert len(ids) == image_token_count(n_h, n_w) == n_h * n_w + n_h - 1 + 2
    assert (pidx >= 0).sum() == len(patches)
    # The same file given as bytes and as a base64 data URL decodes identically.
    raw = path.read_bytes()
    assert np.array_equal(load_image(raw), img)
    assert np.array_equal(load_image("data:image/png;base64," + base64.b64encode(raw).decode()), img)


def test_grace_hopper_content_survives():
    img = load_and_resize(SAMPLE_DATA / "grace_hopper.jpg")
    assert img.shape == (608, 544, 3)
    # A real photo: not flat, uses the whole range, colour (not grey).
    assert img.std() > 30 and img.min() < 20 and img.max() > 235
    assert np.abs(img[..., 0].astype(int) - img[..., 2]).mean() > 5


# --- Pillow modes ---------------------------------------------------------------------------------------------------


def test_palette_image():
    p = Image.new("P", (40, 20))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    p.paste(1, (20, 0, 40, 20))
    img = load_image(encode(p, "PNG"))
    assert img.shape == (20, 40, 3)
    assert (img[:, :20] == (255, 0, 0)).all() and (img[:, 20:] == (0, 0, 255)).all()


def test_palette_with_transparency_composites_on_white():
    p = Image.new("P", (10, 10), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.paste(1, (5, 0, 10, 10))
    img = load_image(encode(p, "PNG", transparency=0))
    assert (img[:, :5] == 255).all() and (img[:, 5:] == (200, 100, 50)).all()


def test_rgba_composites_on_white():
    a = np.zeros((8, 8, 4), np.uint8)
    a[..., 0] = 200  # red everywhere under the alpha
    a[:, :4, 3] = 0  # left half fully transparent
    a[:, 4:6, 3] = 255  # opaque
    a[:, 6:, 3] = 128  # half transparent
    img = load_image(encode(Image.fromarray(a, "RGBA"), "PNG"))
    assert (img[:, :4] == 255).all()
    assert (img[:, 4:6] == (200, 0, 0)).all()
    expect = np.array([round(200 * 128 / 255 + 255 * 127 / 255), round(255 * 127 / 255), round(255 * 127 / 255)])
    assert np.abs(img[:, 6:].astype(int) - expect).max() <= 1


def test_la_and_l():
    la = np.zeros((6, 6, 2), np.uint8)
    la[..., 0] = 40
    la[:3, :, 1] = 255
    img = load_image(encode(Image.fromarray(la, "LA"), "PNG"))
    assert (img[:3] == 40).all() and (img[3:] == 255).all()
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = load_image(encode(Image.fromarray(gray, "L"), "PNG"))
    assert img.shape == (16, 16, 3) and (img == gray[..., None]).all()


def test_bilevel():
    one = Image.new("1", (16, 8), 0)
    one.paste(1, (8, 0, 16, 8))
    img = load_image(encode(one, "PNG"))
    assert (img[:, :8] == 0).all() and (img[:, 8:] == 255).all()


def test_16_bit_grayscale_is_scaled_not_clipped():
    a16 = np.linspace(0, 65535, 64 * 32).astype(np.uint16).reshape(32, 64)
    im = Image.fromarray(a16)
    assert im.mode.startswith("I;16")
    img = load_image(encode(im, "PNG"))
    expect = np.rint(a16 / 257.0).astype(np.uint8)
    assert (img == expect[..., None]).all()
    assert img.max() == 255 and img.min() == 0 and len(np.unique(img)) > 200


def test_cmyk():
    c = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    for fmt in ("TIFF", "JPEG"):
        img = load_image(encode(c, fmt, **({"quality": 95} if fmt == "JPEG" else {})))
        assert img.shape == (16, 16, 3)
        assert np.abs(img.astype(int) - (255, 0, 0)).max() <= 3, fmt


def test_multi_frame_gif_uses_first_frame():
    frames = [Image.new("RGB", (20, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    with Image.open(io.BytesIO(data)) as im:
        assert im.n_frames == 3
    img = load_image(data)
    assert (img == (255, 0, 0)).all()


def _marked_photo(w: int = 96, h: int = 64) -> np.ndarray:
    """Grey picture with a red block in its top-left corner (to see where the top-left went)."""
    a = np.full((h, w, 3), 128, np.uint8)
    a[:16, :16] = (255, 0, 0)
    return a


@pytest.mark.parametrize(
    "orientation,turn",
    [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))],
)
def test_exif_orientation_is_applied(orientation, turn):
    stored = _marked_photo()
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif)
    img = load_image(data)
    expect = turn(stored)
    assert img.shape == expect.shape
    assert np.abs(img.astype(int) - expect).mean() < 3
    raw = load_image(data, apply_exif_orientation=False)
    assert raw.shape == stored.shape


# --- errors ---------------------------------------------------------------------------------------------------------


def test_broken_and_truncated_images_name_the_input(tmp_path):
    good = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), np.uint8)), "JPEG")
    trunc = tmp_path / "truncated_photo.jpg"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(ImageLoadError, match=r"truncated_photo\.jpg.*truncated"):
        load_image(trunc)
    junk = tmp_path / "not_an_image.png"
    junk.write_bytes(b"this is text, not a picture\n" * 4)
    with pytest.raises(ImageLoadError, match=r"not_an_image\.png.*not a readable image"):
        load_and_resize(junk)
    with pytest.raises(ImageLoadError, match=r"(?i)record-17.*truncated"):
        load_image(good[:300], name="record-17")
    with pytest.raises(ImageLoadError, match=r"missing\.jpg.*not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ImageLoadError, match="bytes"):
        load_image(b"")
    assert issubclass(ImageLoadError, ValueError)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(bomb)  # 144 Mpx, a few KB on disk
    assert bomb.stat().st_size < 100_000
    with pytest.raises(ImageLoadError, match=r"bomb\.png.*decompression-bomb limit"):
        load_image(bomb)
    small = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(ImageLoadError, match="decompression-bomb"):
        load_image(small, max_pixels=5000)
    assert load_image(small, max_pixels=10_000).shape == (100, 100, 3)


# --- fast JPEG path -------------------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """A 2560x2960 JPEG made from a real photo (upscaled 5x), large enough for 1/2 and 1/4-scale decoding."""
    with Image.open(SAMPLE_DATA / "grace_hopper.jpg") as im:
        big = im.convert("RGB").resize((im.width * 5, im.height * 5), Image.Resampling.BICUBIC)
    return encode(big, "JPEG", quality=92)


def test_fast_decode_matches_exact_path(big_jpeg):
    exact = load_and_resize(big_jpeg)
    fast = load_and_resize(big_jpeg, fast_decode=True)
    assert exact.shape == fast.shape == (1024, 896, 3)  # 2560x2960 -> long 1024, int(1024*2560/2960)=885 -> 896
    assert not np.array_equal(exact, fast)  # it really took the reduced-scale path
    assert psnr(exact, fast) > 30


def test_fast_decode_with_exif_rotation_keeps_the_target_size():
    stored = np.kron(_marked_photo(96, 64), np.ones((30, 30, 1), np.uint8))  # 2880x1920, red block top-left
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored), "JPEG", quality=90, exif=exif)
    exact = load_and_resize(data)
    fast = load_and_resize(data, fast_decode=True)
    assert exact.shape == fast.shape == (1024, 704, 3)  # displayed 1920x2880
    assert psnr(exact, fast) > 30
    assert (fast[:100, -100:] == fast[20, -20]).all() and fast[20, -20, 0] > 200  # red block now top-right


def test_fast_decode_is_exact_for_non_jpeg_and_small_jpeg():
    png = SAMPLE_DATA / "logo2.png"
    assert np.array_equal(load_and_resize(png, fast_decode=True), load_and_resize(png))
    jpg = SAMPLE_DATA / "grace_hopper.jpg"  # 512x600: no reduced scale keeps >= 544x608
    assert np.array_equal(load_and_resize(jpg, fast_decode=True), load_and_resize(jpg))
