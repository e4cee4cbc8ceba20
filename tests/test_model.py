"""SoloModel on one CPU process: configs, normalisation, packing isolation, image isolation, loss masking, vocab pad.

The multi-process parity checks (TP=2, TP=2+SP, TP=2 x DP=2) are in test_model_dist.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from megatron_solo import parallel
from megatron_solo.model import (
    SoloModel,
    add_losses,
    build_packed_seq_params,
    config_from_dict,
    config_to_dict,
    debug,
    mean_losses,
    padded_vocab_size,
    recipe,
    reduce_losses,
    solo_7b,
    solo_losses,
    tiny,
)
from megatron_solo.model.config import IMAGENET_MEAN, IMAGENET_STD, VPATCH_ID
from megatron_solo.model.projector import normalize_patches
from tests.workers.model_batches import PAD, Doc, make_batch

VOCAB = 32005


@pytest.fixture(scope="module")
def model() -> SoloModel:
    parallel.initialize(tensor_model_parallel_size=1)
    torch.manual_seed(0)
    m = SoloModel(debug(vocab_size=VOCAB))
    m.eval()
    return m


def _run(model, batch, labels=False, packed=True):
    psp = build_packed_seq_params(batch.cu_seqlens, batch.max_seqlen) if packed else None
    return model(
        batch.tokens, batch.position_ids, batch.patches, labels=batch.labels if labels else None, packed_seq_params=psp
    )


# ---- configs ------------------------------------------------------------------------------------------------
def test_solo_7b_is_mistral_7b_plus_vision():
    cfg = solo_7b(use_cpu_initialization=True)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (32, 4096, 32, 8)
    assert (cfg.ffn_hidden_size, cfg.kv_channels, cfg.layernorm_epsilon) == (14336, 128, 1e-5)
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and not cfg.add_bias_linear
    assert cfg.rotary_base == 10000 and cfg.sliding_window == 4096 and cfg.window_size == (4095, 0)
    assert cfg.patch_dim == 3072 and cfg.vpatch_id == 32001 and cfg.seq_length == 32768
    assert cfg.attention_dropout == 0.0 and cfg.hidden_dropout == 0.0
    assert cfg.params_dtype == (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    assert recipe("solo-7b").hidden_size == 4096 and recipe("tiny").hidden_size == tiny().hidden_size


def test_config_json_round_trip():
    import json

    cfg = solo_7b(use_cpu_initialization=True)
    arch = json.loads(json.dumps(config_to_dict(cfg)))
    again = config_from_dict(arch, tensor_model_parallel_size=2, use_cpu_initialization=True)
    assert config_to_dict(again) == arch and again.tensor_model_parallel_size == 2
    assert again.window_size == (4095, 0) and again.activation_func is cfg.activation_func


def test_config_rejects_bad_fields():
    with pytest.raises(TypeError, match="unknown SoloConfig field"):
        tiny(hidden_sise=3)
    with pytest.raises(ValueError, match="unknown model recipe"):
        recipe("solo-70b")
    with pytest.raises(ValueError, match="vpatch_id"):
        debug(vocab_size=1000)


def test_padded_vocab_size_multiple_of_128_tp():
    assert padded_vocab_size(33029, 1) == 33152  # released SOLO-7B (SOLO_SPEC.md)
    assert padded_vocab_size(32005, 1) == 32128
    assert padded_vocab_size(32005, 2) == 32256
    assert padded_vocab_size(32768, 2) == 32768
    for tp in (1, 2, 4, 8):
        p = padded_vocab_size(32005, tp)
        assert p % (128 * tp) == 0 and 0 <= p - 32005 < 128 * tp


# ---- normalisation ------------------------------------------------------------------------------------------
def test_normalisation_matches_imagenet_reference():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)  # H=32, W=64: two patches
    # reference: per-pixel float pipeline on the HWC image, then channel-first patches, row-major
    ref = (img.astype(np.float64) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    ref_patches = np.stack([ref[:, j * 32 : (j + 1) * 32].transpose(2, 0, 1).reshape(-1) for j in range(2)])
    raw = np.stack([img[:, j * 32 : (j + 1) * 32].transpose(2, 0, 1).reshape(-1) for j in range(2)])
    got = normalize_patches(torch.from_numpy(raw), IMAGENET_MEAN, IMAGENET_STD)
    np.testing.assert_allclose(got.numpy(), ref_patches, rtol=1e-6, atol=1e-6)
    # a slice normalises like the same columns of the whole (what each TP rank does with its input shard)
    part = normalize_patches(torch.from_numpy(raw), IMAGENET_MEAN, IMAGENET_STD, start=1000, end=2100)
    torch.testing.assert_close(part, got[:, 1000:2100], rtol=0, atol=0)
    with pytest.raises(TypeError, match="uint8"):
        normalize_patches(torch.zeros(2, 3072), IMAGENET_MEAN, IMAGENET_STD)


def test_projection_is_added_to_vpatch_embedding(model):
    batch = make_batch([[Doc(3, (1, 2), 2)]], s=16, seed=4)
    emb = model.embed(batch.tokens, batch.patches)  # [s, b, h]
    we = model.language_model.embedding.word_embeddings.weight
    w = model.vision_projector.weight
    expect = we[batch.tokens[0]].clone()
    pos = (batch.tokens[0] == VPATCH_ID).nonzero().squeeze(1)
    expect[pos] += normalize_patches(batch.patches, IMAGENET_MEAN, IMAGENET_STD) @ w.T
    torch.testing.assert_close(emb[:, 0], expect, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="<vpatch> tokens"):
        model.embed(batch.tokens, batch.patches[:1])


# ---- packing isolation --------------------------------------------------------------------------------------
def _three_docs():
    # doc 1 (30 tokens) is longer than the debug window (16): the sliding window is exercised too
    return make_batch([[Doc(4, (2, 2), 3), Doc(28), Doc(2, (1, 3), 5)]], s=80, seed=5)


def test_packed_documents_equal_each_document_alone(model):
    batch = _three_docs()
    with torch.no_grad():
        packed_logits = _run(model, batch)[0]
        packed_loss = _run(model, batch, labels=True)[0]
    assert len(batch.doc_spans) == 3
    for (start, end), (p0, p1) in zip(batch.doc_spans, batch.doc_patch_spans):
        tokens = batch.tokens[:, start:end]
        positions = torch.arange(end - start).unsqueeze(0)
        labels = batch.labels[:, start:end].clone()
        with torch.no_grad():  # alone: a plain causal sequence through Megatron's own local attention
            alone_logits = model(tokens, positions, batch.patches[p0:p1])[0]
            alone_loss = model(tokens, positions, batch.patches[p0:p1], labels=labels)[0]
        torch.testing.assert_close(packed_logits[start:end, :VOCAB], alone_logits[:, :VOCAB], rtol=1e-4, atol=1e-4)
        mask = batch.loss_mask[0, start:end] > 0  # the last label crosses into the next document
        torch.testing.assert_close(packed_loss[start:end][mask], alone_loss[mask], rtol=1e-4, atol=1e-4)


def test_image_changes_only_its_own_documents_logits(model):
    batch = _three_docs()
    (s0, e0), (s2, e2) = batch.doc_spans[0], batch.doc_spans[2]
    (a0, a1), (c0, c1) = batch.doc_patch_spans[0], batch.doc_patch_spans[2]
    other = batch.patches.clone()
    other[a0:a1] = 255 - other[a0:a1]  # change doc 0's image only
    changed = make_batch([[Doc(4, (2, 2), 3), Doc(28), Doc(2, (1, 3), 5)]], s=80, seed=5, patches=other)
    with torch.no_grad():
        base, moved = _run(model, batch)[0, :, :VOCAB], _run(model, changed)[0, :, :VOCAB]
    text0 = [i for i in range(s0, e0) if batch.loss_mask[0, i] > 0 and i > s0 + 4]  # text after the image
    assert (base[text0] - moved[text0]).abs().max() > 1e-3
    torch.testing.assert_close(base[e0:], moved[e0:], rtol=0, atol=0)  # docs 1, 2 and the pad: bit-identical
    # and the other way round: doc 2's image does not reach doc 0
    other2 = batch.patches.clone()
    other2[c0:c1] = 0
    changed2 = make_batch([[Doc(4, (2, 2), 3), Doc(28), Doc(2, (1, 3), 5)]], s=80, seed=5, patches=other2)
    with torch.no_grad():
        moved2 = _run(model, changed2)[0, :, :VOCAB]
    torch.testing.assert_close(base[:s2], moved2[:s2], rtol=0, atol=0)
    assert (base[s2:e2] - moved2[s2:e2]).abs().max() > 1e-3


# ---- loss masking and the three losses ----------------------------------------------------------------------
def test_masked_targets_contribute_exactly_zero(model):
    batch = make_batch([[Doc(4, (2, 2), 3), Doc(10)], [Doc(6), Doc(2, (1, 3), 4)]], s=40, seed=6)
    flat_labels = batch.labels.reshape(-1)
    masked = batch.loss_mask.reshape(-1) == 0
    # every patch / special / pad target is masked (and the masked set is exactly those + document ends)
    assert masked[(flat_labels >= 32000) | (flat_labels == PAD)].all()
    loss = _run(model, batch, labels=True).detach().requires_grad_(True)
    pairs = solo_losses(loss, batch.loss_mask, batch.vision_doc_mask)
    pairs["overall"][0].backward()
    assert torch.equal(loss.grad, batch.loss_mask)  # d(sum)/d(loss) is 1 on text targets, exactly 0 elsewhere
    poisoned = loss.detach().clone()
    poisoned.reshape(-1)[masked] = float("nan")
    again = solo_losses(poisoned, batch.loss_mask, batch.vision_doc_mask)
    for name in pairs:
        assert torch.equal(again[name], pairs[name].detach())
    # other labels at masked positions: identical loss sums
    relabelled = batch.labels.clone().reshape(-1)
    relabelled[masked] = 5
    psp = build_packed_seq_params(batch.cu_seqlens, batch.max_seqlen)
    with torch.no_grad():
        loss2 = model(batch.tokens, batch.position_ids, batch.patches, labels=relabelled.reshape(2, 40),
                      packed_seq_params=psp)  # fmt: skip
    assert torch.equal(solo_losses(loss2, batch.loss_mask, batch.vision_doc_mask)["overall"], pairs["overall"].detach())


def test_three_losses_recombine_into_overall(model):
    batch = make_batch([[Doc(4, (2, 2), 3), Doc(10)], [Doc(6), Doc(2, (1, 3), 4)]], s=40, seed=7)
    with torch.no_grad():
        loss = _run(model, batch, labels=True)
    pairs = solo_losses(loss, batch.loss_mask, batch.vision_doc_mask)
    overall, vis, txt = pairs["overall"], pairs["vision_lm"], pairs["text_lm"]
    torch.testing.assert_close(overall, vis + txt, rtol=1e-6, atol=1e-5)
    assert vis[1] > 0 and txt[1] > 0
    assert overall[1] == batch.loss_mask.sum()
    expect = (loss * batch.loss_mask).sum() / batch.loss_mask.sum()
    assert math.isclose(mean_losses(pairs)["overall"], float(expect), rel_tol=1e-6)
    vmask = batch.vision_doc_mask.float() * batch.loss_mask
    assert math.isclose(mean_losses(pairs)["vision_lm"], float((loss * vmask).sum() / vmask.sum()), rel_tol=1e-6)


def test_losses_accumulate_as_token_weighted_sums():
    a = solo_losses(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1, 1, 1]]) > 0)
    b = solo_losses(torch.tensor([[4.0, 5.0, 6.0]]), torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0, 0, 0]]) > 0)
    total = reduce_losses(add_losses(add_losses(None, a), b))  # 1-process world: the reduce is a no-op
    means = mean_losses(total)
    assert means["overall"] == pytest.approx((1 + 2 + 6) / 3)  # token-weighted, not the mean of means (3.75)
    assert means["vision_lm"] == pytest.approx(1.5) and means["text_lm"] == pytest.approx(6.0)
    assert math.isnan(mean_losses(a)["text_lm"])


# ---- vocab padding ------------------------------------------------------------------------------------------
def test_padded_vocab_rows_have_minus_inf_logits(model):
    batch = make_batch([[Doc(5)]], s=8, seed=8)
    logits = model(batch.tokens, batch.position_ids, batch.patches)
    assert logits.shape[-1] == padded_vocab_size(VOCAB, 1) == 32128
    assert torch.isneginf(logits[..., VOCAB:]).all() and torch.isfinite(logits[..., :VOCAB]).all()
    assert int(logits.argmax(-1).max()) < VOCAB


# ---- state dict names (the conversion contract, docs/model.md) ----------------------------------------------
def test_state_dict_keys_are_stable(model):
    keys = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    layer = "language_model.decoder.layers.{}."
    per_layer = [
        "input_layernorm.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ]
    expect = {layer.format(i) + k for i in range(2) for k in per_layer} | {
        "language_model.embedding.word_embeddings.weight",
        "language_model.decoder.final_layernorm.weight",
        "language_model.output_layer.weight",
        "vision_projector.weight",
    }
    assert keys == expect
