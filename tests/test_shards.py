"""megatron_solo.data.shards: ShardSet / Pack over shards written by the C++ builder (format v2, stored targets)
and over a v1 shard written by megatron-core's own IndexedDatasetBuilder (targets derived by the v1 rule)."""

from __future__ import annotations

import gc
import json
import pickle

import numpy as np
import pytest

from megatron_solo import _C
from megatron_solo.data.shards import ShardSet, read_manifest
from megatron_solo.format.schema import shard_files
from megatron_solo.preprocess.validate import validate
from tests.test_packer import (
    BOS,
    EOS,
    IDS,
    MARK0,
    PAD,
    VISION,
    VPATCH,
    _chat_corpus,
    build,
    expected_layout,
    expected_targets,
    images_of,
    make_corpus,
)

S = 512


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shardset")
    docs = make_corpus(160, seed=11)
    stats = [build(d / f"shard_{k:05d}", docs[k * 80 : (k + 1) * 80], S, buffer_docs=16) for k in range(2)]
    (d / "manifest.json").write_text(
        json.dumps({"seq_length": S, "shards": [{"prefix": f"shard_{k:05d}"} for k in range(2)]})
    )
    return d, docs, stats


def test_pack_fields_match_what_was_fed(shard_dir):
    d, docs, stats = shard_dir
    ss = ShardSet(d)
    assert len(ss) == sum(s["packs"] for s in stats) and ss.seq_length == S
    seen = []
    for i in range(len(ss)):
        p = ss[i]
        assert p.tokens.dtype == np.int32 and p.tokens.shape == (S,)
        assert p.targets.dtype == np.uint8 and p.targets.shape == (S,)
        assert p.patches.dtype == np.uint8 and p.patches.shape == ((p.tokens == VPATCH).sum(), 3072)
        assert p.cu_seqlens.dtype == np.int32 and p.cu_seqlens[0] == 0
        assert p.doc_has_image.dtype == np.bool_ and p.doc_has_image.shape == (len(p.cu_seqlens) - 1,)
        assert not p.patches.flags.writeable  # a view into the mmap, not a copy
        assert np.all(p.tokens[p.cu_seqlens[-1] :] == PAD) and not p.targets[p.cu_seqlens[-1] :].any()
        p0 = 0
        for k, (a, b) in enumerate(zip(p.cu_seqlens[:-1], p.cu_seqlens[1:])):
            tokens = p.tokens[a:b]
            j = int(tokens[1]) - MARK0
            seen.append(j)
            items = docs[j][1]
            want, images = expected_layout(items)
            np.testing.assert_array_equal(tokens, want)
            # targets (pre-training default), independently: every text-item token and EOS; not BOS, image layouts
            want_mask = np.concatenate(
                [[0]]
                + [
                    np.zeros(_C.image_token_count(it.shape[0] // 32, it.shape[1] // 32))
                    if it.dtype == np.uint8
                    else np.ones(len(it))
                    for it in items
                ]
                + [[1]]
            )
            np.testing.assert_array_equal(p.targets[a:b], want_mask)
            assert p.doc_has_image[k] == bool(images)
            n = int((tokens == VPATCH).sum())
            for g, w in zip(images_of(tokens, p.patches[p0 : p0 + n]), images):
                np.testing.assert_array_equal(g, w)
            p0 += n
    assert sorted(seen) == list(range(len(docs)))


def test_from_prefixes_equals_manifest_and_pack_outlives_set(shard_dir):
    d, _, _ = shard_dir
    a = ShardSet(d)
    b = ShardSet.from_prefixes([d / "shard_00000", d / "shard_00001"], S)
    assert len(a) == len(b)
    for i in (0, len(a) // 2, -1):
        np.testing.assert_array_equal(a[i].tokens, b[i].tokens)
        np.testing.assert_array_equal(a[i].patches, b[i].patches)
    last = b[-1]
    want = last.patches.copy()
    del b
    gc.collect()
    np.testing.assert_array_equal(last.patches, want)  # the view keeps its mmap alive
    with pytest.raises(IndexError):
        a[len(a)]
    with pytest.raises(ValueError, match="seq_length"):
        ShardSet.from_prefixes([d / "shard_00000"], 1024)
    assert read_manifest(d)["seq_length"] == S
    c = pickle.loads(pickle.dumps(a))  # DataLoader workers get the set pickled
    np.testing.assert_array_equal(c[3].patches, a[3].patches)


def test_incomplete_shard_is_refused(tmp_path):
    build(tmp_path / "s", [("a", [np.array([BOS + 5], np.int32)])], 64)
    (tmp_path / "s.json").unlink()  # as if the job died before the final rename
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ShardSet.from_prefixes([tmp_path / "s"], 64)
    assert [f.rsplit("/", 1)[-1] for f in shard_files(tmp_path / "s")][-1] == "s.json"


def test_stored_targets_read_back_per_document(tmp_path):
    """Instruction-tuning-shaped targets (per turn, mid-document EOS, eos_target) come back as Pack.targets."""
    docs = _chat_corpus(60, seed=31)
    build(tmp_path / "s", docs, S, buffer_docs=8)
    ss = ShardSet.from_prefixes([tmp_path / "s"])
    n = 0
    for i in range(len(ss)):
        p = ss[i]
        for a, b in zip(p.cu_seqlens[:-1], p.cu_seqlens[1:]):
            _, items, flags, eos_target = docs[int(p.tokens[a + 1]) - MARK0]
            np.testing.assert_array_equal(p.targets[a:b], expected_targets(items, flags, eos_target))
            n += 1
    assert n == len(docs)


def _write_v1_shard(prefix, docs, seq_length: int) -> None:
    """A format-v1 shard (tokens, patches, docs; no targets part) written by megatron-core's IndexedDatasetBuilder
    from the reference layout, one document per pack, and the v1 sidecar of docs/shard_format.md."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    parts = {"tokens": np.int32, "patches": np.uint8, "docs": np.int32}
    builders = {k: IndexedDatasetBuilder(f"{prefix}.{k}.bin", dtype=dt) for k, dt in parts.items()}
    n_vis = 0
    for _, items in docs:
        tokens, images = expected_layout(items)
        n_vis += int(np.isin(tokens, [VISION, VPATCH, 32002, 32004]).sum())
        pack = np.full(seq_length, PAD, np.int32)
        pack[: len(tokens)] = tokens
        patches = [_C.patchify(im) for im in images]
        flat = np.concatenate(patches).reshape(-1) if patches else np.zeros(0, np.uint8)
        for k, arr in (("tokens", pack), ("patches", flat), ("docs", np.array([0, len(tokens)], np.int32))):
            builders[k].add_item(torch.from_numpy(arr))
            builders[k].end_document()
    for k, b in builders.items():
        b.finalize(f"{prefix}.{k}.idx")
    real = sum(len(expected_layout(items)[0]) for _, items in docs)
    sidecar = {
        "format": "solo-shard",
        "format_version": 1,
        "seq_length": seq_length,
        "patch_dim": 3072,
        "token_ids": {**IDS, "first_special": VISION},
        "packs": len(docs),
        "documents": len(docs),
        "input_documents": len(docs),
        "images": sum(len(expected_layout(items)[1]) for _, items in docs),
        "patches": sum(im.shape[0] * im.shape[1] // 1024 for _, items in docs for im in expected_layout(items)[1]),
        "tokens_total": real,
        "tokens_text": real - n_vis,
        "tokens_vision": n_vis,
        "pad_tokens": len(docs) * seq_length - real,
        "slots": len(docs) * seq_length,
        "text_docs_split": 0,
        "rejected": 0,
    }
    with open(f"{prefix}.json", "w") as f:
        json.dump(sidecar, f)


def test_a_v1_shard_reads_with_targets_derived_by_the_v1_rule(tmp_path):
    docs = make_corpus(12, seed=32, max_side=96)
    _write_v1_shard(tmp_path / "shard_00000", docs, S)
    ss = ShardSet.from_prefixes([tmp_path / "shard_00000"], S)
    assert ss.shards[0].version == 1 and ss.shards[0].targets is None
    for i, (_, items) in enumerate(docs):
        p = ss[i]
        n = int(p.cu_seqlens[-1])
        np.testing.assert_array_equal(p.tokens[:n], expected_layout(items)[0])
        np.testing.assert_array_equal(p.targets[:n], expected_targets(items))  # text items + EOS (v1 rule)
        assert not p.targets[n:].any()
    # validate: a v1 set (manifest without tokens_target) passes, its derived targets checked like stored ones
    man = {"seq_length": S, "shards": [{"prefix": "shard_00000", "packs": len(docs), "files": {}}]}
    man["shards"][0].update({k: ss.shards[0].meta[k] for k in ("images", "patches")})
    keys = ("packs", "documents", "images", "patches", "tokens_total", "tokens_vision")
    man["counts"] = {k: ss.shards[0].meta[k] for k in keys}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    problems, report = validate(tmp_path, checksums=False)
    assert problems == [], problems
    build(tmp_path / "v2", docs, S)  # a v2 shard of the same tokenizer reads beside it, with the same ids
    both = ShardSet.from_prefixes([tmp_path / "shard_00000", tmp_path / "v2"], S)
    assert both.shards[0].ids == both.shards[1].ids and both.shards[1].version == 2
    assert f"({sum(int(expected_targets(items).sum()) for _, items in docs)} targets)" in report


def test_a_v2_shard_without_its_targets_part_or_of_an_unknown_version_is_refused(tmp_path):
    build(tmp_path / "s", [("a", [np.array([BOS + 5, EOS], np.int32)])], 64)
    meta = json.loads((tmp_path / "s.json").read_text())
    (tmp_path / "s.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(ValueError, match=r"readable version \(1, 2\).*version 3"):
        ShardSet.from_prefixes([tmp_path / "s"], 64)
    (tmp_path / "s.json").write_text(json.dumps(meta))
    (tmp_path / "s.targets.idx").unlink()
    with pytest.raises(FileNotFoundError, match=r"v2 shard has parts .*'targets'.*missing .*s\.targets\.idx"):
        ShardSet.from_prefixes([tmp_path / "s"], 64)


def test_inspect_marks_every_target_token(tmp_path):
    """The inspect PNG puts a dot on exactly the tokens Pack.targets holds (SFT-shaped targets, not the v1 rule)."""
    from PIL import Image

    from megatron_solo.preprocess import inspect_pack as ip

    build(tmp_path / "shard_00000", _chat_corpus(20, seed=33), S, buffer_docs=8)
    (tmp_path / "manifest.json").write_text(json.dumps({"seq_length": S, "shards": ["shard_00000"]}))
    pack = ShardSet(tmp_path)[0]
    line = ip.render_pack(tmp_path, 0, tmp_path / "p.png")
    assert f"{int(pack.targets.sum())} loss targets" in line
    img = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    per_row, y0 = (ip.WIDTH - 20) // ip.CELL, 60
    dots = []
    for t in range(S):
        r, c = divmod(t, per_row)
        x, y = 10 + c * ip.CELL + ip.CELL // 2 - 2, y0 + r * ip.CELL + ip.CELL // 2 - 2
        dots.append(int(not img[y, x].any()))
    np.testing.assert_array_equal(dots, pack.targets)
