"""Helpers for TP parity checks: gather a tensor-parallel parameter (or its grad) into the full tensor."""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_tp(tensor: torch.Tensor, param: torch.nn.Parameter, glu: bool = False) -> torch.Tensor:
    """All-gather ``tensor`` (a TP-sharded param or its grad) along the param's ``partition_dim``; replicated as is.

    ``glu``: the tensor is a gated fc1 whose every shard is ``[gate_r; up_r]``; the full tensor is ``[gate; up]``.
    """
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False):
        return tensor.detach().clone()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.detach().contiguous(), group=group)
    if glu:
        halves = [part.chunk(2, dim=0) for part in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=param.partition_dim)


def full_state(
    module: torch.nn.Module, grads: bool = False, gated_linear_unit: bool = False
) -> dict[str, torch.Tensor]:
    """name -> full (TP-gathered) parameter, or its full gradient when ``grads``."""
    out = {}
    for name, p in module.named_parameters():
        t = p.grad if grads else p.data
        if grads and t is None:
            t = getattr(p, "main_grad", None)
        if t is not None:
            out[name] = gather_tp(t, p, glu=gated_linear_unit and name.endswith("linear_fc1.weight"))
    return out
