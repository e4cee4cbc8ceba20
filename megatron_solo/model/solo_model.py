"""SoloModel: Megatron-Core's GPTModel + a tensor-parallel patch projector, fed merged embeddings.

Composition, not a fork (the way megatron.core's LLaVAModel feeds its language model): SoloModel computes the
decoder input itself and passes it as GPTModel's ``decoder_input``; GPTModel's own embedding module is kept (its
``word_embeddings`` weight is the one used) but its forward is not called.

The merge costs no extra collective: each TP rank looks up its vocab shard's word embeddings WITHOUT the usual
reduce, adds its row-parallel projector's partial sums at the ``<vpatch>`` positions, and only then does the one
TP reduce the embedding needs anyway (all-reduce, or reduce-scatter into the sequence-parallel region under SP),
exactly where ``VocabParallelEmbedding`` would have done it.

Packed documents: with ``packed_seq_params`` (THD, ``cu_seqlens`` over the flattened ``b*s`` tokens) the batch is
run as one ``[1, b*s]`` sequence; attention is isolated per document (TE THD on GPU, PackedDotProductAttention on
CPU) and RoPE restarts per document (Megatron applies it per ``cu_seqlens`` segment). Outputs come back ``[b, s]``.

Padded vocab rows (Megatron pads to a multiple of 128 x TP) get logit -inf through a forward hook on the output
layer, so they take no probability mass in the loss, never win an argmax and receive zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_solo.model.config import SoloConfig
from megatron_solo.model.hybrid import build_hybrid_model
from megatron_solo.model.projector import PatchProjector
from megatron_solo.model.specs import decoder_block_spec


class _FillPaddedColumns(torch.autograd.Function):
    """In place: ``logits[..., start:] = -inf`` forward, their gradient zeroed backward (no copy of the logits or of
    their gradient, which a plain in-place slice fill would cost: CopySlices clones the whole gradient)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, start: int) -> torch.Tensor:
        ctx.start = start
        logits[..., start:] = float("-inf")
        ctx.mark_dirty(logits)
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if grad.is_contiguous():
            grad[..., ctx.start :] = 0.0  # a fresh buffer from the loss (cross-entropy) in every normal use
        else:  # e.g. an expanded gradient of logits.sum(): do not write through stride-0 views
            grad = grad.clone()
            grad[..., ctx.start :] = 0.0
        return grad, None


