"""SoloModel on Megatron-Core: config recipes, TP patch projector, packed attention, specs, losses."""

from megatron_solo.model.config import (
    SoloConfig,
    config_from_dict,
    config_to_dict,
    debug,
    padded_vocab_size,
    recipe,
    solo_7b,
    tiny,
)
from megatron_solo.model.loss import add_losses, mean_losses, reduce_losses, solo_losses, training_loss
from megatron_solo.model.packing import build_packed_seq_params
from megatron_solo.model.solo_model import SoloModel, build_solo_model

__all__ = [
    "SoloConfig",
    "SoloModel",
    "add_losses",
    "build_packed_seq_params",
    "build_solo_model",
    "config_from_dict",
    "config_to_dict",
    "debug",
    "mean_losses",
    "padded_vocab_size",
    "recipe",
    "reduce_losses",
    "solo_7b",
    "tiny",
    "solo_losses",
    "training_loss",
]
