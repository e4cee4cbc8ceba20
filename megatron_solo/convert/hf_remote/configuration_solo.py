"""HF configuration of a SOLO model: Mistral's configuration plus the vision fields (copied into exported HF dirs).

The vision fields have no defaults of their own: an exported config.json carries the values the model was trained
with (written by megatron_solo.convert.export_hf from the shard schema and the tokenizer), so no SOLO constant is
spelled out here.
"""

from transformers import MistralConfig


class SoloConfig(MistralConfig):
    """Mistral + a linear patch projector added to the ``<vpatch>`` word embedding.

    ``vision_token_ids``: name -> id for ``vision``, ``vpatch``, ``row_sep``, ``frame_sep``, ``vision_end``.
    ``patch_size`` x ``patch_size`` RGB patches flattened channel-first (c, y, x) into ``patch_dim`` uint8 values,
    normalised inside the model with ``pixel_mean`` / ``pixel_std`` (per channel, on x / 255).
    """

    model_type = "solo"

    def __init__(
        self,
        patch_size: int | None = None,
        patch_dim: int | None = None,
        vision_token_ids: dict | None = None,
        first_special_id: int | None = None,
        pixel_mean: list | tuple | None = None,
        pixel_std: list | tuple | None = None,
        **kwargs,
    ):
        self.patch_size = None if patch_size is None else int(patch_size)
        self.patch_dim = None if patch_dim is None else int(patch_dim)
        self.vision_token_ids = dict(vision_token_ids or {})
        self.first_special_id = first_special_id
        self.pixel_mean = None if pixel_mean is None else [float(x) for x in pixel_mean]
        self.pixel_std = None if pixel_std is None else [float(x) for x in pixel_std]
        super().__init__(**kwargs)

    @property
    def vpatch_id(self) -> int:
        return int(self.vision_token_ids["vpatch"])
