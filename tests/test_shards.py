"""megatron_solo.data.shards: ShardSet / Pack over shards written by the C++ builder."""

from __future__ import annotations

import gc
import json
import pickle

import numpy as np
import pytest

from megatron_solo import _C
from megatron_solo.data.shards import ShardSet, read_manifest, shard_files
from tests.test_packer import (
    BOS,
    MARK0,
    PAD,
    VPATCH,
    build,
    expected_layout,
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
        assert p.text_mask.dtype == np.uint8 and p.text_mask.shape == (S,)
        assert p.patches.dtype == np.uint8 and p.patches.shape == ((p.tokens == VPATCH).sum(), 3072)
        assert p.cu_seqlens.dtype == np.int32 and p.cu_seqlens[0] == 0
        assert p.doc_has_image.dtype == np.bool_ and p.doc_has_image.shape == (len(p.cu_seqlens) - 1,)
        assert not p.patches.flags.writeable  # a view into the mmap, not a copy
        assert np.all(p.tokens[p.cu_seqlens[-1] :] == PAD) and not p.text_mask[p.cu_seqlens[-1] :].any()
        p0 = 0
        for k, (a, b) in enumerate(zip(p.cu_seqlens[:-1], p.cu_seqlens[1:])):
            tokens = p.tokens[a:b]
            j = int(tokens[1]) - MARK0
            seen.append(j)
            items = docs[j][1]
            want, images = expected_layout(items)
            np.testing.assert_array_equal(tokens, want)
            # text_mask, independently: 1 on every text-item token and EOS; 0 on BOS and image layouts
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
            np.testing.assert_array_equal(p.text_mask[a:b], want_mask)
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
