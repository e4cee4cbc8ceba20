"""Pipeline parallelism for SoloModel: which chunks a rank builds, what data each stage needs, the P2P shape.

Megatron-Core's schedules (``get_forward_backward_func``) do the work; this module holds the three SOLO-specific
decisions around them:

* **Chunks.** A rank builds one ``SoloModel`` per virtual stage (one without virtual stages). Chunk ``k`` of pipeline
  rank ``r`` is model stage ``k * PP + r``; ``pre_process`` (word embedding + patch projector) only on model stage
  0, ``post_process`` (final norm, output layer, loss) only on the last. SOLO's embeddings are untied, so nothing
  is shared between the first and last stage.
* **Data needs** (:class:`StageNeeds`): the first stage reads tokens and patches, the last one the labels' tokens
  and the loss / vision-document masks, every stage ``cu_seqlens`` (the packed attention and RoPE of its layers).
* **The P2P shape.** A packed micro-batch runs as ONE sequence ``[1, b*s]`` (THD), so the hidden states flowing
  between stages are ``[b*s, 1, h]`` (``[b*s/TP, 1, h]`` under sequence parallelism), not ``[s, b, h]``: the schedule
  must be told ``seq_length=b*s, micro_batch_size=1`` (:func:`schedule_shape`) or the receiving stage would
  allocate the wrong shape (same bytes, other meaning) and backward would fail on the gradient's shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_solo.model.config import SoloConfig


@dataclass(frozen=True)
class StageNeeds:
    """What the model chunks of this rank read from a micro-batch (cu_seqlens: always)."""

    inputs: bool = True
    """tokens + patches (+ positions): the first stage's embedding and projector."""
    targets: bool = True
    """tokens (for the labels) + loss_mask + vision_doc_mask: the last stage's loss."""

    @property
    def tokens(self) -> bool:
        return self.inputs or self.targets

    @property
    def patches(self) -> bool:
        return self.inputs

    @property
    def masks(self) -> bool:
        return self.targets


ALL = StageNeeds(True, True)


def virtual_stages(config: SoloConfig) -> int:
    """Model chunks per rank: ``virtual_pipeline_model_parallel_size`` or 1."""
    return config.virtual_pipeline_model_parallel_size or 1


def chunk_roles(config: SoloConfig) -> list[tuple[bool, bool]]:
    """``(pre_process, post_process)`` of each model chunk this rank builds (parallel state must be set up)."""
    from megatron.core import parallel_state as ps

    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is None:
        return [(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())]
    return [
        (
            ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=k),
            ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=k),
        )
        for k in range(vpp)
    ]


def stage_needs(config: SoloConfig) -> StageNeeds:
    """The union of this rank's chunks' data needs."""
    roles = chunk_roles(config)
    return StageNeeds(inputs=any(pre for pre, _ in roles), targets=any(post for _, post in roles))


def build_model_chunks(config: SoloConfig) -> list:
    """This rank's SoloModel chunks (one per virtual stage), each with its stage's layers, on the current device."""
    from megatron_solo.model.solo_model import build_solo_model

    vpp = config.virtual_pipeline_model_parallel_size
    return [
        build_solo_model(config, pre_process=pre, post_process=post, vp_stage=None if vpp is None else k)
        for k, (pre, post) in enumerate(chunk_roles(config))
    ]


def schedule_shape(micro_batch_size: int, seq_length: int, packed: bool = True) -> tuple[int, int]:
    """``(seq_length, micro_batch_size)`` to give Megatron's schedule: the hidden states' ``[S, B, h]`` between
    stages (``[b*s, 1, h]`` for packed micro-batches, see the module docstring)."""
    return (micro_batch_size * seq_length, 1) if packed else (seq_length, micro_batch_size)


def sharded_model_state(chunks: list) -> dict:
    """The model part of a checkpoint request: ``{"model": sd}`` for one chunk, ``{"model0": .., "model1": ..}``
    with virtual stages (Megatron-LM's names). Every entry is a ShardedTensor / ShardedObject keyed by GLOBAL layer
    index (TransformerBlock applies the stage's layer offset), so the files are the same at any PP / VPP / TP / DP
    and a reader that asks for ``"model"`` of a one-stage model finds every key."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{k}": c.sharded_state_dict() for k, c in enumerate(chunks)}
