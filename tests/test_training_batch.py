"""One-process checks of the trainer's parts: Pack -> SoloBatch collation, the FLOPs count, flag parsing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_solo.data.batch import collate, to_solo_batch
from megatron_solo.data.shards import Pack
from megatron_solo.training.metrics import causal_pairs, training_flops

BOS, EOS, PAD, TXT, VPATCH, VIS = 1, 2, 0, 50, 1001, 1000


def _pack(docs: list[list[int]], s: int, images: dict[int, int]) -> Pack:
    """Documents of token ids (VPATCH marks a patch) -> Pack; ``images[d]`` = number of patches of doc d."""
    tokens = np.full(s, PAD, dtype=np.int32)
    flat = [t for d in docs for t in d]
    tokens[: len(flat)] = flat
    cu = np.cumsum([0] + [len(d) for d in docs]).astype(np.int32)
    text = ((tokens != BOS) & (tokens < VIS)).astype(np.uint8)
    text[len(flat) :] = 0
    n_patch = int((tokens == VPATCH).sum())
    patches = np.arange(n_patch * 3072, dtype=np.int64).reshape(n_patch, 3072).astype(np.uint8)
    has_image = np.array([any(t == VPATCH for t in d) for d in docs])
    return Pack(tokens=tokens, targets=text, patches=patches, cu_seqlens=cu, doc_has_image=has_image)


def _reference_loss_mask(pack: Pack) -> np.ndarray:
    """Independent rule, position by position: the label (next token) is a target and in the same document."""
    s = len(pack.tokens)
    doc = np.full(s, -1)
    for d, (a, b) in enumerate(zip(pack.cu_seqlens[:-1], pack.cu_seqlens[1:])):
        doc[a:b] = d
    out = np.zeros(s, dtype=np.float32)
    for t in range(s - 1):
        if doc[t] >= 0 and doc[t] == doc[t + 1] and pack.targets[t + 1]:
            out[t] = 1
    return out


def test_collate_matches_the_solo_batch_contract():
    d0 = [BOS, TXT, TXT + 1, VIS, VPATCH, VPATCH, 1004, TXT + 2, EOS]  # image document
    d1 = [BOS, TXT + 3, TXT + 4, EOS]
    d2 = [TXT + 5, TXT + 6, TXT + 7]  # a split text chunk: no BOS; its first token is not d1's target
    packs = [_pack([d0, d1], 16, {0: 2}), _pack([d2, [BOS, VIS, VPATCH, 1004, TXT, EOS]], 16, {1: 1})]
    wire = collate(packs)
    assert wire.patches.dtype == torch.uint8 and wire.tokens.dtype == torch.int32  # compact on the wire
    b = to_solo_batch(wire)
    assert b.patches.dtype == torch.uint8 and b.patches.shape == (3, 3072)
    torch.testing.assert_close(b.patches, torch.from_numpy(np.concatenate([p.patches for p in packs])))
    assert b.tokens.shape == (2, 16) and b.tokens.dtype == torch.int64
    # labels = tokens shifted left per row
    assert torch.equal(b.labels[:, :-1], b.tokens[:, 1:])
    for r, p in enumerate(packs):
        np.testing.assert_array_equal(b.loss_mask[r].numpy(), _reference_loss_mask(p))
    # cu_seqlens over the flattened tokens, padding its own segment; positions restart per segment
    assert b.cu_seqlens.tolist() == [0, 9, 13, 16, 19, 25, 32]
    assert b.max_seqlen == 9 and b.pad_tokens == 3 + 7 and b.doc_lengths == [9, 4, 3, 6]
    assert b.position_ids[0].tolist() == list(range(9)) + list(range(4)) + list(range(3))
    assert b.position_ids[1].tolist() == list(range(3)) + list(range(6)) + list(range(7))
    want_vis = [[1] * 9 + [0] * 7, [0] * 3 + [1] * 6 + [0] * 7]
    assert b.vision_doc_mask.int().tolist() == want_vis
    assert b.num_real_tokens == 32 - 10


def test_loss_mask_follows_the_stored_targets():
    """Instruction-tuning targets (only the answer and its end token) reach loss_mask as stored, not re-derived."""
    d0 = [BOS, TXT, TXT + 1, EOS, TXT + 2, TXT + 3, EOS, EOS]  # prompt, EOS, answer, end of turn, closing EOS
    pack = _pack([d0, [BOS, TXT + 4, EOS]], 12, {})
    pack.targets[:] = 0
    pack.targets[[4, 5, 6]] = 1  # the answer and its end-of-turn EOS; the closing EOS is not a target
    pack.targets[9] = 1
    b = to_solo_batch(collate([pack]))
    np.testing.assert_array_equal(b.loss_mask[0].numpy(), _reference_loss_mask(pack))
    assert b.loss_mask[0].nonzero().squeeze(1).tolist() == [3, 4, 5, 8]


def test_collate_rejects_unequal_packs():
    with pytest.raises(ValueError, match="pack 1 has 8 tokens"):
        collate([_pack([[BOS, TXT, EOS]], 16, {}), _pack([[BOS, TXT, EOS]], 8, {})])


@pytest.mark.parametrize("length,window", [(1, None), (7, None), (7, 3), (7, 7), (7, 100), (40, 16)])
def test_causal_pairs_counts_every_visible_key(length, window):
    q = np.arange(length)[:, None]
    k = np.arange(length)[None, :]
    visible = (k <= q) & ((q - k) < (window or length))
    assert causal_pairs(length, window) == int(visible.sum())


def test_training_flops_formula():
    from megatron_solo.model import debug

    cfg = debug(
        vocab_size=1005, vpatch_id=1001, first_special_id=1000
    )  # hidden 64, 2 layers, 4 heads x 16, 2 KV groups, ffn 128 (gated), window 16
    h, layers, v_pad = 64, 2, cfg.padded_vocab_size
    per_layer = h * (4 + 2 * 2) * 16 + 4 * 16 * h + h * 256 + 128 * h
    dense = 2 * (layers * per_layer + h * v_pad)
    docs, patches = [20, 5], 3
    attn = 4 * 4 * 16 * (causal_pairs(20, 16) + causal_pairs(5, 16)) * layers
    want = 3 * (dense * 25 + 2 * 3072 * h * patches + attn)
    assert training_flops(cfg, docs, patches) == pytest.approx(want)
    # window-aware: a longer window over the 20-token document adds work
    cfg_full = debug(vocab_size=1005, vpatch_id=1001, first_special_id=1000, window_size=None)
    assert training_flops(cfg_full, docs, patches) > training_flops(cfg, docs, patches)


def test_flags_map_to_component_configs():
    from megatron_solo.training.arguments import model_config, parse_args

    a = parse_args(
        "--data-path 0.3 /a 0.7 /b --train-iters 10 --lr 5e-5 --min-lr 5e-6 --lr-warmup-iters 2 --weight-decay 0.1 "
        "--clip-grad 1.0 --tensor-model-parallel-size 2 --use-distributed-optimizer --micro-batch-size 1 "
        "--global-batch-size 8 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 "
        "--model debug --hidden-size 128".split()
    )
    assert a.data.data_path == ["0.3", "/a", "0.7", "/b"]
    assert (a.optim.lr, a.optim.min_lr, a.optim.weight_decay, a.optim.clip_grad) == (5e-5, 5e-6, 0.1, 1.0)
    assert a.optim.use_distributed_optimizer and a.parallel.use_distributed_optimizer
    assert (a.train.global_batch_size, a.train.micro_batch_size, a.sched.lr_warmup_iters) == (8, 1, 2)
    cfg = model_config(a, vocab_size=1005, seq_length=256, special_ids=(1001, 1000))
    assert (cfg.hidden_size, cfg.tensor_model_parallel_size, cfg.seq_length) == (128, 2, 256)
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "uniform", 1)
    assert cfg.calculate_per_token_loss and cfg.vpatch_id == 1001 and cfg.max_position_embeddings == 256


class _NoRead:
    """Patches whose bytes cannot be read (a stage that does not need them must not touch them): a length only."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __array__(self, *args, **kwargs):
        raise AssertionError("patches were read")


