"""Typed Python face of the C++ SOLO format rule in ``megatron_solo._C`` (csrc/format.cpp).

This module is the only Python caller of ``_C``'s format functions; the rule itself lives in C++ only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from megatron_solo import _C
from megatron_solo.format.schema import PATCH_DIM, PATCH_SIZE  # noqa: F401 (re-exported: the format's face)

if TYPE_CHECKING:
    from megatron_solo.format.tokens import SoloTokenizer


def patchify(img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8[H, W, 3] (H, W multiples of 32) -> uint8[n_h*n_w, 3072], channel-first (c, y, x), patches row-major.
    ``out``: write into this writable C-contiguous uint8 array of n_h*n_w*3072 bytes (any shape) and return it."""
    return _C.patchify(img) if out is None else _C.patchify(img, out=out)


def unpatchify(patches: np.ndarray, n_h: int, n_w: int) -> np.ndarray:
    """uint8[n_h*n_w, 3072] -> uint8[n_h*32, n_w*32, 3]; the exact inverse of :func:`patchify`."""
    return _C.unpatchify(patches, int(n_h), int(n_w))


def grid_shape(img: np.ndarray) -> tuple[int, int]:
    """(n_h, n_w) patch grid of a resized uint8[H, W, 3] image."""
    h, w = img.shape[:2]
    if h % PATCH_SIZE or w % PATCH_SIZE or h <= 0 or w <= 0:
        raise ValueError(f"image of {h}x{w} (H x W) is not a positive multiple of {PATCH_SIZE} on both sides")
    return h // PATCH_SIZE, w // PATCH_SIZE


def patch_grid(img: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8[H, W, 3] -> its patch grid uint8[n_h, n_w, 3072]: the form in which preprocess workers hand images to
    ``ShardBuilder.add_document``, which then copies the patches instead of patchifying. ``out`` as in patchify."""
    n_h, n_w = grid_shape(img)
    return patchify(img, out).reshape(n_h, n_w, PATCH_DIM)


def image_token_count(n_h: int, n_w: int) -> int:
    """Tokens an n_h x n_w image costs: n_h*n_w + (n_h - 1) row separators + <vision> + </vision>."""
    return int(_C.image_token_count(int(n_h), int(n_w)))


def image_layout(
    n_h: int, n_w: int, vision_id: int, vpatch_id: int, row_sep_id: int, vision_end_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(token_ids int32[T], patch_index int32[T]) of ``<vision>`` rows of ``<vpatch>`` joined by ``<vrow_sep>``
    ``</vision>``; patch_index is the row-major patch number at each ``<vpatch>`` and -1 elsewhere."""
    return _C.image_layout(int(n_h), int(n_w), int(vision_id), int(vpatch_id), int(row_sep_id), int(vision_end_id))


@dataclass(frozen=True)
class ImageTokens:
    """Per-token arrays of one image: ids, patch index (-1 for non-patch), loss mask (always 0: never a target)."""

    token_ids: np.ndarray  # int32[T]
    patch_index: np.ndarray  # int32[T]
    loss_mask: np.ndarray  # uint8[T], all zero

    def __len__(self) -> int:
        return len(self.token_ids)


def image_tokens(tokenizer: SoloTokenizer, n_h: int, n_w: int) -> ImageTokens:
    """The token layout of an n_h x n_w image with ``tokenizer``'s vision ids."""
    ids, pidx = image_layout(
        n_h, n_w, tokenizer.vision_id, tokenizer.vpatch_id, tokenizer.row_sep_id, tokenizer.vision_end_id
    )
    return ImageTokens(ids, pidx, np.zeros(len(ids), dtype=np.uint8))
