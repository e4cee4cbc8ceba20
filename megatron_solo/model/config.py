"""SoloConfig (a Megatron-Core TransformerConfig plus the SOLO vision fields) and the named model recipes.

Every architecture number of the project lives here: ``solo_7b()`` (Mistral-7B-v0.1 + vision, SOLO_SPEC.md),
``tiny()`` (tests, CPU demo) and ``debug()`` (the smallest model that still has GQA, SwiGLU and two TP shards).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_solo.format.schema import PATCH_DIM
from megatron_solo.format.tokens import VISION_TOKENS, appended_vision_ids

# SOLO_SPEC.md: the vision tokens are appended to Mistral-7B-v0.1's SentencePiece model (format/tokens.py's rule).
MISTRAL_VOCAB_SIZE = 32000
_SOLO_7B_VISION_IDS = appended_vision_ids(MISTRAL_VOCAB_SIZE)
VISION_ID, VPATCH_ID, ROW_SEP_ID, FRAME_SEP_ID, VISION_END_ID = _SOLO_7B_VISION_IDS.values()  # released SOLO-7B
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tensor_model_parallel_size: int = 1, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Megatron convention: pad the vocab to a multiple of ``multiple * TP`` so every TP shard is equal and aligned.

    The padding rows exist only for shape; the model masks their logits to -inf, so they are never predicted.
    """
    if vocab_size <= 0 or tensor_model_parallel_size <= 0:
        raise ValueError(f"vocab_size ({vocab_size}) and tensor_model_parallel_size must be positive")
    step = multiple * tensor_model_parallel_size
    return -(-vocab_size // step) * step


@dataclass
class SoloConfig(TransformerConfig):
    """TransformerConfig + what makes the model SOLO. Sizes of the decoder are the TransformerConfig fields."""

    vocab_size: int = MISTRAL_VOCAB_SIZE + len(VISION_TOKENS)
    """Unpadded vocabulary size (SentencePiece pieces incl. the appended vision tokens)."""

    vpatch_id: int = VPATCH_ID
    """Token id whose positions receive a projected patch (added to that token's word embedding)."""

    first_special_id: int = VISION_ID
    """Ids >= this are vision/special tokens: never loss targets (the data side builds loss_mask from it)."""

    patch_dim: int = PATCH_DIM
    """Raw values per patch (RGB x patch size x patch size, channel-first; format/schema.py)."""

    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    seq_length: int = 32768
    """Tokens per packed sequence (pack size)."""

    max_position_embeddings: int = 32768
    """RoPE table length (GPTModel ``max_sequence_length``)."""

    rotary_base: int = 10000
    rotary_percent: float = 1.0

    use_te: bool | None = None
    """Transformer Engine layer spec: None = when TE is importable and CUDA is available (see specs.py)."""

    language_model_type: str = "gpt"
    """megatron-core model under the projector: ``gpt`` (GPTModel), ``hybrid`` (HybridModel with attention + MLP
    layers, megatron-core >= 0.19) or ``auto`` (hybrid where available). Same function and checkpoint keys
    (model/hybrid.py); not part of the architecture."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_dim % 3:
            raise ValueError(f"patch_dim ({self.patch_dim}) must hold 3 channel planes")
        if self.patch_dim % self.tensor_model_parallel_size:
            raise ValueError(
                f"patch_dim ({self.patch_dim}) must be divisible by tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}): the projector splits its input dim across TP ranks"
            )
        from megatron_solo.model.hybrid import resolve_language_model_type

        self.language_model_type = resolve_language_model_type(self.language_model_type)
        if not 0 <= self.vpatch_id < self.vocab_size:
            raise ValueError(f"vpatch_id {self.vpatch_id} is outside the vocab (size {self.vocab_size})")

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.vocab_size, self.tensor_model_parallel_size)

    @property
    def sliding_window(self) -> int | None:
        """Mistral's sliding_window (tokens a query sees, itself included), or None for full causal attention."""
        return None if self.window_size is None else self.window_size[0] + 1


def _device_dtype_defaults() -> dict:
    """bf16 on GPU, fp32 on CPU (the CPU tests and demo)."""
    if torch.cuda.is_available():
        return dict(bf16=True, params_dtype=torch.bfloat16, pipeline_dtype=torch.bfloat16)
    return dict(bf16=False, params_dtype=torch.float32, use_cpu_initialization=True)


def _mistral_like(**fields) -> dict:
    """Mistral-7B-v0.1 block shape: SwiGLU, RMSNorm, RoPE, no biases, GQA, sliding window, no dropout."""
    base = dict(
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        init_method_std=0.02,
    )
    base.update(_device_dtype_defaults())
    base.update(fields)
    return base


def _make(defaults: dict, overrides: dict) -> SoloConfig:
    known = {f.name for f in dataclasses.fields(SoloConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown SoloConfig field(s): {unknown}")
    return SoloConfig(**{**defaults, **overrides})


def solo_7b(**overrides) -> SoloConfig:
    """SOLO-7B: Mistral-7B-v0.1 (32 layers, 4096 hidden, 32 heads, 8 KV groups, SwiGLU 14336, RMSNorm 1e-5,
    RoPE theta 1e4, sliding window 4096, no bias, untied embeddings) + the 3072 -> 4096 patch projector.

    ``window_size=(4095, 0)``: a query sees itself and the 4095 tokens before it (HF Mistral ``sliding_window=4096``).
    """
    return _make(
        _mistral_like(
            num_layers=32,
            hidden_size=4096,
            num_attention_heads=32,
            num_query_groups=8,
            kv_channels=128,
            ffn_hidden_size=14336,
            window_size=(4095, 0),
            seq_length=32768,
            max_position_embeddings=32768,
        ),
        overrides,
    )


def tiny(**overrides) -> SoloConfig:
    """A small model of the same family for tests and the CPU demo (2 layers, hidden 128, GQA 4:2)."""
    return _make(
        _mistral_like(
            num_layers=2,
            hidden_size=128,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=256,
            window_size=(255, 0),
            seq_length=512,
            max_position_embeddings=512,
        ),
        overrides,
    )


def debug(**overrides) -> SoloConfig:
    """The smallest useful model: 2 layers, hidden 64, 4 heads / 2 KV groups, window 16 (so windows bite in tests)."""
    return _make(
        _mistral_like(
            num_layers=2,
            hidden_size=64,
            num_attention_heads=4,
            num_query_groups=2,
            ffn_hidden_size=128,
            window_size=(15, 0),
            seq_length=128,
            max_position_embeddings=256,
        ),
        overrides,
    )


ARCHITECTURE_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "ffn_hidden_size",
    "gated_linear_unit",
    "normalization",
    "layernorm_epsilon",
    "add_bias_linear",
    "add_qkv_bias",
    "window_size",
    "init_method_std",
    "vocab_size",
    "vpatch_id",
    "first_special_id",
    "patch_dim",
    "pixel_mean",
    "pixel_std",
    "seq_length",
    "max_position_embeddings",
    "rotary_base",
    "rotary_percent",
)
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def config_to_dict(config: SoloConfig) -> dict:
    """The architecture of ``config`` as plain JSON values (for ``solo_config.json`` next to a checkpoint).

    Parallel layout, dtypes and runtime switches are not part of it: they belong to the run, not the weights.
    """
    out = {}
    for name in ARCHITECTURE_FIELDS:
        value = getattr(config, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    act = {fn: n for n, fn in _ACTIVATIONS.items()}.get(config.activation_func)
    if act is None:
        raise ValueError(f"activation {config.activation_func} has no name in {sorted(_ACTIVATIONS)}")
    out["activation"] = act
    return out


def config_from_dict(arch: dict, **overrides) -> SoloConfig:
    """Inverse of :func:`config_to_dict`; ``overrides`` set the run's fields (TP size, sequence_parallel, ...)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in arch.items() if k != "activation"}
    unknown = sorted(set(fields) - set(ARCHITECTURE_FIELDS))
    if unknown:
        raise ValueError(f"unknown architecture field(s) in model config: {unknown}")
    fields["activation_func"] = _ACTIVATIONS[arch.get("activation", "silu")]
    return _make(_mistral_like(**fields), overrides)


RECIPES = {"solo-7b": solo_7b, "tiny": tiny, "debug": debug}


def recipe(name: str, **overrides) -> SoloConfig:
    """Look a recipe up by name (``solo-7b``, ``tiny``, ``debug``)."""
    try:
        return RECIPES[name](**overrides)
    except KeyError:
        raise ValueError(f"unknown model recipe {name!r}; known: {sorted(RECIPES)}") from None