def _demo_packs(n: int) -> list[Pack]:
    d0 = [BOS, TXT, VIS, VPATCH, VPATCH, 1004, TXT + 2, EOS]
    return [_pack([d0, [BOS, TXT + r, EOS]][: 1 + r % 2], 16, {0: 2}) for r in range(n)]


def test_collate_reads_only_what_the_pipeline_stage_needs():
    from megatron_solo.model.pipeline import StageNeeds

    packs = _demo_packs(2)
    full = to_solo_batch(collate(packs))
    unread = [Pack(p.tokens, p.targets, _NoRead(2), p.cu_seqlens, p.doc_has_image) for p in packs]
    with pytest.raises(AssertionError, match="patches were read"):  # the guard works
        collate(unread)
    middle = to_solo_batch(collate(unread, StageNeeds(inputs=False, targets=False)))
    last = to_solo_batch(collate(unread, StageNeeds(inputs=False, targets=True)))
    first = to_solo_batch(collate(packs, StageNeeds(inputs=True, targets=False)))
    for b in (middle, last, first):  # every stage: the packed-attention segments and the accounting
        assert torch.equal(b.cu_seqlens, full.cu_seqlens) and b.max_seqlen == full.max_seqlen
        assert (b.shape, b.num_patches, b.pad_tokens, b.doc_lengths) == ((2, 16), 4, full.pad_tokens, full.doc_lengths)
    assert middle.tokens is middle.patches is middle.loss_mask is middle.vision_doc_mask is None
    assert (
        last.patches is None and torch.equal(last.labels, full.labels) and torch.equal(last.loss_mask, full.loss_mask)
    )
    assert torch.equal(last.vision_doc_mask, full.vision_doc_mask)
    assert (
        first.loss_mask is None and torch.equal(first.tokens, full.tokens) and torch.equal(first.patches, full.patches)
    )
    assert torch.equal(first.position_ids, full.position_ids)


