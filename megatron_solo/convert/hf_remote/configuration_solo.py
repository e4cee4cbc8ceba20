"""HF configuration of a SOLO model: Mistral's configuration plus the vision fields (copied into exported HF dirs)."""

from transformers import MistralConfig

# The released SOLO token order; ids are those of the SOLO-extended SentencePiece model shipped next to this file.
VISION_TOKEN_NAMES = ("vision", "vpatch", "row_sep", "frame_sep", "vision_end")


class SoloConfig(MistralConfig):
    """Mistral + a linear patch projector added to the ``<vpatch>`` word embedding.

    ``vision_token_ids``: name -> id for ``vision``, ``vpatch``, ``row_sep``, ``frame_sep``, ``vision_end``.
    ``patch_size`` x ``patch_size`` RGB patches flattened channel-first (c, y, x) into ``patch_dim`` uint8 values,
    normalised inside the model with ``pixel_mean`` / ``pixel_std`` (per channel, on x / 255).
    """

    model_type = "solo"

    def __init__(
        self,
        patch_size: int = 32,
        patch_dim: int = 3072,
        vision_token_ids: dict | None = None,
        first_special_id: int | None = None,
        pixel_mean: list | tuple = (0.485, 0.456, 0.406),
        pixel_std: list | tuple = (0.229, 0.224, 0.225),
        **kwargs,
    ):
        self.patch_size = int(patch_size)
        self.patch_dim = int(patch_dim)
        self.vision_token_ids = dict(vision_token_ids or {})
        self.first_special_id = first_special_id
        self.pixel_mean = [float(x) for x in pixel_mean]
        self.pixel_std = [float(x) for x in pixel_std]
        super().__init__(**kwargs)

    @property
    def vpatch_id(self) -> int:
        return int(self.vision_token_ids["vpatch"])
