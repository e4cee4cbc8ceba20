"""tools/estimate.py: parameter counts and FLOPs against a really built SoloModel (torch's FLOP counter as the
independent reference), Megatron's bytes-per-parameter table, recompute / DP / window behaviour, the CLI."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_solo import parallel
from megatron_solo.model import SoloModel, build_packed_seq_params, debug, solo_7b, tiny
from tools import estimate as est

MISTRAL_7B_PARAMS = 7_241_732_096  # HF MistralForCausalLM (v0.1), vocab 32000, untied


@pytest.fixture(scope="module")
def debug_model():
    parallel.initialize(tensor_model_parallel_size=1)
    torch.manual_seed(0)
    cfg = debug(vocab_size=32005)
    return cfg, SoloModel(cfg)


def _train_step_flops(model, tokens, position_ids, packed_seq_params=None) -> dict[str, int]:
    with FlopCounterMode(display=False) as counter:
        loss = model(tokens, position_ids, None, labels=tokens, packed_seq_params=packed_seq_params)
        loss.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}


# ---- parameters ---------------------------------------------------------------------------------------------
def test_param_count_equals_built_models(debug_model):
    cfg, model = debug_model
    counts = est.param_counts(cfg, 1)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["per_rank"] == counts["total"]
    cfg_tiny = tiny(vocab_size=32005)
    assert est.param_counts(cfg_tiny, 1)["total"] == sum(p.numel() for p in SoloModel(cfg_tiny).parameters())


def test_solo_7b_is_mistral_7b_plus_projector_and_vocab_pad():
    c = est.param_counts(solo_7b(vocab_size=32000, vpatch_id=3, use_cpu_initialization=True), 1)  # no vocab padding
    assert c["total"] - c["projector"] == MISTRAL_7B_PARAMS and c["projector"] == 3072 * 4096
    c2 = est.param_counts(solo_7b(use_cpu_initialization=True), 2)  # 32005 padded to 32256 at TP=2
    assert c2["total"] == MISTRAL_7B_PARAMS + 3072 * 4096 + 2 * 256 * 4096
    norms = 32 * 2 * 4096 + 4096  # replicated on every TP rank
    assert c2["per_rank"] == (c2["total"] - norms) // 2 + norms


# ---- FLOPs --------------------------------------------------------------------------------------------------
def test_dense_flops_equal_torch_flop_counter(debug_model):
    cfg, model = debug_model
    b, s = 2, 64
    tokens = torch.randint(3, 30000, (b, s))
    counts = _train_step_flops(model, tokens, torch.arange(s).expand(b, s))
    assert counts["aten.mm"] == 6 * est.matmul_params(cfg) * b * s  # every linear, forward + backward


def test_attention_flops_per_document_against_flop_counter(debug_model):
    """The packed CPU path runs SDPA per document (counted as full len^2 squares); our causal count is the lower
    triangle incl. diagonal: 2 * ours = counter + 12*L*a*d*sum(len), for documents within the window."""
    cfg, model = debug_model
    docs = [10, 16, 6, 12, 3]  # all <= debug's window of 16
    s = sum(docs)
    cu = torch.tensor([0] + torch.tensor(docs).cumsum(0).tolist(), dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in docs])[None]
    counts = _train_step_flops(model, torch.randint(3, 30000, (1, s)), positions, build_packed_seq_params(cu, 16))
    ours = est.model_flops(cfg, docs) - 6 * est.matmul_params(cfg) * s
    unit = 12 * cfg.num_layers * cfg.num_attention_heads * cfg.kv_channels
    assert 2 * ours == counts["aten.bmm"] + unit * s
    assert est.flops_per_token(cfg, docs) == pytest.approx(est.model_flops(cfg, docs) / s)


def test_attention_term_is_window_capped():
    for length, window in [(1, 4), (5, 5), (6, 5), (100, 7), (37, None)]:
        brute = sum(min(i + 1, window or length) for i in range(length))
        assert est.attention_pairs([length], window) == brute
    cfg = solo_7b(use_cpu_initialization=True)
    nowin = solo_7b(use_cpu_initialization=True, window_size=None)
    dense = 6 * est.matmul_params(cfg)
    long_w = est.flops_per_token(cfg, [32768]) - dense
    long_full = est.flops_per_token(nowin, [32768]) - dense
    assert long_full / long_w == pytest.approx((32769 / 2) / (4096 * (1 - 4095 / 2 / 32768)), rel=1e-6)
    # documents shorter than the window: the window changes nothing; packing short documents is cheaper
    assert est.flops_per_token(cfg, [1024] * 32) == est.flops_per_token(nowin, [1024] * 32)
    assert est.flops_per_token(cfg, est.pack_doc_lengths(32768, 1024)) < est.flops_per_token(cfg, [32768])
    assert est.pack_doc_lengths(10, 4) == [4, 4, 2]
    # hardware FLOPs under full recompute: one more forward of the layers (not the output layer)
    extra = est.model_flops(cfg, [4096], recompute=True) - est.model_flops(cfg, [4096])
    assert extra == pytest.approx(
        (est.model_flops(cfg, [4096]) / 3) - 2 * 4096 * cfg.padded_vocab_size * 4096, rel=1e-9
    )


def test_solo_figure_mfu():
    cfg = solo_7b(tensor_model_parallel_size=2, use_cpu_initialization=True)
    six_n = est.mfu(20_000, 6 * est.matmul_params(cfg), 8, est.PEAK_BF16_FLOPS["a100"])
    assert 0.33 < six_n < 0.35  # SOLO's "about 35% MFU counting 6N FLOPs a token"
    full = est.mfu(20_000, est.flops_per_token(cfg, [32768]), 8, est.PEAK_BF16_FLOPS["a100"])
    assert six_n < full < 0.40


# ---- memory -------------------------------------------------------------------------------------------------
def test_bytes_per_param_follow_megatron_table():
    bpp = lambda **kw: sum(est.state_bytes_per_param(est.Layout(**kw)).values())  # noqa: E731
    assert bpp(use_distributed_optimizer=False) == 18
    assert bpp(data_parallel_size=4) == 6 + 12 / 4
    assert bpp(data_parallel_size=4, grad_reduce_in_fp32=False) == 4 + 16 / 4
    assert bpp(data_parallel_size=4, bf16=False) == 8 + 8 / 4
    assert bpp(data_parallel_size=4, bf16=False, use_distributed_optimizer=False) == 16


def test_memory_falls_with_dp_under_distributed_optimizer_only():
    cfg = solo_7b(tensor_model_parallel_size=2, use_cpu_initialization=True)
    totals = [
        est.estimate_memory(cfg, est.Layout(tensor_model_parallel_size=2, data_parallel_size=d))["total"]
        for d in (1, 2, 4, 8)
    ]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    plain = [
        est.estimate_memory(
            cfg, est.Layout(tensor_model_parallel_size=2, data_parallel_size=d, use_distributed_optimizer=False)
        )["total"]
        for d in (1, 8)
    ]
    assert plain[0] == plain[1] > totals[0] - 1  # replicated optimizer: DP does not help


def test_recompute_lowers_activations_and_tp_splits_them():
    cfg = solo_7b(tensor_model_parallel_size=2, use_cpu_initialization=True)
    base = dict(tensor_model_parallel_size=2, data_parallel_size=4, seq_length=32768)
    act = {
        r: est.estimate_memory(cfg, est.Layout(**base, recompute_granularity=r))["activations"]
        for r in (None, "selective", "full")
    }
    assert act["full"] < act["selective"] < act[None]
    full1 = est.activation_bytes(cfg, est.Layout(**base, recompute_granularity="full"))
    assert full1["layers_stored"] == 32 * 2 * 32768 * 4096 / 2  # one bf16 [s/TP, b, h] input per layer
    block = est.activation_bytes(
        cfg, est.Layout(**base, recompute_granularity="full", recompute_method="block", recompute_num_layers=8)
    )
    assert (
        full1["layers_stored"] < block["layers_stored"] < est.activation_bytes(cfg, est.Layout(**base))["layers_stored"]
    )
    per_layer = lambda tp: sum(  # noqa: E731
        est.layer_activation_bytes(cfg, est.Layout(tensor_model_parallel_size=tp, seq_length=32768)).values()
    )
    assert per_layer(2) == pytest.approx(per_layer(1) / 2)  # TP + sequence parallel split every tensor
    sbh = 32768 * 4096
    assert 33.9 < per_layer(2) * 2 / sbh < 34.2  # ~34 sbh/t for this block (Korthikanti et al. style)


def test_solo_recipe_fits_80gb_and_cli(capsys):
    cfg = solo_7b(tensor_model_parallel_size=2, use_cpu_initialization=True)
    layout = est.Layout(
        tensor_model_parallel_size=2,
        data_parallel_size=4,
        recompute_granularity="full",
        recompute_num_layers=4,
    )
    mem = est.estimate_memory(cfg, layout)
    assert mem["total"] / est.GIB + 4 < 80
    no_recompute = est.estimate_memory(cfg, est.Layout(tensor_model_parallel_size=2, data_parallel_size=4))
    assert no_recompute["total"] / est.GIB > 80
    argv = "--model solo-7b --tp 2 --dp 4 --seq-length 32768 --micro-batch-size 1 --global-batch-size 128"
    argv += " --use-distributed-optimizer --bf16 --recompute full --recompute-num-layers 4"
    est.main((argv + " --tokens-per-sec 20000 --num-gpus 8 --gpu a100 --doc-length 1024").split())
    out = capsys.readouterr().out
    assert "fits" in out and "DOES NOT FIT" not in out and "MFU" in out and "[1024]" in out
    with pytest.raises(ValueError, match="recompute_granularity"):
        est.Layout(recompute_granularity="most")


# ---- pipeline parallelism -----------------------------------------------------------------------------------
def test_stage_params_equal_built_stage_models(debug_model):
    """Each stage's count equals a built SoloModel holding that stage's parts (L/PP layers; embedding + projector
    only where pre_process, final norm + output layer only where post_process)."""
    cfg = debug(vocab_size=32005, num_layers=4)
    layout = est.Layout(pipeline_model_parallel_size=2)
    half = debug(vocab_size=32005, num_layers=2)  # a one-process model with one stage's layer count
    built = [
        sum(p.numel() for p in SoloModel(half, pre_process=pre, post_process=post).parameters())
        for pre, post in ((True, False), (False, True))
    ]
    assert [est.stage_param_count(cfg, layout, r) for r in (0, 1)] == built
    whole = est.param_counts(cfg, 1)["per_rank"]
    assert sum(built) == whole and est.stage_param_count(cfg, est.Layout(), 0) == whole


@pytest.mark.parametrize("pp,vpp,m", [(4, None, 8), (4, None, 2), (2, 2, 4), (4, 4, 16), (4, 2, 1)])
def test_inflight_microbatches_follow_megatrons_schedule(pp, vpp, m):
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    layout = est.Layout(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp, global_batch_size=m)
    for r in range(pp):
        comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda r=r: r))
        comm.virtual_pipeline_model_parallel_size = vpp
        total, _, warmup, _ = get_pp_rank_microbatches(m, vpp or 1, pp, p2p_communicator=comm)
        assert est.inflight_chunk_microbatches(layout, r) == min(warmup + 1, total)


def test_pipeline_splits_model_state_and_keeps_megatrons_activation_rule():
    cfg = solo_7b(tensor_model_parallel_size=2, use_cpu_initialization=True)
    base = dict(tensor_model_parallel_size=2, data_parallel_size=1, seq_length=32768, global_batch_size=64)
    one = est.estimate_memory(cfg, est.Layout(**base))
    stages = est.estimate_stages(cfg, est.Layout(**base, pipeline_model_parallel_size=4))
    assert sum(s["params_per_rank"] for s in stages) == one["params_per_rank"]
    assert max(s["model_state"] for s in stages) < one["model_state"] / 3.5
    # 1F1B: stage 0 holds PP micro-batches x L/PP layers = the activations of all L layers (Megatron)
    assert stages[0]["act_layers_stored"] == one["act_layers_stored"]
    assert stages[0]["act_logits_and_loss"] == 0 < stages[3]["act_logits_and_loss"] == one["act_logits_and_loss"]
    assert [s["act_layers_stored"] for s in stages] == sorted((s["act_layers_stored"] for s in stages), reverse=True)
    # interleaved: 1 + (PP - 1) / (PP V) times that on stage 0 (Megatron's theoretical memory)
    v4 = est.estimate_memory(
        cfg, est.Layout(**base, pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=4)
    )
    assert v4["act_layers_stored"] == pytest.approx(one["act_layers_stored"] * (1 + 3 / 16))


def test_pipeline_bubble():
    lay = lambda **kw: est.Layout(global_batch_size=64, **kw)  # noqa: E731 - 64 micro-batches (MBS 1, DP 1)
    assert est.pipeline_bubble(lay()) == 0
    assert est.pipeline_bubble(lay(pipeline_model_parallel_size=4)) == pytest.approx(3 / 67)
    v4 = est.pipeline_bubble(lay(pipeline_model_parallel_size=4, virtual_pipeline_model_parallel_size=4))
    assert v4 == pytest.approx(3 / (4 * 64 + 3)) and v4 < est.pipeline_bubble(lay(pipeline_model_parallel_size=4)) / 3
    with pytest.raises(ValueError, match="global_batch_size"):
        est.pipeline_bubble(est.Layout(pipeline_model_parallel_size=2))


def test_cli_pipeline_table(capsys):
    argv = "--model solo-7b --tp 2 --pp 4 --dp 2 --seq-length 32768 --global-batch-size 128 --bf16"
    est.main((argv + " --use-distributed-optimizer --recompute full --recompute-num-layers 4 --vpp 4").split())
    out = capsys.readouterr().out
    assert "TP=2 x PP=4 (x4 virtual) x DP=2" in out and "pipeline stage 3 (the largest)" in out
    assert "4.5% of the step with 1F1B, 1.2% interleaved over 4 virtual stages" in out
    assert len([line for line in out.splitlines() if line.startswith("    ") and " B  " in line]) == 4
