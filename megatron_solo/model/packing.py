"""PackedSeqParams for a SoloBatch: documents packed along the flattened ``b*s`` tokens (THD)."""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def build_packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: int | torch.Tensor) -> PackedSeqParams:
    """THD params for self-attention over packed documents (``cu_seqlens`` int32 ``[n+1]`` over ``b*s`` tokens).

    Padding is its own segment(s) in ``cu_seqlens`` (SoloBatch contract), so ``cu_seqlens[-1] == b*s`` and no
    ``*_padded`` variants are needed. Transformer Engine wants int32 offsets on the compute device.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(torch.int32)
    max_len = int(max_seqlen)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len
    )


def cu_seqlens_from_lengths(lengths: list[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Document lengths -> int32 ``cu_seqlens`` (``[0, l0, l0+l1, ...]``)."""
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32, device=device), 0)
    return out


def position_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Positions restarting at 0 for each segment, flattened ``[total]`` (int64)."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths)
    return torch.arange(total, device=cu.device) - starts
