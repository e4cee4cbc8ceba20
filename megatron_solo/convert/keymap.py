"""The explicit map between HF Mistral / SOLO-HF tensor names and SOLO's Megatron-Core checkpoint keys.

Checkpoint keys are the keys of ``SoloModel.sharded_state_dict()`` as stored by ``dist_checkpointing``: they do not
depend on the TP/DP layout nor on the layer spec (the local spec maps its norm names onto Transformer Engine's, e.g.
``input_layernorm.weight`` is stored as ``self_attention.linear_qkv.layer_norm_weight``), and every per-layer tensor
is stored stacked over layers (``decoder.layers.<suffix>`` of shape ``[num_layers, ...]``). The GLOBAL (unsharded)
tensor of each key has a fixed layout, which is what this module converts:

==================================================  ======================================================
checkpoint key (after the model prefix)             HF tensor(s)
==================================================  ======================================================
``embedding.word_embeddings.weight`` [Vp, H]        ``model.embed_tokens.weight`` [V, H] (+ rows, see below)
``decoder.layers.self_attention.linear_qkv.``       ``model.layers.{i}.input_layernorm.weight``
``layer_norm_weight`` [L, H]
``decoder.layers.self_attention.linear_qkv.``       ``q_proj``, ``k_proj``, ``v_proj`` of layer i, regrouped per KV
``weight`` [L, (nq/ng + 2) * ng * d, H]             group: [q of group g (nq/ng heads); k_g; v_g] for g = 0..ng-1
``decoder.layers.self_attention.linear_proj.``      ``model.layers.{i}.self_attn.o_proj.weight``
``weight`` [L, H, nq * d]
``decoder.layers.mlp.linear_fc1.layer_norm_``       ``model.layers.{i}.post_attention_layernorm.weight``
``weight`` [L, H]
``decoder.layers.mlp.linear_fc1.weight``            ``cat([gate_proj, up_proj])`` of layer i (SwiGLU: Megatron
[L, 2F, H]                                          stores every TP shard as [gate_r; up_r] but the GLOBAL tensor
                                                    is [gate; up]); with ``singleton_local_shards`` it is stored as
                                                    ``..._w`` (gate) and ``..._v`` (up) instead
``decoder.layers.mlp.linear_fc2.weight`` [L, H, F]  ``model.layers.{i}.mlp.down_proj.weight``
``decoder.final_layernorm.weight`` [H]              ``model.norm.weight``
``output_layer.weight`` [Vp, H]                     ``lm_head.weight`` [V, H] (+ rows)
``vision_projector.weight`` [H, 3072]               ``vision_projector.weight`` (SOLO-HF only)
==================================================  ======================================================

RoPE: Megatron's non-interleaved rotary embedding rotates halves exactly like HF's ``rotate_half``, so q/k rows need
no permutation. Vocabulary rows: Vp (padded to 128 x TP) >= V (the SOLO-extended SentencePiece size); the export
keeps rows [0, V), the import appends the new rows and the padding (see ``import_hf.extend_vocab_rows``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Prefixes of the two sub-modules of SoloModel inside its sharded_state_dict.
LM_PREFIX = "language_model."
PROJECTOR_KEY = "vision_projector.weight"

EMBEDDING_KEY = LM_PREFIX + "embedding.word_embeddings.weight"
OUTPUT_KEY = LM_PREFIX + "output_layer.weight"
FINAL_NORM_KEY = LM_PREFIX + "decoder.final_layernorm.weight"
LAYERS_PREFIX = LM_PREFIX + "decoder.layers."

HF_EMBEDDING = "model.embed_tokens.weight"
HF_OUTPUT = "lm_head.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_PROJECTOR = "vision_projector.weight"
HF_LAYER = "model.layers.{i}."


@dataclass(frozen=True)
class Heads:
    """Attention shape needed to regroup q/k/v: query heads, KV groups, head dim."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Heads) -> torch.Tensor:
    """HF q [nq*d, H], k [ng*d, H], v [ng*d, H] -> Megatron fused qkv [(nq/ng + 2) * ng * d, H].

    Grouped per KV group (Megatron's SelfAttention splits each group's rows as [q heads of g; k_g; v_g]), NOT all q
    rows, then all k, then all v.
    """
    hidden = q.shape[-1]
    d, ng, per = heads.head_dim, heads.num_kv_heads, heads.heads_per_group
    q = q.reshape(ng, per * d, hidden)
    k = k.reshape(ng, d, hidden)
    v = v.reshape(ng, d, hidden)
    return torch.cat([q, k, v], dim=1).reshape(ng * (per + 2) * d, hidden)


