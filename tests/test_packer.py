"""The C++ shard packer (megatron_solo._C.ShardBuilder / plan_packs), read back through Megatron's own
IndexedDataset and compared with the documents we fed it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_solo import _C

BOS, EOS, PAD = 1, 2, 0
VISION, VPATCH, ROW_SEP, VISION_END = 32000, 32001, 32002, 32004
IDS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD, vision_id=VISION, vpatch_id=VPATCH, row_sep_id=ROW_SEP,
           vision_end_id=VISION_END)  # fmt: skip
MARK0 = 20000  # first text token of document i is MARK0 + i: identifies documents in the output


def make_corpus(n_docs: int, seed: int, max_text: int = 200, max_side: int = 128) -> list[tuple[str, list]]:
    """Random documents: a unique marker token, then text runs and small images in random order."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n_docs):
        items: list[np.ndarray] = [np.array([MARK0 + i], dtype=np.int32)]
        for _ in range(rng.integers(0, 4)):
            if rng.random() < 0.4:
                h, w = (int(x) * 32 for x in rng.integers(1, max_side // 32 + 1, size=2))
                items.append(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
            else:
                items.append(rng.integers(3, MARK0, size=int(rng.integers(0, max_text)), dtype=np.int32))
        docs.append((f"rec{i}", items))
    return docs


def expected_layout(items: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Independent reference: [BOS] + text / image layouts + [EOS], and the document's images in order."""
    parts, images = [np.array([BOS], np.int32)], []
    for it in items:
        if it.dtype == np.uint8:
            n_h, n_w = it.shape[0] // 32, it.shape[1] // 32
            rows = [np.full(n_w, VPATCH, np.int32) for _ in range(n_h)]
            seq = [VISION]
            for r, row in enumerate(rows):
                seq += ([ROW_SEP] if r else []) + row.tolist()
            parts.append(np.array(seq + [VISION_END], np.int32))
            images.append(it)
        else:
            parts.append(it.astype(np.int32))
    parts.append(np.array([EOS], np.int32))
    return np.concatenate(parts), images


def build(prefix: Path, docs, seq_length: int, **kw) -> dict:
    b = _C.ShardBuilder(str(prefix), seq_length, **IDS, **kw)
    for rid, items in docs:
        b.add_document(rid, items)
    return b.finish()


def read_packs(prefix: Path, seq_length: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, cu_seqlens, patches[P, 3072]) per pack, through megatron-core's IndexedDataset."""
    tok = IndexedDataset(f"{prefix}.tokens")
    pat = IndexedDataset(f"{prefix}.patches")
    cus = IndexedDataset(f"{prefix}.docs")
    assert tok.index.dtype == np.int32 and pat.index.dtype == np.uint8 and cus.index.dtype == np.int32
    assert len(tok) == len(pat) == len(cus)
    for ds in (tok, pat, cus):  # one Megatron "document" per pack
        np.testing.assert_array_equal(ds.document_indices, np.arange(len(tok) + 1))
    np.testing.assert_array_equal(tok.sequence_lengths, np.full(len(tok), seq_length))
    # copies: IndexedDataset.__del__ closes its mmap, so views must not outlive the datasets
    return [(tok[i].copy(), cus[i].copy(), pat[i].reshape(-1, 3072).copy()) for i in range(len(tok))]


def split_documents(packs) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every output document as (tokens, patches), checking pack invariants on the way."""
    out = []
    for tokens, cu, patches in packs:
        assert cu[0] == 0 and np.all(np.diff(cu) > 0), cu
        assert cu[-1] <= len(tokens)
        assert np.all(tokens[cu[-1] :] == PAD)
        assert int((tokens == VPATCH).sum()) == len(patches)
        p0 = 0
        for a, b in zip(cu[:-1], cu[1:]):
            doc = tokens[a:b]
            n = int((doc == VPATCH).sum())
            out.append((doc.copy(), patches[p0 : p0 + n]))
            p0 += n
    return out


def images_of(doc_tokens: np.ndarray, patches: np.ndarray) -> list[np.ndarray]:
    """Reconstruct a document's images from its layout (rows between <vision>/</vision>) and patches."""
    imgs, p0 = [], 0
    starts = np.flatnonzero(doc_tokens == VISION)
    ends = np.flatnonzero(doc_tokens == VISION_END)
    for s, e in zip(starts, ends):
        body = doc_tokens[s + 1 : e]
        n_h = int((body == ROW_SEP).sum()) + 1
        n_w = int(np.argmax(body == ROW_SEP)) if n_h > 1 else len(body)
        imgs.append(_C.unpatchify(np.ascontiguousarray(patches[p0 : p0 + n_h * n_w]), n_h, n_w))
        p0 += n_h * n_w
    assert p0 == len(patches)
    return imgs


def test_every_token_and_patch_exactly_once_and_images_bit_exact(tmp_path):
    S = 512
    docs = make_corpus(300, seed=0)
    stats = build(tmp_path / "s", docs, S, buffer_docs=32, threads=2)
    packs = read_packs(tmp_path / "s", S)
    out = split_documents(packs)
    assert stats["packs"] == len(packs) and stats["documents"] == len(out) == 300
    assert stats["rejected"] == [] and stats["text_docs_split"] == 0
    seen = set()
    for tokens, patches in out:
        i = int(tokens[1]) - MARK0
        assert i not in seen
        seen.add(i)
        want_tokens, want_images = expected_layout(docs[i][1])
        np.testing.assert_array_equal(tokens, want_tokens)
        got_images = images_of(tokens, patches)
        assert len(got_images) == len(want_images)
        for g, w in zip(got_images, want_images):
            np.testing.assert_array_equal(g, w)  # bit for bit
    assert seen == set(range(300))
    # counts
    real = sum(int(cu[-1]) for _, cu, _ in packs)
    n_vision = sum(int(np.isin(t[: cu[-1]], [VISION, VPATCH, ROW_SEP, VISION_END]).sum()) for t, cu, _ in packs)
    assert stats["tokens_total"] == real == sum(len(expected_layout(items)[0]) for _, items in docs)
    assert stats["tokens_vision"] == n_vision and stats["tokens_text"] == real - n_vision
    assert stats["patches"] == sum(len(p) for _, _, p in packs)
    assert stats["images"] == sum(1 for _, items in docs for it in items if it.dtype == np.uint8)
    assert stats["slots"] == len(packs) * S and stats["pad_tokens"] == stats["slots"] - real


def test_long_text_split_and_drop(tmp_path):
    S = 256
    long_doc = np.arange(3, 3 + 3 * S + 17, dtype=np.int32)  # [BOS] + 785 + [EOS] = 787 tokens -> 256, 256, 256, 19
    docs = [("short", [np.array([MARK0], np.int32)]), ("long", [long_doc])]
    stats = build(tmp_path / "split", docs, S, buffer_docs=4)
    assert stats["text_docs_split"] == 1 and stats["rejected"] == []
    out = split_documents(read_packs(tmp_path / "split", S))
    chunks = sorted((t for t, _ in out if len(t) != 3), key=lambda t: -1 if t[0] == BOS else int(t[0]))
    assert [len(c) for c in chunks] == [S, S, S, 3 * S + 19 - 3 * S]
    np.testing.assert_array_equal(np.concatenate(chunks), expected_layout([long_doc])[0])

    stats = build(tmp_path / "drop", docs, S, buffer_docs=4, long_text="drop")
    assert stats["rejected"] == [("long", "long_text_dropped")]
    assert stats["documents"] == 1 and stats["tokens_total"] == 3


def test_mixed_long_document_never_cuts_an_image(tmp_path):
    S = 256
    img = np.random.default_rng(1).integers(0, 256, size=(160, 192, 3), dtype=np.uint8)  # 5x6: 30+4+2 = 36 tokens
    items = [np.arange(3, 203, dtype=np.int32), img, np.arange(3, 303, dtype=np.int32), img]
    stats = build(tmp_path / "m", [("mixed", items)], S, buffer_docs=4)
    assert stats["text_docs_split"] == 1 and stats["images"] == 2
    out = split_documents(read_packs(tmp_path / "m", S))
    assert all(len(t) <= S for t, _ in out)
    for tokens, patches in out:  # every chunk holds whole images only
        assert (tokens == VISION).sum() == (tokens == VISION_END).sum()
        for g in images_of(tokens, patches):
            np.testing.assert_array_equal(g, img)
    assert sum(len(t) for t, _ in out) == len(expected_layout(items)[0])


def test_images_that_cannot_fit_a_pack_are_rejected(tmp_path):
    S = 512
    big = np.zeros((768, 768, 3), np.uint8)  # 576 patches > 512
    mid = np.zeros((448, 448, 3), np.uint8)  # 14x14: 196+13+2 = 211 tokens; three of them = 633 > 512
    docs = [("ok", [np.array([MARK0], np.int32)]), ("big", [big]), ("three", [mid, mid, mid])]
    stats = build(tmp_path / "r", docs, S, buffer_docs=4)
    assert stats["rejected"] == [("big", "images_exceed_pack"), ("three", "images_exceed_pack")]
    assert stats["documents"] == 1 and stats["patches"] == 0 and stats["images"] == 0


def test_bad_items_raise_with_record_id(tmp_path):
    b = _C.ShardBuilder(str(tmp_path / "bad"), 256, **IDS)
    with pytest.raises(ValueError, match="rec7.*multiples of 32"):
        b.add_document("rec7", [np.zeros((30, 64, 3), np.uint8)])
    with pytest.raises(TypeError, match="rec8"):
        b.add_document("rec8", [np.zeros((4, 4), np.float32)])
    b.abort()


def test_deterministic_byte_identical_files(tmp_path):
    docs = make_corpus(120, seed=3)
    for name, threads in (("a", 1), ("b", 1), ("c", 3)):
        build(tmp_path / name, docs, 512, buffer_docs=16, threads=threads)
    for suffix in ("tokens.bin", "tokens.idx", "patches.bin", "patches.idx", "docs.bin", "docs.idx", "json"):
        a = (tmp_path / f"a.{suffix}").read_bytes()
        assert a == (tmp_path / f"b.{suffix}").read_bytes() == (tmp_path / f"c.{suffix}").read_bytes(), suffix


def test_no_final_files_without_finish(tmp_path):
    finals = [f"s.{p}.{e}" for p in ("tokens", "patches", "docs") for e in ("bin", "idx")] + ["s.json"]
    b = _C.ShardBuilder(str(tmp_path / "s"), 256, **IDS, buffer_docs=2)
    for rid, items in make_corpus(20, seed=4, max_side=64):
        b.add_document(rid, items)
    names = set(os.listdir(tmp_path))
    assert not names & set(finals)
    assert {"s.tokens.bin.tmp", "s.patches.bin.tmp", "s.docs.bin.tmp"} <= names
    del b  # never finished: the temp files go, nothing appears under a final name
    assert os.listdir(tmp_path) == []

    with pytest.raises(RuntimeError):
        with _C.ShardBuilder(str(tmp_path / "s"), 256, **IDS) as b:
            b.add_document("x", [np.array([5], np.int32)])
            raise RuntimeError("worker died")
    assert os.listdir(tmp_path) == []

    build(tmp_path / "s", [("x", [np.array([5], np.int32)])], 256)
    assert sorted(os.listdir(tmp_path)) == sorted(finals)


def test_text_only_and_empty_shards_read_back(tmp_path):
    stats = build(tmp_path / "t", [("a", [np.arange(3, 50, dtype=np.int32)])], 64)
    packs = read_packs(tmp_path / "t", 64)
    assert stats["packs"] == 1 and packs[0][2].shape == (0, 3072)
    stats = build(tmp_path / "e", [], 64)
    assert stats["packs"] == 0 and read_packs(tmp_path / "e", 64) == []


def test_plan_packs_fits_and_covers_every_token():
    rng = np.random.default_rng(5)
    lengths = np.concatenate([rng.integers(1, 900, 3000), [5000, 1024, 1025, 3 * 1024]])
    rng.shuffle(lengths)
    plan = _C.plan_packs(lengths, 1024, buffer_docs=256)
    off, doc, ln = plan["pack_offsets"], plan["piece_doc"], plan["piece_length"]
    fills = np.add.reduceat(ln, off[:-1])
    assert fills.max() <= 1024 and np.all(np.diff(off) > 0)
    np.testing.assert_array_equal(np.bincount(doc, weights=ln, minlength=len(lengths)), lengths)
    assert plan["split"] == 3 and len(plan["dropped"]) == 0
    assert fills.sum() / (1024 * len(fills)) > 0.98
    dropped = _C.plan_packs(lengths, 1024, buffer_docs=256, long_text="drop")["dropped"]
    np.testing.assert_array_equal(np.sort(lengths[dropped]), [1025, 3072, 5000])


def test_builder_packs_like_plan_packs_and_honours_byte_budget(tmp_path):
    rng = np.random.default_rng(6)
    lengths = rng.integers(1, 700, 400)
    docs = [(f"t{i}", [np.full(n, 3 + i, np.int32)]) for i, n in enumerate(lengths)]
    stats = build(tmp_path / "a", docs, 1024, buffer_docs=64)
    plan = _C.plan_packs(lengths + 2, 1024, buffer_docs=64)  # + BOS/EOS
    assert stats["packs"] == len(plan["pack_offsets"]) - 1  # the same routine
    out = split_documents(read_packs(tmp_path / "a", 1024))
    got = [int(t[1]) - 3 for t, _ in out]
    want = plan["piece_doc"].tolist()
    assert got == want  # same packs, same order

    # a byte budget (patches + tokens held in the buffer) forces early rounds; nothing is lost
    b = _C.ShardBuilder(str(tmp_path / "b"), 1024, **IDS, buffer_docs=4096, buffer_bytes=200_000)
    corpus = make_corpus(150, seed=7)
    for rid, items in corpus:
        b.add_document(rid, items)
        assert b.pending_documents < 150 // 2
    stats = b.finish()
    out = split_documents(read_packs(tmp_path / "b", 1024))
    assert stats["text_docs_split"] == 0 and stats["documents"] == 150
    assert sorted(int(t[1]) - MARK0 for t, _ in out) == list(range(150))
