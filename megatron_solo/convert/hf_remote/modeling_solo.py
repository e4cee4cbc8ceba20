"""HF SOLO model: MistralForCausalLM + a patch_dim -> hidden patch projector added to the ``<vpatch>`` word embeddings.

Copied into exported HF dirs (``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``). The math is
that of megatron_solo's SoloModel: patches (uint8, channel-first 32x32x3) are normalised on the device
((x / 255 - mean_c) / std_c), projected without bias and ADDED to the word embedding of each ``<vpatch>`` token, in
the flattened (row-major over batch, then sequence) order of the ``<vpatch>`` tokens.
"""

import torch
from torch import nn
from transformers import MistralForCausalLM

from .configuration_solo import SoloConfig


class SoloForCausalLM(MistralForCausalLM):
    config_class = SoloConfig

    def __init__(self, config: SoloConfig):
        missing = [k for k in ("patch_dim", "pixel_mean", "pixel_std") if getattr(config, k, None) is None]
        if missing or "vpatch" not in config.vision_token_ids:
            raise ValueError(
                f"SoloConfig lacks {missing or ['vision_token_ids.vpatch']}: a SOLO config.json is written by "
                "megatron_solo.convert.export_hf, which records the vision fields the model was trained with"
            )
        super().__init__(config)
        self.vision_projector = nn.Linear(config.patch_dim, config.hidden_size, bias=False)
        channels = len(config.pixel_mean)
        per_channel = config.patch_dim // channels
        mean = torch.tensor(config.pixel_mean, dtype=torch.float32).repeat_interleave(per_channel)
        std = torch.tensor(config.pixel_std, dtype=torch.float32).repeat_interleave(per_channel)
        self.register_buffer("patch_mean", mean, persistent=False)
        self.register_buffer("patch_std", std, persistent=False)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:  # non-persistent buffers are re-created on the device when loading on "meta"
            per_channel = self.config.patch_dim // len(self.config.pixel_mean)
            with torch.no_grad():
                self.patch_mean.copy_(torch.tensor(self.config.pixel_mean).repeat_interleave(per_channel))
                self.patch_std.copy_(torch.tensor(self.config.pixel_std).repeat_interleave(per_channel))

    def project_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 (or raw 0..255 float) [P, patch_dim] -> [P, hidden] in the model dtype."""
        if patches.ndim != 2 or patches.shape[1] != self.config.patch_dim:
            raise ValueError(f"patches must be [P, {self.config.patch_dim}], got {list(patches.shape)}")
        weight = self.vision_projector.weight
        x = patches.to(device=weight.device, dtype=torch.float32) / 255.0
        x = (x - self.patch_mean.float()) / self.patch_std.float()
        return self.vision_projector(x.to(weight.dtype))

    def embed(self, input_ids: torch.LongTensor, patches: torch.Tensor | None) -> torch.Tensor:
        """Word embeddings of ``input_ids`` with the projected patches added at the ``<vpatch>`` positions."""
        embeds = self.get_input_embeddings()(input_ids)
        is_patch = input_ids == self.config.vpatch_id
        n_slots = int(is_patch.sum())
        n_patches = 0 if patches is None else patches.shape[0]
        if n_slots != n_patches:
            raise ValueError(
                f"input_ids hold {n_slots} <vpatch> tokens (id {self.config.vpatch_id}) but {n_patches} patches were "
                "given; build inputs with the SOLO processor (AutoProcessor, trust_remote_code=True)"
            )
        if n_slots == 0:
            return embeds
        flat = embeds.reshape(-1, embeds.shape[-1])
        index = is_patch.reshape(-1).nonzero(as_tuple=True)[0]
        flat = flat.index_add(0, index, self.project_patches(patches).to(flat.dtype))
        return flat.reshape(embeds.shape)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        patches=None,
        **kwargs,
    ):
        """MistralForCausalLM.forward, plus ``patches`` (uint8 [P, patch_dim]) for the ``<vpatch>`` tokens.

        The other arguments (the KV cache under whatever name this transformers version gives it, logits_to_keep,
        ...) go to MistralForCausalLM unchanged.
        """
        if input_ids is not None and inputs_embeds is None:
            inputs_embeds, input_ids = self.embed(input_ids, patches), None
        elif patches is not None and patches.shape[0] > 0:
            raise ValueError("patches need input_ids (their <vpatch> positions), not inputs_embeds")
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, patches=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # With a KV cache the prompt (and its <vpatch> tokens) is fed once; later steps feed only new tokens, which
        # are never <vpatch> (vision ids are suppressed in generation_config). Decide by what this step feeds, so
        # the rule does not depend on the generation internals of a transformers version.
        ids = inputs.get("input_ids")
        if patches is not None and ids is not None and int((ids == self.config.vpatch_id).sum()) == patches.shape[0]:
            inputs["patches"] = patches
        return inputs
