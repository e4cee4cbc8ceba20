"""Layer specs for SoloModel's decoder: Transformer Engine's when usable (GPU), Megatron's local spec otherwise (CPU).

Both are Megatron-Core's own GPT specs; the local one gets two substitutions so the CPU runs the same model:

* ``core_attention`` -> :class:`PackedDotProductAttention` (THD packed documents; Megatron's local attention
  refuses ``packed_seq_params``).
* every norm -> :class:`SequenceParallelTorchNorm`: torch's RMSNorm/LayerNorm, but allowed under sequence
  parallelism (Megatron's ``WrappedTorchNorm`` asserts ``not sequence_parallel``). Under SP each TP rank normalises
  a different slice of the sequence, so its weight grads are partial: the params are tagged
  ``sequence_parallel=True``, which is what makes ``finalize_model_grads`` all-reduce them over the TP group (the
  same tag Megatron's fused/TE norms carry).
"""

from __future__ import annotations

import copy

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_solo.model.attention import PackedDotProductAttention
from megatron_solo.model.config import SoloConfig


class SequenceParallelTorchNorm:
    """Build ``torch.nn.RMSNorm`` / ``LayerNorm`` (per ``config.normalization``) with SP-tagged parameters.

    A factory with the signature Megatron's ``build_module`` uses for norms (like ``WrappedTorchNorm``).
    """

    def __new__(
        cls,
        config: SoloConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str | None = None,
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma or zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the torch norm")
        kind = config.normalization
        if kind == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif kind == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"unsupported normalization {kind!r} (RMSNorm or LayerNorm)")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def te_available() -> bool:
    """Transformer Engine importable and a CUDA device present."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no TE
        return False
    return True


def use_te(config: SoloConfig) -> bool:
    return te_available() if config.use_te is None else bool(config.use_te)


def local_layer_spec(config: SoloConfig) -> ModuleSpec:
    """Megatron's local GPT layer spec with packed attention and SP-capable torch norms."""
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=config.normalization))
    sub = spec.submodules
    sub.input_layernorm = SequenceParallelTorchNorm
    sub.pre_mlp_layernorm = SequenceParallelTorchNorm
    sub.self_attention.submodules.core_attention = PackedDotProductAttention
    return spec


def te_layer_spec(config: SoloConfig) -> ModuleSpec:
    """Megatron's Transformer Engine GPT layer spec (fused norm+linear, TEDotProductAttention: THD + window)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec()


def final_norm_class(config: SoloConfig):
    """The final norm that goes with the layer spec: TE's ``TENorm`` or the torch norm."""
    if use_te(config):
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return SequenceParallelTorchNorm


def decoder_block_spec(config: SoloConfig, vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """The decoder's block spec: this pipeline stage's copies of the layer spec and the matching final norm."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    layer = te_layer_spec(config) if use_te(config) else local_layer_spec(config)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm_class(config))