def qkv_to_hf(qkv: torch.Tensor, heads: Heads) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`qkv_to_mcore`."""
    hidden = qkv.shape[-1]
    d, ng, per = heads.head_dim, heads.num_kv_heads, heads.heads_per_group
    grouped = qkv.reshape(ng, (per + 2) * d, hidden)
    q, k, v = grouped.split([per * d, d, d], dim=1)
    return q.reshape(ng * per * d, hidden), k.reshape(ng * d, hidden), v.reshape(ng * d, hidden)


def fc1_to_mcore(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """HF gate_proj, up_proj [F, H] -> Megatron's global SwiGLU fc1 [2F, H] = [gate; up]."""
    return torch.cat([gate, up], dim=0)


def fc1_to_hf(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


@dataclass(frozen=True)
class LayerTensor:
    """One stacked per-layer checkpoint tensor and the HF tensors of layer i it is made of."""

    ckpt_suffix: str  # under LAYERS_PREFIX
    hf_suffixes: tuple[str, ...]  # under HF_LAYER
    to_mcore: Callable[..., torch.Tensor]  # (*hf_tensors, heads) -> checkpoint tensor of one layer
    to_hf: Callable[..., tuple[torch.Tensor, ...]]  # (checkpoint tensor of one layer, heads) -> hf tensors

    @property
    def ckpt_key(self) -> str:
        return LAYERS_PREFIX + self.ckpt_suffix

    def hf_names(self, layer: int) -> tuple[str, ...]:
        return tuple(HF_LAYER.format(i=layer) + s for s in self.hf_suffixes)


def _same(t: torch.Tensor, heads: Heads) -> torch.Tensor:
    return t


def _same_hf(t: torch.Tensor, heads: Heads) -> tuple[torch.Tensor]:
    return (t,)


LAYER_TENSORS: tuple[LayerTensor, ...] = (
    LayerTensor("self_attention.linear_qkv.layer_norm_weight", ("input_layernorm.weight",), _same, _same_hf),
    LayerTensor(
        "self_attention.linear_qkv.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        lambda q, k, v, heads: qkv_to_mcore(q, k, v, heads),
        qkv_to_hf,
    ),
    LayerTensor("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), _same, _same_hf),
    LayerTensor("mlp.linear_fc1.layer_norm_weight", ("post_attention_layernorm.weight",), _same, _same_hf),
    LayerTensor(
        "mlp.linear_fc1.weight",
        ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        lambda gate, up, heads: fc1_to_mcore(gate, up),
        lambda fc1, heads: fc1_to_hf(fc1),
    ),
    LayerTensor("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), _same, _same_hf),
)
LAYER_BY_KEY = {t.ckpt_key: t for t in LAYER_TENSORS}
FC1_KEY = LAYERS_PREFIX + "mlp.linear_fc1.weight"

# Non-layer tensors: checkpoint key -> HF name. Embedding/output rows are extended (import) or cut (export) too.
GLOBAL_TENSORS: dict[str, str] = {
    EMBEDDING_KEY: HF_EMBEDDING,
    FINAL_NORM_KEY: HF_FINAL_NORM,
    OUTPUT_KEY: HF_OUTPUT,
    PROJECTOR_KEY: HF_PROJECTOR,
}
VOCAB_KEYS = (EMBEDDING_KEY, OUTPUT_KEY)


def hf_layer_names(layer: int) -> list[str]:
    """All HF tensor names of decoder layer ``layer``."""
    return [name for t in LAYER_TENSORS for name in t.hf_names(layer)]


def all_hf_names(num_layers: int, with_projector: bool = True) -> list[str]:
    """Every HF tensor name of a model with ``num_layers`` layers (HF Mistral, plus the projector for SOLO-HF)."""
    names = [HF_EMBEDDING] + [n for i in range(num_layers) for n in hf_layer_names(i)] + [HF_FINAL_NORM, HF_OUTPUT]
    return names + ([HF_PROJECTOR] if with_projector else [])
