"""Packed-sequence (THD) core attention for Megatron's LOCAL layer spec, i.e. the CPU path.

Megatron's ``DotProductAttention`` asserts ``packed_seq_params is None`` and THD is otherwise only served by
``TEDotProductAttention`` (CUDA). SOLO packs whole documents into one sequence and a token must attend only within
its own document, so the local spec gets this subclass: same inputs (``PackedSeqParams`` with ``cu_seqlens``) as the
TE path, block-diagonal causal attention (+ the config's sliding window), computed document by document with
``scaled_dot_product_attention`` (no ``t x t`` mask for the whole pack; a per-document window mask only for
documents longer than the window). Unpacked calls fall through to ``DotProductAttention`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention


def _window_mask(length: int, left: int, device: torch.device) -> torch.Tensor:
    """bool [L, L], True = attend: causal and at most ``left`` tokens back."""
    pos = torch.arange(length, device=device)
    back = pos[:, None] - pos[None, :]
    return (back >= 0) & (back <= left)


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also accepts THD ``PackedSeqParams`` (document-isolated causal attention)."""

    def __init__(self, config, layer_number: int, *args, **kwargs):
        super().__init__(config, layer_number, *args, **kwargs)
        from megatron.core.transformer.utils import is_layer_window_attention

        use_window = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window_left = config.window_size[0] if use_window and config.window_size[0] >= 0 else None
        # DotProductAttention folds the layer-scaling coeff into softmax_scale and multiplies it back in the softmax.
        self.effective_scale = self.softmax_scale * (self.layer_number if config.apply_query_key_layer_scaling else 1)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type=None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, None)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed attention supports qkv_format='thd' only, got {packed_seq_params.qkv_format!r}")
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported with packed sequences")
        cu_q = packed_seq_params.cu_seqlens_q_padded
        cu_q = packed_seq_params.cu_seqlens_q if cu_q is None else cu_q
        cu_kv = packed_seq_params.cu_seqlens_kv_padded
        cu_kv = packed_seq_params.cu_seqlens_kv if cu_kv is None else cu_kv
        if cu_kv is not cu_q and not torch.equal(cu_q, cu_kv):
            raise ValueError("self-attention over packed documents needs cu_seqlens_q == cu_seqlens_kv")
        bounds = cu_q.tolist()
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise ValueError(f"cu_seqlens {bounds[0]}..{bounds[-1]} do not cover the {query.shape[0]} packed tokens")

        # query [t, np, hn], key/value [t, ng, hn] (attention.py squeezed the dummy batch dim for THD).
        q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [heads, t, hn]
        dropout_p = self.config.attention_dropout if self.training else 0.0
        outs = []
        with tensor_parallel.get_cuda_rng_tracker().fork():
            for start, end in zip(bounds[:-1], bounds[1:]):
                if end == start:
                    continue
                length = end - start
                mask = None
                if self.window_left is not None and length > self.window_left + 1:
                    mask = _window_mask(length, self.window_left, query.device)
                outs.append(
                    F.scaled_dot_product_attention(
                        q[:, start:end],
                        k[:, start:end],
                        v[:, start:end],
                        attn_mask=mask,
                        is_causal=mask is None,
                        dropout_p=dropout_p,
                        scale=self.effective_scale,
                        enable_gqa=q.shape[0] != k.shape[0],
                    )
                )
        out = torch.cat(outs, dim=1)  # [np, t, hn]
        return out.transpose(0, 1).reshape(query.shape[0], -1)  # [t, np*hn]
