"""Tiny SoloBatch-shaped inputs for the model tests, built by hand (independent of the data pipeline).

A document is ``[BOS] text [<vision> rows </vision>] text [EOS]``; documents are packed into rows of ``s`` tokens
with a pad tail, cu_seqlens run over the flattened ``b*s`` tokens (pad tail = its own segment).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_solo.model.config import FRAME_SEP_ID, ROW_SEP_ID, VISION_END_ID, VISION_ID, VPATCH_ID

BOS, EOS, PAD = 1, 2, 0
FIRST_SPECIAL = VISION_ID


@dataclass
class Doc:
    text_before: int
    image: tuple[int, int] | None = None  # (n_h, n_w) patches
    text_after: int = 0


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [b, s]
    labels: torch.Tensor  # int64 [b, s]
    loss_mask: torch.Tensor  # float32 [b, s]
    position_ids: torch.Tensor  # int64 [b, s]
    patches: torch.Tensor  # uint8 [P, 3072]
    cu_seqlens: torch.Tensor  # int32 [n+1] over b*s
    max_seqlen: int
    vision_doc_mask: torch.Tensor  # bool [b, s]
    doc_spans: list[tuple[int, int]]  # (start, end) of each real document in the flattened tokens
    doc_patch_spans: list[tuple[int, int]]  # rows of `patches` belonging to each document


def doc_tokens(doc: Doc, gen: torch.Generator, vocab_text: int = 32000) -> tuple[list[int], int]:
    """Token ids of one document and its number of patches."""
    toks = [BOS] + torch.randint(3, vocab_text, (doc.text_before,), generator=gen).tolist()
    n_patches = 0
    if doc.image is not None:
        n_h, n_w = doc.image
        toks.append(VISION_ID)
        for i in range(n_h):
            if i:
                toks.append(ROW_SEP_ID)
            toks += [VPATCH_ID] * n_w
        toks.append(VISION_END_ID)
        n_patches = n_h * n_w
    toks += torch.randint(3, vocab_text, (doc.text_after,), generator=gen).tolist() + [EOS]
    return toks, n_patches


def make_batch(rows: list[list[Doc]], s: int, seed: int = 0, patches: torch.Tensor | None = None) -> Batch:
    """Pack the documents of each row into ``s`` tokens (pad tail), SoloBatch style."""
    gen = torch.Generator().manual_seed(seed)
    b = len(rows)
    tokens = torch.full((b, s), PAD, dtype=torch.long)
    doc_id = torch.full((b * s,), -1, dtype=torch.long)
    vision_doc = torch.zeros(b * s, dtype=torch.bool)
    cu, spans, patch_spans = [0], [], []
    n_patch_total, d = 0, 0
    for r, docs in enumerate(rows):
        pos = 0
        for doc in docs:
            toks, n_p = doc_tokens(doc, gen)
            if pos + len(toks) > s:
                raise ValueError("documents do not fit the row")
            tokens[r, pos : pos + len(toks)] = torch.tensor(toks)
            start = r * s + pos
            doc_id[start : start + len(toks)] = d
            vision_doc[start : start + len(toks)] = doc.image is not None
            spans.append((start, start + len(toks)))
            patch_spans.append((n_patch_total, n_patch_total + n_p))
            n_patch_total += n_p
            pos += len(toks)
            cu.append(start + len(toks))
            d += 1
        if pos < s:
            cu.append((r + 1) * s)  # the pad tail is its own segment
    flat = tokens.reshape(-1)
    labels = torch.cat([flat[1:], flat.new_full((1,), PAD)])
    same_doc = torch.cat([doc_id[1:] == doc_id[:-1], torch.tensor([False])]) & (doc_id >= 0)
    is_text_label = (labels >= 3) & (labels < FIRST_SPECIAL) | (labels == EOS)
    loss_mask = (same_doc & is_text_label).float()
    cu_t = torch.tensor(cu, dtype=torch.int32)
    lengths = cu_t[1:] - cu_t[:-1]
    pos_ids = torch.arange(b * s) - torch.repeat_interleave(cu_t[:-1].long(), lengths.long())
    if patches is None:
        patches = torch.randint(0, 256, (n_patch_total, 3072), dtype=torch.uint8, generator=gen)
    assert patches.shape[0] == n_patch_total
    assert int((flat == VPATCH_ID).sum()) == n_patch_total and FRAME_SEP_ID > VPATCH_ID
    return Batch(
        tokens=tokens,
        labels=labels.reshape(b, s),
        loss_mask=loss_mask.reshape(b, s),
        position_ids=pos_ids.reshape(b, s),
        patches=patches,
        cu_seqlens=cu_t,
        max_seqlen=int(lengths.max()),
        vision_doc_mask=vision_doc.reshape(b, s),
        doc_spans=spans,
        doc_patch_spans=patch_spans,
    )


def standard_rows() -> list[list[Doc]]:
    """Two rows of 48 tokens: row 0 = image doc + text doc + pad, row 1 = text doc + image doc (image 2x3)."""
    return [
        [Doc(4, (2, 2), 5), Doc(12)],
        [Doc(9), Doc(3, (2, 3), 6)],
    ]