class SoloModel(MegatronModule):
    """GPTModel, or HybridModel with ``language_model_type="hybrid"`` (``self.language_model``, model/hybrid.py)
    + PatchProjector (``self.vision_projector``)."""

    model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules (get_forward_backward_func)
    # SOLO's embeddings are untied: finalize_model_grads reads this on the first pipeline stage and then does not
    # all-reduce word-embedding grads between the first and last stage.
    share_embeddings_and_output_weights = False

    def __init__(
        self,
        config: SoloConfig,
        transformer_layer_spec: TransformerBlockSubmodules | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(config=config)
        self.config: SoloConfig = config
        self.pre_process, self.post_process = pre_process, post_process
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = config.padded_vocab_size
        if config.language_model_type == "hybrid":
            if transformer_layer_spec is not None:
                raise ValueError("transformer_layer_spec applies to the GPTModel path only")
            self.language_model = build_hybrid_model(
                config, self.padded_vocab_size, pre_process, post_process, vp_stage
            )
        else:
            spec = (
                transformer_layer_spec if transformer_layer_spec is not None else decoder_block_spec(config, vp_stage)
            )
            self.language_model = GPTModel(
                config=config,
                transformer_layer_spec=spec,
                vocab_size=self.padded_vocab_size,
                max_sequence_length=config.max_position_embeddings,
                pre_process=pre_process,
                post_process=post_process,
                parallel_output=True,
                share_embeddings_and_output_weights=False,
                position_embedding_type="rope",
                rotary_percent=config.rotary_percent,
                rotary_base=config.rotary_base,
                vp_stage=vp_stage,
            )
        self.vision_projector = PatchProjector(config) if pre_process else None
        if post_process and self.padded_vocab_size > self.vocab_size:
            self.language_model.output_layer.register_forward_hook(self._mask_padded_vocab_logits)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """MegatronModule's, minus the HybridModel output layer's empty ``_extra_state``: GPTModel drops that key
        too, so both backends write and read the same keys (model/hybrid.py)."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.config.language_model_type == "hybrid":
            sd.pop(f"{prefix}language_model.output_layer._extra_state", None)
        return sd

    # ---- pipeline-parallel plumbing (delegated) -------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    # ---- embeddings -----------------------------------------------------------------------------------------
    def _partial_word_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This TP rank's share of the word embeddings ``[b, s, h]`` (zeros for ids outside its vocab shard).

        ``VocabParallelEmbedding.forward`` minus its final reduce (which ``embed`` does after adding the patches).
        """
        we = self.language_model.embedding.word_embeddings
        if we.vocab_start_index == 0 and we.vocab_end_index >= self.padded_vocab_size:  # TP == 1
            return F.embedding(input_ids, we.weight)
        outside = (input_ids < we.vocab_start_index) | (input_ids >= we.vocab_end_index)
        local_ids = (input_ids - we.vocab_start_index).masked_fill(outside, 0)
        return F.embedding(local_ids, we.weight).masked_fill(outside.unsqueeze(-1), 0.0)

    def embed(self, input_ids: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        """Decoder input ``[s, b, h]`` (``[s/TP, b, h]`` under sequence parallelism): word embeddings, plus the
        projected patch at every ``<vpatch>`` position (patches in the order of ``input_ids.flatten()``)."""
        emb_module = self.language_model.embedding
        tp_group = emb_module.word_embeddings.tp_group
        partial = self._partial_word_embeddings(input_ids)  # [b, s, h], not yet reduced over TP
        b, s, h = partial.shape
        if patches is None:
            patches = torch.empty(0, self.config.patch_dim, dtype=torch.uint8, device=input_ids.device)
        positions = torch.nonzero(input_ids.reshape(-1) == self.config.vpatch_id).squeeze(1)
        if positions.numel() != patches.shape[0]:
            raise ValueError(
                f"{positions.numel()} <vpatch> tokens (id {self.config.vpatch_id}) but {patches.shape[0]} patches"
            )
        # Always run the projector (even on 0 patches) so its grad exists on every step (DDP bucket readiness).
        projected = self.vision_projector(patches.to(input_ids.device))  # [P, h] partial sums over TP
        partial = partial.reshape(b * s, h).index_add(0, positions, projected.to(partial.dtype)).reshape(b, s, h)

        if self.config.sequence_parallel:
            embeddings = tensor_parallel.reduce_scatter_to_sequence_parallel_region(
                partial.transpose(0, 1).contiguous(), group=tp_group
            )
        else:
            embeddings = tensor_parallel.reduce_from_tensor_model_parallel_region(partial, group=tp_group)
            embeddings = embeddings.transpose(0, 1).contiguous()
        # The remainder of LanguageModelEmbedding.forward (no position / token-type embeddings here).
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()
        if self.config.sequence_parallel:
            if self.config.clone_scatter_output_in_embedding:
                embeddings = embeddings.clone()
            with tensor_parallel.get_cuda_rng_tracker().fork():
                embeddings = emb_module.embedding_dropout(embeddings)
        else:
            embeddings = emb_module.embedding_dropout(embeddings)
        return embeddings

    # ---- output ---------------------------------------------------------------------------------------------
    def _mask_padded_vocab_logits(self, module, args, output):
        """Forward hook on the output layer: logits of padded vocab rows -> -inf (in place, on this rank's shard)."""
        logits, bias = output
        width = logits.shape[-1]
        if width == self.padded_vocab_size:  # gathered (runtime_gather_output)
            first_pad = self.vocab_size
        else:
            tp_rank = module.tp_group.rank() if getattr(module, "tp_group", None) is not None else 0
            first_pad = self.vocab_size - tp_rank * width
        if first_pad < width:
            logits = _FillPaddedColumns.apply(logits, max(first_pad, 0))
        return logits, bias

    # ---- forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        patches: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
        attention_mask: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
        inference_context=None,
    ) -> torch.Tensor:
        """tokens/position_ids/labels ``[b, s]``, patches uint8 ``[P, patch_dim]`` -> logits ``[b, s, V_pad/TP]``
        (no labels) or the per-token loss ``[b, s]`` (fp32; mask it with ``loss_mask``, see loss.py).

        ``packed_seq_params``: THD over the flattened ``b*s`` tokens (build_packed_seq_params); None = one causal
        sequence per row. ``attention_mask``, ``runtime_gather_output`` and ``inference_context`` go to GPTModel
        unchanged (generation: ``runtime_gather_output=True`` returns the full padded vocab, padding at -inf).

        Pipeline stages read only what they use: ``tokens`` / ``patches`` on the first stage (``pre_process``),
        ``labels`` on the last (``post_process``); a middle stage needs only ``packed_seq_params`` (its input is
        the previous stage's hidden states, ``[b*s, 1, h]`` when packed, set by the schedule).
        """
        shape_of = tokens if tokens is not None else labels  # [b, s]; None on a middle stage
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if packed and shape_of is not None:  # THD: the whole micro-batch is one packed sequence
            tokens, position_ids, labels = (
                None if t is None else t.reshape(1, -1) for t in (tokens, position_ids, labels)
            )
        decoder_input = self.embed(tokens, patches) if self.pre_process else None
        out = self.language_model(
            tokens,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            packed_seq_params=packed_seq_params,
            runtime_gather_output=runtime_gather_output,
            inference_context=inference_context,
        )
        if not self.post_process:
            return out  # hidden states for the next pipeline stage
        if packed:
            out = out.reshape(*shape_of.shape, *out.shape[2:])
        return out


def build_solo_model(
    config: SoloConfig, pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None
) -> SoloModel:
    """SoloModel with the TE spec when usable (GPU), the local spec otherwise; on the current device."""
    model = SoloModel(config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
