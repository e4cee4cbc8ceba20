"""HybridModel (megatron-core >= 0.19) under SoloModel equals the GPTModel path: logits, losses and gradients at
TP=2 + sequence parallelism, and checkpoints cross-load (GPT TP=2 -> hybrid TP=1 -> GPT TP=2).

Env: SOLO_HYBRID_TMP = a fresh dir shared by the ranks (the checkpoints).
Tolerance: bit-identical (same modules, same initialisation order, same operations).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_solo import parallel
from megatron_solo.testing.dist_checks import DistChecks
from megatron_solo.testing.tp import full_state
from tests.workers.model_batches import make_batch, standard_rows

checks = DistChecks()
TMP = Path(os.environ.get("SOLO_HYBRID_TMP", "/tmp/solo_hybrid_test"))
VOCAB = 32005


def _model(kind: str, tp: int, sp: bool = False, seed: int = 0):
    from megatron_solo.model import SoloModel, debug

    torch.manual_seed(seed)
    cfg = debug(vocab_size=VOCAB, num_layers=3, tensor_model_parallel_size=tp, sequence_parallel=sp)
    cfg.language_model_type = kind
    return SoloModel(cfg)


def _run(model, labels: bool):
    from megatron_solo.model import build_packed_seq_params

    mb = make_batch(standard_rows(), s=48, seed=1)
    psp = build_packed_seq_params(mb.cu_seqlens, mb.max_seqlen)
    return model(mb.tokens, mb.position_ids, mb.patches, labels=mb.labels if labels else None, packed_seq_params=psp)


def _logits(model) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    with torch.no_grad():
        out = _run(model, labels=False)
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :VOCAB]


@checks.check
def hybrid_matches_gpt_tp2_sequence_parallel():
    parallel.initialize(tensor_model_parallel_size=2)
    gpt, hybrid = _model("gpt", 2, sp=True), _model("hybrid", 2, sp=True)
    assert type(hybrid.language_model).__name__ == "HybridModel"
    assert type(gpt.language_model).__name__ == "GPTModel"
    assert len(hybrid.language_model.decoder.layers) == 2 * len(gpt.language_model.decoder.layers)
    for (ng, pg), (nh, ph) in zip(gpt.named_parameters(), hybrid.named_parameters(), strict=True):
        assert torch.equal(pg, ph), (ng, nh)  # same initialisation, parameter by parameter
    assert torch.equal(_logits(gpt), _logits(hybrid))
    for model in (gpt, hybrid):
        _run(model, labels=True).sum().backward()
    g_grads = full_state(gpt, grads=True, gated_linear_unit=True)
    h_grads = full_state(hybrid, grads=True, gated_linear_unit=True)
    assert len(g_grads) == len(h_grads) > 10
    for (ng, a), (nh, b) in zip(g_grads.items(), h_grads.items(), strict=True):
        assert torch.equal(a, b), (ng, nh)


@checks.check
def checkpoints_cross_load_between_gpt_and_hybrid():
    from megatron_solo.convert.checkpoint_io import load_model_weights, resolve_iteration_dir, save_solo_checkpoint

    parallel.initialize(tensor_model_parallel_size=2)
    gpt = _model("gpt", 2, seed=5)
    want = _logits(gpt)
    save_solo_checkpoint(gpt, gpt.config, TMP / "gpt_tp2")
    parallel.initialize(tensor_model_parallel_size=1)  # TP=1 x DP=2
    hybrid = _model("hybrid", 1, seed=9)  # other weights until loaded
    assert not torch.equal(_logits(hybrid), want[..., :VOCAB])
    load_model_weights(hybrid, resolve_iteration_dir(TMP / "gpt_tp2"))
    torch.testing.assert_close(_logits(hybrid), want, rtol=1e-5, atol=1e-5)  # TP reduction order only
    save_solo_checkpoint(hybrid, hybrid.config, TMP / "hybrid_tp1")
    parallel.initialize(tensor_model_parallel_size=2)
    back = _model("gpt", 2, seed=11)
    load_model_weights(back, resolve_iteration_dir(TMP / "hybrid_tp1"))
    gpt_state, back_state = full_state(gpt), full_state(back)  # gathered over TP
    assert len(gpt_state) == len(back_state) > 10
    for name, a in gpt_state.items():
        rows = VOCAB if a.shape[0] > VOCAB else a.shape[0]  # padded vocab rows are never predicted nor stored
        assert torch.equal(a[:rows], back_state[name][:rows]), name


if __name__ == "__main__":
    checks.main()
