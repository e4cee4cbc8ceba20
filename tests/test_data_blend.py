"""megatron_solo.data.blend: --data-path parsing, weighted / vision-fraction blends of real shard sets, and the
deterministic, resumable order (any index, exact per-set passes, +-1 share at every prefix)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from megatron_solo import _C
from megatron_solo.data.blend import BlendedPacks, blending_indices, build_blend, parse_data_path
from megatron_solo.data.shards import ShardSet
from tests.test_packer import IDS, VISION

S = 256


def _image_docs(n: int, seed: int) -> list:
    """Image-heavy documents: a short caption and one or two small images."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        items = [rng.integers(3, 20000, size=int(rng.integers(2, 12)), dtype=np.int32)]
        for _ in range(int(rng.integers(1, 3))):
            h, w = (int(x) * 32 for x in rng.integers(1, 4, size=2))
            items.append(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
        docs.append((f"img{i}", items))
    return docs


def _text_docs(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [(f"txt{i}", [rng.integers(3, 20000, size=int(rng.integers(5, 150)), dtype=np.int32)]) for i in range(n)]


def _shard_set(d, docs, seq_length=S, shards=1, **ids) -> str:
    d.mkdir()
    per = -(-len(docs) // shards)
    for k in range(shards):
        prefix = d / f"shard_{k:05d}"
        b = _C.ShardBuilder(str(prefix), seq_length, {**IDS, **ids}, buffer_docs=64)
        for rid, items in docs[k * per : (k + 1) * per]:
            b.add_document(rid, items)
        b.finish()
    (d / "manifest.json").write_text(
        json.dumps({"seq_length": seq_length, "shards": [f"shard_{k:05d}" for k in range(shards)]})
    )
    return str(d)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    return dict(
        img=_shard_set(root / "img", _image_docs(120, 1), shards=2),
        txt=_shard_set(root / "txt", _text_docs(300, 2)),
        txt512=_shard_set(root / "txt512", _text_docs(40, 3), seq_length=512),
        other_ids=_shard_set(root / "other_ids", _text_docs(40, 4), pad=5),
    )


def _vision_tokens(pack) -> tuple[int, int]:
    real = int(pack.cu_seqlens[-1])
    return int((pack.tokens[:real] >= VISION).sum()), real


# ---- parsing ------------------------------------------------------------------------------------------------
def test_parse_data_path_weights_sizes_and_errors(sets, tmp_path):
    img, txt = sets["img"], sets["txt"]
    assert parse_data_path(["3", img, "1", txt]) == [(0.75, img), (0.25, txt)]
    n_img, n_txt = len(ShardSet(img)), len(ShardSet(txt))
    (w1, p1), (w2, p2) = parse_data_path([img, txt])  # no weights: by pack count (Megatron's rule)
    assert (p1, p2) == (img, txt) and w1 == pytest.approx(n_img / (n_img + n_txt)) and w1 + w2 == pytest.approx(1)
    assert parse_data_path([img]) == [(1.0, img)]
    with pytest.raises(ValueError, match="empty"):
        parse_data_path([])
    with pytest.raises(ValueError, match="mixes weights and paths"):
        parse_data_path(["0.5", img, txt])
    with pytest.raises(ValueError, match="mixes weights and paths"):
        parse_data_path([img, "0.5", txt])
    with pytest.raises(ValueError, match="mixes weights and paths"):
        parse_data_path(["0.5", img, "0.5"])
    with pytest.raises(ValueError, match="positive"):
        parse_data_path(["0", img, "1", txt])
    with pytest.raises(ValueError, match="positive"):
        parse_data_path(["-1", img, "1", txt])
    with pytest.raises(FileNotFoundError, match="not a shard-set directory"):
        parse_data_path(["1", img, "1", str(tmp_path / "nope")])


# ---- the schedule -------------------------------------------------------------------------------------------
def test_blending_indices_exact_counts_and_lag_below_one():
    rng = np.random.default_rng(0)
    cases = [[1], [0, 5], [3, 0, 7], [1, 1, 1, 997]] + [
        rng.integers(0, 60, size=int(rng.integers(1, 12))).tolist() for _ in range(60)
    ]
    for counts in cases:
        if sum(counts) == 0:
            continue
        set_index, sample_index = blending_indices(counts)
        n = sum(counts)
        cum = np.cumsum(np.eye(len(counts), dtype=np.int64)[set_index], axis=0)
        lag = cum - np.arange(1, n + 1)[:, None] * np.asarray(counts) / n
        assert np.abs(lag).max() < 1, counts
        np.testing.assert_array_equal(cum[-1], counts)
        for i in range(len(counts)):  # sample_in_epoch counts each set's samples 0, 1, 2, ...
            np.testing.assert_array_equal(sample_index[set_index == i], np.arange(counts[i]))


def test_weights_honoured_at_every_prefix_across_epochs(sets):
    blend = build_blend(["0.2", sets["img"], "0.5", sets["txt"], "0.3", sets["img"]], seed=7)
    n = len(blend)
    assert n == 2 * len(ShardSet(sets["img"])) + len(ShardSet(sets["txt"]))
    np.testing.assert_allclose(blend.weights, [0.2, 0.5, 0.3])
    assert np.abs(blend.epoch_counts - blend.weights * n).max() < 1 and blend.epoch_counts.sum() == n
    src = np.array([blend.source_of(g)[0] for g in range(3 * n + 17)])
    cum = np.cumsum(np.eye(3, dtype=np.int64)[src], axis=0)
    g = np.arange(1, len(src) + 1)[:, None]
    assert np.abs(cum - g * blend.epoch_counts / n).max() < 1  # realised weights, no drift over epochs
    assert np.abs(cum[:n] - g[:n] * blend.weights).max() < 2  # requested weights in epoch 0: +-1 plus rounding


def test_every_pack_once_per_set_pass_and_fresh_order_each_pass(sets):
    blend = build_blend(["1", sets["img"], "3", sets["txt"]], seed=3)
    sizes = blend.set_sizes
    streams: list[list[int]] = [[], []]
    for g in range(4 * len(blend)):
        i, j = blend.source_of(g)
        streams[i].append(j)
    for i, stream in enumerate(streams):
        passes = len(stream) // sizes[i]
        assert passes >= 2
        orders = [stream[p * sizes[i] : (p + 1) * sizes[i]] for p in range(passes)]
        for order in orders:
            assert sorted(order) == list(range(sizes[i]))
        assert orders[0] != orders[1]  # each pass reshuffled
        rest = stream[passes * sizes[i] :]
        assert len(set(rest)) == len(rest)


def test_deterministic_any_index_and_seed_dependent(sets):
    data_path = ["2", sets["img"], "1", sets["txt"]]
    a = build_blend(data_path, seed=11)
    b = build_blend(data_path, seed=11)
    c = build_blend(data_path, seed=12)
    idx = list(range(200)) + [len(a) - 1, len(a), 5 * len(a) + 3, 10**9 + 7, 2**40 + 1]
    seq_a = [a.source_of(g) for g in idx]
    assert seq_a == [b.source_of(g) for g in reversed(idx)][::-1]  # order of queries does not matter
    assert seq_a[:200] != [c.source_of(g) for g in idx][:200]
    d = pickle.loads(pickle.dumps(a))  # DataLoader workers, resume in a new process
    assert [d.source_of(g) for g in idx] == seq_a
    # pack contents really come from the named set/pack
    for g in (0, 1, 10**9 + 7):
        i, j = a.source_of(g)
        np.testing.assert_array_equal(a[g].tokens, a.sets[i][j].tokens)
        np.testing.assert_array_equal(a[g].patches, a.sets[i][j].patches)
    assert a.seq_length == S and a.token_ids.vpatch == IDS["vpatch"] and a.token_ids.pad == IDS["pad"]
    with pytest.raises(IndexError):
        a.source_of(-1)
    assert "samples/epoch" in a.describe()


def test_vision_fraction_solved_from_manifests_hits_target(sets):
    img, txt = ShardSet(sets["img"]), ShardSet(sets["txt"])
    share = {}
    for name, ss in (("img", img), ("txt", txt)):
        v = sum(s.meta["tokens_vision"] for s in ss.shards)
        t = sum(s.meta["tokens_total"] for s in ss.shards)
        share[name] = v / t
    assert share["txt"] == 0 and share["img"] > 0.5
    target = 0.3
    blend = build_blend([sets["img"], sets["txt"]], seed=5, vision_fraction=target)
    # measure on the packs actually served: whole passes of both sets (4 blend epochs)
    vision = real = 0
    for g in range(4 * len(blend)):
        v, t = _vision_tokens(blend[g])
        vision += v
        real += t
    assert vision / real == pytest.approx(target, abs=0.01)
    unweighted = build_blend([sets["img"], sets["txt"]], seed=5)
    assert abs(_served_share(unweighted) - target) > 0.05  # the solve changed something
    with pytest.raises(ValueError, match="unreachable"):
        build_blend([sets["img"], sets["txt"]], seed=5, vision_fraction=0.99)
    with pytest.raises(ValueError, match="unreachable"):
        build_blend([sets["txt"]], seed=5, vision_fraction=0.1)
    only_text = build_blend([sets["img"], sets["txt"]], seed=5, vision_fraction=0.0)
    np.testing.assert_allclose(only_text.weights, [0.0, 1.0])


def _served_share(blend: BlendedPacks) -> float:
    vision = real = 0
    for g in range(len(blend)):
        v, t = _vision_tokens(blend[g])
        vision, real = vision + v, real + t
    return vision / real


def test_mismatched_sets_rejected(sets):
    with pytest.raises(ValueError, match="seq_length"):
        build_blend([sets["txt"], sets["txt512"]], seed=0)
    with pytest.raises(ValueError, match="different token ids"):
        build_blend([sets["txt"], sets["other_ids"]], seed=0)


def test_manifest_tokenizer_checksums_must_agree(sets, tmp_path):
    a = _shard_set(tmp_path / "a", _text_docs(10, 5))
    b = _shard_set(tmp_path / "b", _text_docs(10, 6))
    for d, checksum in ((a, "aaa"), (b, "bbb")):
        m = json.loads((tmp_path / d / "manifest.json").read_text())
        (tmp_path / d / "manifest.json").write_text(json.dumps({**m, "tokenizer": {"checksum": checksum}}))
    with pytest.raises(ValueError, match="different tokenizers"):
        build_blend([a, b], seed=0)
    assert len(build_blend([a, sets["txt"]], seed=0)) > 0  # a set without a recorded checksum is not refused
