"""THE owner of SOLO checkpoints: the directory layout, the tracker file, the atomic commit (``layout``), the one
save and the weights load (``store``), and the one decision of where a run starts (``start``).

Users: the trainer (training/checkpointing.py adds its optimizer / schedule / RNG state), the HF import and export
(megatron_solo/convert), ``generate`` and SFT. ``convert`` depends on this package, never the reverse.
"""

from megatron_solo.checkpoint.layout import (
    CHAT_TEMPLATE_KEY,
    CONFIG_NAME,
    TOKENIZER_NAME,
    TRACKER,
    TRAINER_STATE,
    Checkpoint,
    CheckpointError,
    CheckpointNotFound,
    config_to_json,
    find_checkpoint,
    iter_dir_name,
    model_part_names,
    open_checkpoint,
)
from megatron_solo.checkpoint.start import RunStart, resolve_start
from megatron_solo.checkpoint.store import (
    KILL_IN_SAVE_ITER,
    load,
    load_model_weights,
    save,
    save_model,
    sharded_model_state,
)

__all__ = [
    "CHAT_TEMPLATE_KEY",
    "CONFIG_NAME",
    "KILL_IN_SAVE_ITER",
    "TOKENIZER_NAME",
    "TRACKER",
    "TRAINER_STATE",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFound",
    "RunStart",
    "config_to_json",
    "find_checkpoint",
    "iter_dir_name",
    "load",
    "load_model_weights",
    "model_part_names",
    "open_checkpoint",
    "resolve_start",
    "save",
    "save_model",
    "sharded_model_state",
]
