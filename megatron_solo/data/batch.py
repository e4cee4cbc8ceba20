"""``Pack``s -> ``SoloBatch`` (the model's input contract, docs/architecture.md) and the trainer's batch loader.

Only TP rank 0 of each model-parallel group reads shards; it collates a compact wire form (int32 tokens, uint8
masks, int32 ``cu_seqlens``, uint8 patches) and broadcasts it over the TP group; every rank then derives labels and
position ids itself. Patches stay uint8 until the projector normalises them on the device.

Sample order: global sample ``g`` of the run is ``dataset[g]``; step ``i`` of a run that has consumed ``c`` samples
uses samples ``c .. c+GBS-1``, and DP rank ``r`` takes the contiguous slice ``c + r*GBS/DP ...`` of them, in
micro-batches of ``micro_batch_size``. So the data order is a pure function of (dataset, consumed samples, GBS, DP):
resuming needs nothing but ``consumed_samples``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_solo.data.shards import PATCH_DIM, Pack


@dataclass
class SoloBatch:
    """One micro-batch on the device (field contract: docs/architecture.md, "SoloBatch")."""

    tokens: torch.Tensor  # int64[b, s]
    labels: torch.Tensor  # int64[b, s]: tokens shifted left (last column 0, never a target)
    loss_mask: torch.Tensor  # float32[b, s]: 1 where the label is a target token of the same document
    position_ids: torch.Tensor  # int64[b, s]: restart at 0 per document (and per padding segment)
    patches: torch.Tensor  # uint8[P, 3072] in <vpatch> order over tokens.flatten()
    cu_seqlens: torch.Tensor  # int32[n+1] over the flattened b*s tokens; padding is its own segment
    max_seqlen: int
    vision_doc_mask: torch.Tensor  # bool[b, s]: token is in a document holding an image
    pad_tokens: int = 0  # padding tokens in the micro-batch
    doc_lengths: list[int] | None = None  # lengths of the real documents (no padding), for the FLOPs count

    @property
    def num_real_tokens(self) -> int:
        """Tokens that are not padding (for throughput accounting)."""
        return int(self.position_ids.numel() - self.pad_tokens)


@dataclass
class WireBatch:
    """What TP rank 0 broadcasts: compact dtypes, labels / positions derived on every rank."""

    tokens: torch.Tensor  # int32[b, s]
    masks: torch.Tensor  # uint8[2, b, s]: loss_mask, vision_doc_mask
    cu_seqlens: torch.Tensor  # int32[n+1] flattened, padding segments included
    patches: torch.Tensor  # uint8[P, 3072]
    doc_lengths: torch.Tensor  # int32[D]: real documents only
    pad_tokens: int


def collate(packs: Sequence[Pack]) -> WireBatch:
    """Stack equal-length packs into the wire form (numpy work, no float copies of the patches)."""
    if not packs:
        raise ValueError("collate: no packs")
    s = len(packs[0].tokens)
    b = len(packs)
    tokens = np.empty((b, s), dtype=np.int32)
    masks = np.zeros((2, b, s), dtype=np.uint8)
    cu_all: list[int] = [0]
    docs: list[int] = []
    pad = 0
    for r, p in enumerate(packs):
        if len(p.tokens) != s:
            raise ValueError(f"collate: pack {r} has {len(p.tokens)} tokens, pack 0 has {s}")
        tokens[r] = p.tokens
        cu = p.cu_seqlens.astype(np.int64)
        n_real = int(cu[-1]) if len(cu) else 0
        # loss_mask[t] = label t+1 is a loss target (Pack.targets) AND t+1 is inside the same document as t
        same_doc_next = np.zeros(s, dtype=bool)
        same_doc_next[: max(n_real - 1, 0)] = True
        same_doc_next[cu[1:-1] - 1] = False  # last token of each document predicts the next document's start
        masks[0, r, :-1] = (p.targets[1:] > 0) & same_doc_next[:-1]
        doc_of = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
        masks[1, r, :n_real] = p.doc_has_image[doc_of]
        base = r * s
        cu_all.extend((base + cu[1:]).tolist())
        docs.extend(np.diff(cu).tolist())
        if n_real < s:  # padding: its own segment
            cu_all.append(base + s)
            pad += s - n_real
    patches = [p.patches for p in packs if len(p.patches)]
    flat = np.concatenate(patches) if patches else np.zeros((0, PATCH_DIM), dtype=np.uint8)
    return WireBatch(
        tokens=torch.from_numpy(tokens),
        masks=torch.from_numpy(masks),
        cu_seqlens=torch.tensor(cu_all, dtype=torch.int32),
        patches=torch.from_numpy(np.ascontiguousarray(flat, dtype=np.uint8)),
        doc_lengths=torch.tensor(docs, dtype=torch.int32),
        pad_tokens=pad,
    )


def to_solo_batch(wire: WireBatch, device: torch.device | str = "cpu") -> SoloBatch:
    """Wire form -> SoloBatch on ``device`` (labels and position ids derived here, on every rank)."""
    tokens = wire.tokens.to(device, non_blocking=True).long()
    b, s = tokens.shape
    labels = torch.zeros_like(tokens)
    labels[:, :-1] = tokens[:, 1:]
    masks = wire.masks.to(device, non_blocking=True)
    cu = wire.cu_seqlens.to(device, non_blocking=True)
    lengths = (cu[1:] - cu[:-1]).long()
    starts = torch.repeat_interleave(cu[:-1].long(), lengths)
    position_ids = (torch.arange(b * s, device=device) - starts).view(b, s)
    return SoloBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=masks[0].float(),
        position_ids=position_ids,
        patches=wire.patches.to(device, non_blocking=True),
        cu_seqlens=cu,
        max_seqlen=int(lengths.max()) if len(lengths) else 0,
        vision_doc_mask=masks[1].bool(),
        pad_tokens=wire.pad_tokens,
        doc_lengths=wire.doc_lengths.tolist(),
    )


def broadcast_wire(
    wire: WireBatch | None, group: dist.ProcessGroup | None, src: int, device: torch.device | str = "cpu"
) -> WireBatch:
    """Broadcast a WireBatch from global rank ``src`` to the other ranks of ``group`` (None on receivers).

    One small header (shapes) then the four tensors; each keeps its compact dtype (patches stay uint8).
    """
    is_src = dist.get_rank() == src
    header = torch.zeros(6, dtype=torch.int64, device=device)
    if is_src:
        b, s = wire.tokens.shape
        sizes = [b, s, wire.cu_seqlens.numel(), wire.patches.shape[0], wire.doc_lengths.numel(), wire.pad_tokens]
        header.copy_(torch.tensor(sizes, device=device))
    dist.broadcast(header, src, group=group)
    b, s, n_cu, n_patch, n_doc, pad = header.tolist()
    if is_src:
        tensors = (wire.tokens, wire.masks, wire.cu_seqlens, wire.patches, wire.doc_lengths)
        parts = [t.to(device).contiguous() for t in tensors]
    else:
        parts = [
            torch.empty((b, s), dtype=torch.int32, device=device),
            torch.empty((2, b, s), dtype=torch.uint8, device=device),
            torch.empty((n_cu,), dtype=torch.int32, device=device),
            torch.empty((n_patch, PATCH_DIM), dtype=torch.uint8, device=device),
            torch.empty((n_doc,), dtype=torch.int32, device=device),
        ]
    for t in parts:
        if t.numel():
            dist.broadcast(t, src, group=group)
    return WireBatch(*parts, pad_tokens=pad)


class BatchLoader:
    """Per-step micro-batches of this DP rank, read on TP rank 0 and broadcast over the TP group.

    ``dataset`` maps a global sample index (any int >= 0) to a ``Pack`` (``BlendedPacks``, or a ``ShardSet`` with
    wrap-around). Only called on TP-rank-0 processes; the others receive.
    """

    def __init__(
        self,
        dataset,
        global_batch_size: int,
        micro_batch_size: int,
        device: torch.device | str = "cpu",
        wrap: bool = False,
    ):
        from megatron.core import parallel_state as ps

        self.dataset = dataset
        self.gbs, self.mbs = global_batch_size, micro_batch_size
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        if self.gbs % (self.mbs * self.dp_size):
            raise ValueError(
                f"--global-batch-size {self.gbs} must be a multiple of "
                f"--micro-batch-size {self.mbs} x DP {self.dp_size}"
            )
        self.num_microbatches = self.gbs // (self.mbs * self.dp_size)
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_src = ps.get_tensor_model_parallel_src_rank()
        self.is_reader = ps.get_tensor_model_parallel_rank() == 0
        self.device = device
        self.wrap = wrap

    def _pack(self, g: int) -> Pack:
        return self.dataset[g % len(self.dataset)] if self.wrap else self.dataset[g]

    def sample_indices(self, consumed_samples: int) -> list[list[int]]:
        """Global sample indices of this DP rank's micro-batches for the step starting at ``consumed_samples``."""
        per_rank = self.gbs // self.dp_size
        start = consumed_samples + self.dp_rank * per_rank
        return [list(range(start + m * self.mbs, start + (m + 1) * self.mbs)) for m in range(self.num_microbatches)]

    def step(self, consumed_samples: int) -> list[SoloBatch]:
        """All micro-batches of one step (collective over the TP group)."""
        out = []
        for idx in self.sample_indices(consumed_samples):
            wire = collate([self._pack(g) for g in idx]) if self.is_reader else None
            wire = broadcast_wire(wire, self.tp_group, self.tp_src, self.device)
            out.append(to_solo_batch(wire, self.device))
        return out

    def iterator(self, consumed_samples: int) -> Iterator[SoloBatch]:
        return iter(self.step(consumed_samples))
