"""Distributed SoloModel checks (torchrun + gloo, CPU): TP / TP+SP / TP x DP equal a TP=1 reference.

Every launch first computes the reference in the same processes at TP=1 (each rank builds the full model and runs
every micro-batch itself), then re-initialises Megatron's parallel state at TP=2 (x DP = world/2), loads the same
full weights sharded, wraps the model in Megatron's DDP, runs DP rank d's micro-batch, finalises grads with
``finalize_model_grads`` (per-token-loss convention: sum of text-token losses, divided by the global token count)
and compares loss, reduced (sum, count) losses, logits and every gathered gradient with the reference.

Tolerances (fp32 on CPU): loss / logits rtol 1e-5 atol 1e-5; gradients rtol 1e-4 atol 1e-6 (only the summation
order of the TP reductions differs).
"""

from __future__ import annotations

import torch

from megatron_solo import parallel
from megatron_solo.testing.dist_checks import DistChecks
from megatron_solo.testing.tp import full_state
from tests.workers.model_batches import Doc, make_batch, standard_rows

checks = DistChecks()


check = checks.check


VOCAB = 32005
REF: dict = {}


def _config(tp: int, sp: bool = False):
    from megatron_solo.model.config import debug

    return debug(vocab_size=VOCAB, tensor_model_parallel_size=tp, sequence_parallel=sp, calculate_per_token_loss=True)


def _microbatches():
    """Two different packed micro-batches (DP rank d takes number d % 2)."""
    second = [[Doc(2, (3, 2), 4), Doc(7)], [Doc(5), Doc(2, (1, 4), 3)]]
    return [make_batch(standard_rows(), s=48, seed=1), make_batch(second, s=48, seed=2)]


def _forward(model, batch, labels: bool = True):
    from megatron_solo.model import build_packed_seq_params

    psp = build_packed_seq_params(batch.cu_seqlens, batch.max_seqlen)
    return model(
        batch.tokens, batch.position_ids, batch.patches, labels=batch.labels if labels else None, packed_seq_params=psp
    )


def _load_full(model, full: dict[str, torch.Tensor]) -> None:
    """Copy full (TP=1) weights into a TP-sharded model: each rank takes its slice along ``partition_dim``.

    Vocab-sized tensors are zero-padded first when this TP size pads the vocab further (rows never predicted).
    """
    from megatron.core import parallel_state as ps

    full = {k: _pad_to(v, model.padded_vocab_size) for k, v in full.items()}
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = full[name]
            if getattr(p, "tensor_model_parallel", False):
                if name.endswith("linear_fc1.weight"):  # gated: every shard is [gate_r; up_r]
                    gate, up = t.chunk(2, dim=0)
                    t = torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
                else:
                    t = t.chunk(tp, dim=p.partition_dim)[rank]
            p.copy_(t)


def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _reference() -> dict:
    """TP=1 on this rank alone: weights, per-micro-batch loss / logits / (sum, count) losses / grads of the sum."""
    if REF:
        return REF
    from megatron_solo.model import SoloModel, solo_losses

    parallel.initialize(tensor_model_parallel_size=1)
    torch.manual_seed(1234)
    model = SoloModel(_config(1))
    REF["weights"] = {k: v.detach().clone() for k, v in model.named_parameters()}
    REF["microbatches"] = mbs = _microbatches()
    REF["losses"], REF["logits"], REF["sum_grads"] = [], [], []
    with torch.no_grad():  # unpacked: one causal sequence per row
        mb = mbs[0]
        REF["unpacked_logits"] = model(mb.tokens, mb.position_ids, mb.patches)
    for mb in mbs:
        with torch.no_grad():
            REF["logits"].append(_forward(model, mb, labels=False))
        model.zero_grad(set_to_none=True)
        loss = _forward(model, mb)
        pair = solo_losses(loss, mb.loss_mask, mb.vision_doc_mask)
        pair["overall"][0].backward()
        REF["losses"].append((loss.detach(), {k: v.detach() for k, v in pair.items()}))
        REF["sum_grads"].append({k: p.grad.detach().clone() for k, p in model.named_parameters()})
    return REF


def _expected_grads(dp_size: int) -> dict[str, torch.Tensor]:
    """Grad of (sum of text-token losses over the micro-batches the DP ranks ran) / (their token count)."""
    ran = [d % len(REF["microbatches"]) for d in range(dp_size)]
    count = sum(float(REF["losses"][i][1]["overall"][1]) for i in ran)
    return {k: sum(REF["sum_grads"][i][k] for i in ran) / count for k in REF["weights"]}


