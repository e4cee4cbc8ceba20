"""The upstream road: megatron-core's ``HybridModel`` (>= 0.19; GPTModel is deprecated in its favour, Megatron-LM
#6071) as SoloModel's language model, with attention + MLP layers only.

A GPT block is two hybrid layers, ``*`` (attention: input norm, self-attention, residual) and ``-`` (MLP: pre-MLP
norm, MLP, residual), so the pattern is ``"*-" * num_layers`` with a ``|`` between pipeline segments (one per
pipeline stage x virtual stage, the same split GPTModel makes). Both halves are built from the SAME layer spec as the
GPT path (``specs.local_layer_spec`` / ``te_layer_spec``): the same modules, parameters, initialisation order and
packed (THD) attention, so the two backends compute the same function.

Checkpoints are interchangeable: :class:`SoloHybridStack` writes its layers under GPTModel's keys (hybrid layers
``2i`` and ``2i+1`` -> GPT layer ``i`` on the stacked layer axis, ``final_norm`` -> ``final_layernorm``), so a
checkpoint saved by either backend loads into the other, at any TP / PP.

What the stock ``HybridStack`` needed (why the subclass): its final norm is Transformer Engine's ``TENorm``
unconditionally (no CPU / local path), and its sharded keys are one key per hybrid layer.
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_solo.model.config import SoloConfig

ATTENTION, MLP, PIPE = "*", "-", "|"


def hybrid_available() -> bool:
    """The installed megatron-core ships ``megatron.core.models.hybrid`` (0.19+)."""
    try:
        import megatron.core.models.hybrid.hybrid_model  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_language_model_type(kind: str) -> str:
    """``gpt`` | ``hybrid`` | ``auto`` (hybrid where megatron-core ships it) -> ``gpt`` or ``hybrid``."""
    if kind == "auto":
        return "hybrid" if hybrid_available() else "gpt"
    if kind not in ("gpt", "hybrid"):
        raise ValueError(f"language_model_type must be gpt, hybrid or auto, got {kind!r}")
    if kind == "hybrid" and not hybrid_available():
        import megatron.core

        raise ValueError(
            f"language_model_type 'hybrid' needs megatron-core >= 0.19 (megatron.core.models.hybrid); "
            f"installed: {megatron.core.__version__}; use 'gpt'"
        )
    return kind


def hybrid_pattern(config: SoloConfig) -> str:
    """``"*-"`` per transformer layer, ``|`` between the PP x VPP pipeline segments (GPTModel's even split)."""
    segments = config.pipeline_model_parallel_size * (config.virtual_pipeline_model_parallel_size or 1)
    if config.num_layers % segments:
        raise ValueError(f"num_layers {config.num_layers} is not divisible into {segments} pipeline segments")
    return PIPE.join([(ATTENTION + MLP) * (config.num_layers // segments)] * segments)


def _split_layer_spec(layer: ModuleSpec) -> tuple[ModuleSpec, ModuleSpec]:
    """A GPT TransformerLayer spec -> (attention-only TransformerLayer, MLP-only MLPLayer) with the same modules."""
    from megatron.core.ssm.mlp_layer import MLPLayer

    sub = layer.submodules
    attention = dataclasses.replace(sub, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp)
    mlp = dataclasses.replace(sub, input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp)
    return ModuleSpec(module=layer.module, submodules=attention), ModuleSpec(module=MLPLayer, submodules=mlp)


def hybrid_stack_spec(config: SoloConfig) -> ModuleSpec:
    """The HybridStack spec: attention and MLP layers from SoloModel's own layer spec (TE or local)."""
    from megatron.core.models.hybrid.hybrid_block import HybridStackSubmodules

    from megatron_solo.model.specs import local_layer_spec, te_layer_spec, use_te

    layer = te_layer_spec(config) if use_te(config) else local_layer_spec(config)
    attention, mlp = _split_layer_spec(layer)
    return ModuleSpec(module=_stack_class(), submodules=HybridStackSubmodules(attention_layer=attention, mlp_layer=mlp))


_STACK = None


def _stack_class():
    """SoloHybridStack, defined on first use (megatron.core.models.hybrid exists only on megatron-core >= 0.19)."""
    global _STACK
    if _STACK is not None:
        return _STACK
    from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
    from megatron.core.models.hybrid.hybrid_block import HybridStack
    from megatron.core.transformer.utils import sharded_state_dict_default

    from megatron_solo.model.specs import final_norm_class

    class SoloHybridStack(HybridStack):
        """HybridStack with SoloModel's final norm (TE or torch) and GPTModel's checkpoint keys."""

        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = final_norm_class(config)(
                    config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
                )

        def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
            """TransformerBlock's layout: hybrid layer ``j`` -> ``layers.*`` at index ``j // 2`` of the stacked
            layer axis; ``final_norm`` -> ``final_layernorm``. Dict keys stay this module's own names."""
            assert not sharded_offsets, "unexpected sharded offsets"
            out = {}
            layers = f"{prefix}layers."
            for local, layer in enumerate(self.layers):
                own = f"{layers}{local}."
                block = (layer.layer_number - 1) // 2  # 1-based hybrid layer number -> 0-based GPT layer
                part = layer.sharded_state_dict(own, [(0, block, self.config.num_layers)], metadata)
                replace_prefix_for_sharding(part, own, layers)
                out.update(part)
            if self.post_process and self.post_layer_norm:
                own = f"{prefix}final_norm."
                part = sharded_state_dict_default(self.final_norm, own, (), metadata, tp_group=self.tp_group)
                replace_prefix_for_sharding(part, own, f"{prefix}final_layernorm.")
                out.update(part)
            return out

    _STACK = SoloHybridStack
    return _STACK


def build_hybrid_model(
    config: SoloConfig, vocab_size: int, pre_process: bool, post_process: bool, vp_stage: int | None
):
    """megatron-core's HybridModel with SoloModel's GPTModel arguments (RoPE, untied, vocab-parallel logits)."""
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return HybridModel(
        config=config,
        hybrid_stack_spec=hybrid_stack_spec(config),
        vocab_size=vocab_size,
        max_sequence_length=config.max_position_embeddings,
        hybrid_layer_pattern=hybrid_pattern(config),
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_percent=config.rotary_percent,
        rotary_base=config.rotary_base,
        vp_stage=vp_stage,
    )