class _Packs:
    """A dataset of packs that records which samples were read (and can fail on one)."""

    def __init__(self, n: int, bad: int | None = None):
        self.packs, self.bad, self.read = _demo_packs(n), bad, []

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, g: int) -> Pack:
        if g == self.bad:
            raise ValueError(f"corrupt pack {g}")
        self.read.append(g)
        return self.packs[g]


def _same(a, b) -> bool:
    return all(
        torch.equal(x.tokens, y.tokens)
        and torch.equal(x.patches, y.patches)
        and torch.equal(x.cu_seqlens, y.cu_seqlens)
        for x, y in zip(a, b, strict=True)
    )


def test_prefetching_loader_keeps_the_exact_order_across_steps_and_jumps():
    from megatron_solo import parallel
    from megatron_solo.data.batch import BatchLoader

    parallel.initialize(tensor_model_parallel_size=1)
    data = _Packs(40)
    sync = BatchLoader(data, 4, 2, prefetch=False)
    ahead = BatchLoader(data, 4, 2, prefetch=True)
    try:
        # consecutive steps, then a jump (a resume / another position), then a step back
        for consumed in (0, 4, 8, 20, 24, 4):
            assert _same(ahead.step(consumed), sync.step(consumed)), consumed
        data.read.clear()
        ahead.step(28)  # was not prefetched (the last step asked for 4): read now, then 32..35 in the background
        ahead._ahead[1].result()
        assert data.read == list(range(28, 36))
        data.read.clear()
        assert _same(ahead.step(32, next_consumed=0), sync.step(32))  # prefetched; then step 0 (as evaluate does)
        ahead._ahead[1].result()
        assert sorted(data.read) == [*range(4), *range(32, 36)]  # the synchronous 32..35, the prefetched 0..3
        assert _same(ahead.step(0), sync.step(0))
    finally:
        ahead.close()


def test_prefetching_loader_raises_a_reader_error_in_the_step_that_needs_it():
    from megatron_solo import parallel
    from megatron_solo.data.batch import BatchLoader

    parallel.initialize(tensor_model_parallel_size=1)
    loader = BatchLoader(_Packs(40, bad=6), 4, 2, prefetch=True)
    try:
        loader.step(0)  # fine; samples 4..7 (with the bad one) are read in the background
        with pytest.raises(ValueError, match="corrupt pack 6"):
            loader.step(4)
    finally:
        loader.close()
