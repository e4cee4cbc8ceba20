"""The tensor-parallel patch projector: uint8 patches -> (normalise on device) -> linear 3072 -> hidden, no bias.

Why row-parallel (the INPUT dim split across TP ranks) and not column-parallel like the released SOLO code:

* The projection is added to the ``<vpatch>`` word embeddings, and Megatron's vocab-parallel word embedding already
  ends in one TP collective (an all-reduce, or a reduce-scatter to the sequence-parallel region under SP) that sums
  each rank's partial embeddings. A row-parallel projector also produces *partial sums* (``x[:, shard] @
  W[:, shard].T``); SoloModel adds them to the partial word embeddings BEFORE that one collective, so the projector
  costs no communication at all, forward or backward (the backward of an all-reduce is the identity, of a
  reduce-scatter an all-gather the embedding needs anyway).
* Column-parallel (output dim split) would need its own all-gather of the ``[P, hidden]`` output every micro-batch
  (and its input whole on every rank); under sequence parallelism it would also need a gather/scatter around the
  placement, since the patch positions are spread over the sequence shards.
* No rank holds the whole matrix: rank r holds ``W[:, r*3072/TP:(r+1)*3072/TP]`` (``partition_dim=1``, like
  RowParallelLinear), and only normalises and reads its slice of every patch.

The checkpoint layout is exactly RowParallelLinear's (``vision_projector.weight``, full shape ``[hidden, 3072]``,
sharded on dim 1), so dist_checkpointing reshards it between TP sizes like any row-parallel weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import RowParallelLinear

from megatron_solo.model.config import SoloConfig


def normalize_patches(
    patches: torch.Tensor,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    start: int = 0,
    end: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 ``[P, D]`` channel-first patches (D = 3 planes) -> ``(x/255 - mean_c) / std_c`` for columns [start, end).

    Computed in fp32 then cast to ``dtype`` (exactly the float pipeline of the released SOLO, which stored these
    values; here only the 3 KB/patch uint8 pixels travel to the device).
    """
    if patches.dtype != torch.uint8 or patches.dim() != 2:
        raise TypeError(f"patches must be uint8 [P, D], got {patches.dtype} {tuple(patches.shape)}")
    dim = patches.shape[1]
    end = dim if end is None else end
    plane = dim // 3
    channel = torch.arange(start, end, device=patches.device) // plane
    mean_t = torch.tensor(mean, dtype=torch.float32, device=patches.device)[channel]
    std_t = torch.tensor(std, dtype=torch.float32, device=patches.device)[channel]
    x = patches[:, start:end].to(torch.float32) / 255.0
    return ((x - mean_t) / std_t).to(dtype)


class PatchProjector(RowParallelLinear):
    """Row-parallel ``patch_dim -> hidden`` projection returning this rank's PARTIAL sum (no reduce; see module doc).

    Reuses RowParallelLinear for the weight's creation, initialisation, TP attributes and sharded checkpointing; only
    ``forward`` differs: the reduce is left to the caller, who folds it into the word embedding's reduce.
    """

    def __init__(self, config: SoloConfig):
        super().__init__(
            input_size=config.patch_dim,
            output_size=config.hidden_size,
            config=config,
            init_method=config.init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
        )
        self.patch_dim = config.patch_dim
        self.pixel_mean = tuple(config.pixel_mean)
        self.pixel_std = tuple(config.pixel_std)
        self.input_start = self.input_size_per_partition * self._tp_rank()
        self.input_end = self.input_start + self.input_size_per_partition

    def _tp_rank(self) -> int:
        tp_group = getattr(self, "tp_group", None)
        if tp_group is not None:
            return tp_group.rank()
        from megatron.core import parallel_state

        return parallel_state.get_tensor_model_parallel_rank()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see class docstring
        """uint8 ``[P, patch_dim]`` (all patches, identical on every TP rank) -> partial projection ``[P, hidden]``."""
        if patches.shape[-1] != self.patch_dim:
            raise ValueError(f"patches have {patches.shape[-1]} values each, the projector expects {self.patch_dim}")
        x = normalize_patches(
            patches, self.pixel_mean, self.pixel_std, self.input_start, self.input_end, dtype=self.weight.dtype
        )
        return F.linear(x, self.weight)
