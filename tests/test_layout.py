"""The C++ patchify / unpatchify / image token layout (megatron_solo._C via megatron_solo.format.layout)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_solo.format import layout
from megatron_solo.format.layout import (
    PATCH_DIM,
    grid_shape,
    image_layout,
    image_token_count,
    image_tokens,
    patchify,
    unpatchify,
)

GRIDS = [(1, 1), (1, 32), (32, 1), (3, 5), (5, 3), (32, 32)]
IDS = dict(vision_id=32000, vpatch_id=32001, row_sep_id=32002, vision_end_id=32004)


def numpy_patchify(img: np.ndarray) -> np.ndarray:
    """Independent reference: (H, W, 3) -> (n_h*n_w, 3072), channel-first (c, y, x) inside a patch, row-major."""
    h, w, _ = img.shape
    n_h, n_w = h // 32, w // 32
    return img.reshape(n_h, 32, n_w, 32, 3).transpose(0, 2, 4, 1, 3).reshape(n_h * n_w, 3 * 32 * 32)


def test_constants():
    assert layout.PATCH_SIZE == 32 and PATCH_DIM == 3072


@pytest.mark.parametrize("n_h,n_w", GRIDS)
def test_patchify_matches_reference_and_round_trips(n_h, n_w):
    rng = np.random.default_rng(n_h * 100 + n_w)
    img = rng.integers(0, 256, (n_h * 32, n_w * 32, 3), dtype=np.uint8)
    patches = patchify(img)
    assert patches.dtype == np.uint8 and patches.shape == (n_h * n_w, 3072)
    np.testing.assert_array_equal(patches, numpy_patchify(img))
    back = unpatchify(patches, n_h, n_w)
    assert back.dtype == np.uint8 and back.shape == img.shape
    assert np.array_equal(back, img)  # bit for bit
    assert grid_shape(img) == (n_h, n_w)


def test_patch_vector_layout_by_hand():
    img = np.zeros((64, 96, 3), dtype=np.uint8)
    img[33, 70, 2] = 7  # patch row 1, col 2 -> index 1*3+2 = 5; inside: c=2, y=1, x=6
    patches = patchify(img)
    assert np.flatnonzero(patches).tolist() == [5 * 3072 + 2 * 1024 + 1 * 32 + 6]


def test_non_contiguous_input():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 256, (128, 192, 3), dtype=np.uint8)
    view = big[::2, ::-1][:64, :96]  # strided + negative stride
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(patchify(view), patchify(np.ascontiguousarray(view)))


def test_threads_give_identical_results():
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(patchify, imgs))
    for img, p in zip(imgs, out):
        np.testing.assert_array_equal(p, numpy_patchify(img))


def test_shape_and_dtype_errors_are_clear():
    with pytest.raises(ValueError, match=r"multiples of 32.*33x64"):
        patchify(np.zeros((33, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"multiples of 32"):
        patchify(np.zeros((0, 64, 3), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\).*\(64, 64\)"):
        patchify(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        patchify(np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(TypeError, match="uint8.*float32"):
        patchify(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(6, 3072\).*2x3.*\(5, 3072\)"):
        unpatchify(np.zeros((5, 3072), np.uint8), 2, 3)
    with pytest.raises(TypeError, match="uint8"):
        unpatchify(np.zeros((6, 3072), np.int16), 2, 3)
    with pytest.raises(ValueError, match="at least 1x1"):
        unpatchify(np.zeros((0, 3072), np.uint8), 0, 3)
    with pytest.raises(ValueError, match="multiple of 32"):
        grid_shape(np.zeros((40, 64, 3), np.uint8))


@pytest.mark.parametrize("n_h,n_w", GRIDS + [(2, 7)])
def test_token_layout(n_h, n_w):
    ids, pidx = image_layout(n_h, n_w, **IDS)
    count = image_token_count(n_h, n_w)
    assert count == n_h * n_w + n_h - 1 + 2
    assert ids.dtype == np.int32 and pidx.dtype == np.int32 and len(ids) == len(pidx) == count
    assert ids[0] == IDS["vision_id"] and ids[-1] == IDS["vision_end_id"]
    assert ids[-2] == IDS["vpatch_id"]  # no separator after the last row
    # Row separators sit exactly between rows: after <vision> + i full rows + (i - 1) separators.
    sep_positions = np.flatnonzero(ids == IDS["row_sep_id"]).tolist()
    assert sep_positions == [1 + i * n_w + (i - 1) for i in range(1, n_h)]
    # Patch tokens carry 0..n-1 in row-major order; everything else -1.
    is_patch = ids == IDS["vpatch_id"]
    assert is_patch.sum() == n_h * n_w
    assert pidx[is_patch].tolist() == list(range(n_h * n_w))
    assert (pidx[~is_patch] == -1).all()
    assert set(ids.tolist()) <= set(IDS.values())


def test_token_layout_by_hand():
    ids, pidx = image_layout(2, 3, 10, 11, 12, 13)
    assert ids.tolist() == [10, 11, 11, 11, 12, 11, 11, 11, 13]
    assert pidx.tolist() == [-1, 0, 1, 2, -1, 3, 4, 5, -1]


def test_largest_image_costs_1057_tokens():
    assert image_token_count(32, 32) == 1057
    assert image_token_count(1, 1) == 3


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match="at least 1x1"):
        image_token_count(0, 4)
    with pytest.raises(ValueError, match="at least 1x1"):
        image_layout(3, 0, **IDS)


def test_image_tokens_uses_tokenizer_ids_and_never_targets_image_tokens():
    tok = SimpleNamespace(vision_id=5, vpatch_id=6, row_sep_id=7, vision_end_id=9)
    it = image_tokens(tok, 2, 2)
    assert it.token_ids.tolist() == [5, 6, 6, 7, 6, 6, 9]
    assert it.patch_index.tolist() == [-1, 0, 1, -1, 2, 3, -1]
    assert it.loss_mask.dtype == np.uint8 and not it.loss_mask.any() and len(it) == 7