def _parallel_case(tp: int, sp: bool) -> None:
    """Run the sharded model (DDP + finalize_model_grads) and compare everything with the TP=1 reference."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    from megatron_solo.model import SoloModel, reduce_losses, solo_losses

    ref = _reference()
    parallel.initialize(tensor_model_parallel_size=tp)
    cfg = _config(tp, sp)
    model = SoloModel(cfg)
    _load_full(model, ref["weights"])
    ddp = DistributedDataParallel(
        config=cfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        module=model,
    )
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mbs = ref["microbatches"]
    mine = dp_rank % len(mbs)
    batch = mbs[mine]

    with torch.no_grad():
        logits = _gather_vocab(_forward(ddp, batch, labels=False))
    want = ref["logits"][mine]
    assert torch.isneginf(logits[..., want.shape[-1] :]).all()
    torch.testing.assert_close(logits[..., : want.shape[-1]], want, rtol=1e-5, atol=1e-5, msg="logits")

    ddp.zero_grad_buffer()
    loss = _forward(ddp, batch)
    torch.testing.assert_close(loss, ref["losses"][mine][0], rtol=1e-5, atol=1e-5, msg="per-token loss")
    pair = solo_losses(loss, batch.loss_mask, batch.vision_doc_mask)
    pair["overall"][0].backward()
    finalize_model_grads([ddp], num_tokens=pair["overall"][1].detach().clone())

    reduced = reduce_losses(pair, ps.get_data_parallel_group())
    expect = {}
    for d in range(dp_size):
        for k, v in ref["losses"][d % len(mbs)][1].items():
            expect[k] = expect.get(k, 0) + v
    for k in expect:
        torch.testing.assert_close(reduced[k], expect[k], rtol=1e-5, atol=1e-4, msg=f"reduced {k}")

    grads = full_state(model, grads=True, gated_linear_unit=True)
    ref_grads = _expected_grads(dp_size)
    assert grads.keys() == ref_grads.keys(), sorted(set(grads) ^ set(ref_grads))
    for name in grads:
        got, want = grads[name], ref_grads[name]
        if got.shape != want.shape:  # vocab padded further at TP=2: the extra rows must get no gradient
            assert got[want.shape[0] :].abs().max() == 0, name
            got = got[: want.shape[0]]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    # No rank holds the whole projector: it is split on the input (patch) dim.
    assert model.vision_projector.weight.shape == (cfg.hidden_size, cfg.patch_dim // tp)


@check
def projector_shards_concat_equal_full():
    """Megatron's own init at TP=2 gives shards whose concatenation is the TP=1 weight (same seed), and the summed
    partial projections equal the full projection of normalised patches."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_solo.model.projector import PatchProjector, normalize_patches

    parallel.initialize(tensor_model_parallel_size=1)
    torch.manual_seed(7)
    full = PatchProjector(_config(1)).weight.detach().clone()
    parallel.initialize(tensor_model_parallel_size=2)
    torch.manual_seed(7)
    proj = PatchProjector(_config(2))
    assert proj.weight.shape == (full.shape[0], full.shape[1] // 2)
    torch.testing.assert_close(_gather_along(proj.weight.detach(), dim=1), full, rtol=0, atol=0)

    patches = torch.randint(0, 256, (5, 3072), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    partial = proj(patches).detach()
    dist.all_reduce(partial, group=ps.get_tensor_model_parallel_group())
    expect = normalize_patches(patches, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) @ full.T
    torch.testing.assert_close(partial, expect, rtol=1e-5, atol=1e-5)


def _gather_along(t: torch.Tensor, dim: int) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


@check
def tp2_matches_tp1():
    _parallel_case(tp=2, sp=False)


@check
def tp2_sequence_parallel_matches_tp1():
    _parallel_case(tp=2, sp=True)


@check
def tp2_sequence_parallel_unpacked_matches_tp1():
    """The unpacked path ([b, s] rows, sequence split across TP ranks) under SP equals TP=1."""
    from megatron_solo.model import SoloModel

    ref = _reference()
    parallel.initialize(tensor_model_parallel_size=2)
    model = SoloModel(_config(2, sp=True))
    _load_full(model, ref["weights"])
    mb = ref["microbatches"][0]
    with torch.no_grad():
        logits = _gather_vocab(model(mb.tokens, mb.position_ids, mb.patches))
    want = ref["unpacked_logits"]
    torch.testing.assert_close(logits[..., : want.shape[-1]], want, rtol=1e-5, atol=1e-5)


@check
def padded_vocab_rows_never_predicted_tp2():
    """At TP=2 the padded rows sit on the last rank: their logits are -inf and their weights get zero grad."""
    from megatron.core import parallel_state as ps

    from megatron_solo.model import SoloModel

    ref = _reference()
    parallel.initialize(tensor_model_parallel_size=2)
    cfg = _config(2)
    model = SoloModel(cfg)
    _load_full(model, ref["weights"])
    batch = ref["microbatches"][0]
    logits = _gather_vocab(_forward(model, batch, labels=False))
    assert logits.shape[-1] == cfg.padded_vocab_size > VOCAB
    assert torch.isneginf(logits[..., VOCAB:]).all()
    assert torch.isfinite(logits[..., :VOCAB]).all()
    _forward(model, batch).sum().backward()
    out_grad = _gather_along(model.language_model.output_layer.weight.grad, dim=0)
    assert out_grad[VOCAB:].abs().max() == 0 and out_grad[:VOCAB].abs().max() > 0
    assert ps.get_tensor_model_parallel_world_size() == 2


def _pad_to(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Reference weights were built at TP=1 (vocab padded to 128); TP=2 pads to 256: extend vocab-sized tensors."""
    if t.dim() == 2 and t.shape[0] >= VOCAB and t.shape[0] != rows:
        extra = torch.zeros(rows - t.shape[0], t.shape[1], dtype=t.dtype)
        return torch.cat([t, extra])
    return t


if __name__ == "__main__":
    checks.main()
