"""``Pack``s -> ``SoloBatch`` (the model's input contract, docs/architecture.md) and the trainer's batch loader.

Only TP rank 0 of each model-parallel group reads shards; it collates a compact wire form (int32 tokens, uint8
masks, int32 ``cu_seqlens``, uint8 patches) and broadcasts it over the TP group; every rank then derives labels and
position ids itself. Patches stay uint8 until the projector normalises them on the device.

Pipeline stages read only what their model chunks use (``StageNeeds``, megatron_solo/model/pipeline.py): the first
stage tokens + patches, the last stage tokens (for the labels) + masks, a middle stage only ``cu_seqlens`` (its
attention / RoPE segments). Patches are mmap views until collated, so a stage that does not need them never reads
them from disk.

Overlap: the loader collates the NEXT step's micro-batches on a background thread (shard reads, mask derivation,
patch copies; into pinned memory on GPU) while the current step computes; the TP broadcast and the host-to-device
copies (non-blocking) stay on the main thread, in step order. What is prefetched is a pure function of
``consumed_samples`` like everything else here, so the order, and resumption, are unchanged.

Sample order: global sample ``g`` of the run is ``dataset[g]``; step ``i`` of a run that has consumed ``c`` samples
uses samples ``c .. c+GBS-1``, and DP rank ``r`` takes the contiguous slice ``c + r*GBS/DP ...`` of them, in
micro-batches of ``micro_batch_size``. So the data order is a pure function of (dataset, consumed samples, GBS, DP):
resuming needs nothing but ``consumed_samples``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_solo.data.shards import PATCH_DIM, Pack
from megatron_solo.model.pipeline import ALL, StageNeeds


@dataclass
class SoloBatch:
    """One micro-batch on the device (field contract: docs/architecture.md, "SoloBatch"). Fields a pipeline stage
    does not need are None there (see ``StageNeeds``); ``cu_seqlens`` and the accounting fields are always set."""

    tokens: torch.Tensor | None  # int64[b, s]
    labels: torch.Tensor | None  # int64[b, s]: tokens shifted left (last column 0, never a target)
    loss_mask: torch.Tensor | None  # float32[b, s]: 1 where the label is a target token of the same document
    position_ids: torch.Tensor | None  # int64[b, s]: restart at 0 per document (and per padding segment)
    patches: torch.Tensor | None  # uint8[P, 3072] in <vpatch> order over tokens.flatten()
    cu_seqlens: torch.Tensor  # int32[n+1] over the flattened b*s tokens; padding is its own segment
    max_seqlen: int
    vision_doc_mask: torch.Tensor | None  # bool[b, s]: token is in a document holding an image
    pad_tokens: int = 0  # padding tokens in the micro-batch
    doc_lengths: list[int] | None = None  # lengths of the real documents (no padding), for the FLOPs count
    shape: tuple[int, int] = (0, 0)  # (b, s)
    num_patches: int = 0  # patches in the micro-batch (also where they are not loaded)

    @property
    def num_tokens(self) -> int:
        """b*s, padding included."""
        return self.shape[0] * self.shape[1]

    @property
    def num_real_tokens(self) -> int:
        """Tokens that are not padding (for throughput accounting)."""
        return int(self.num_tokens - self.pad_tokens)


@dataclass
class WireBatch:
    """What TP rank 0 broadcasts: compact dtypes, labels / positions derived on every rank; the optional tensors
    only where the stage needs them."""

    shape: tuple[int, int]  # (b, s)
    cu_seqlens: torch.Tensor  # int32[n+1] flattened, padding segments included
    doc_lengths: torch.Tensor  # int32[D]: real documents only
    pad_tokens: int
    num_patches: int
    tokens: torch.Tensor | None = None  # int32[b, s]
    masks: torch.Tensor | None = None  # uint8[2, b, s]: loss_mask, vision_doc_mask
    patches: torch.Tensor | None = None  # uint8[P, 3072]

    def pin(self) -> WireBatch:
        """Page-locked copies (GPU only) so the host-to-device copies can be non-blocking."""
        if not torch.cuda.is_available():
            return self
        fields = {k: getattr(self, k) for k in ("cu_seqlens", "doc_lengths", "tokens", "masks", "patches")}
        pinned = {k: None if t is None else t.pin_memory() for k, t in fields.items()}
        return WireBatch(self.shape, pad_tokens=self.pad_tokens, num_patches=self.num_patches, **pinned)


def collate(packs: Sequence[Pack], needs: StageNeeds = ALL) -> WireBatch:
    """Stack equal-length packs into the wire form (numpy work, no float copies of the patches); only the parts
    ``needs`` asks for (``cu_seqlens`` and the accounting always)."""
    if not packs:
        raise ValueError("collate: no packs")
    s = len(packs[0].tokens)
    b = len(packs)
    tokens = np.empty((b, s), dtype=np.int32) if needs.tokens else None
    masks = np.zeros((2, b, s), dtype=np.uint8) if needs.masks else None
    cu_all: list[int] = [0]
    docs: list[int] = []
    pad = 0
    for r, p in enumerate(packs):
        if len(p.tokens) != s:
            raise ValueError(f"collate: pack {r} has {len(p.tokens)} tokens, pack 0 has {s}")
        cu = p.cu_seqlens.astype(np.int64)
        n_real = int(cu[-1]) if len(cu) else 0
        if tokens is not None:
            tokens[r] = p.tokens
        if masks is not None:
            masks[0, r], masks[1, r] = _loss_and_vision_masks(p, cu, n_real)
        base = r * s
        cu_all.extend((base + cu[1:]).tolist())
        docs.extend(np.diff(cu).tolist())
        if n_real < s:  # padding: its own segment
            cu_all.append(base + s)
            pad += s - n_real
    n_patches = sum(len(p.patches) for p in packs)
    wire = WireBatch(
        shape=(b, s),
        cu_seqlens=torch.tensor(cu_all, dtype=torch.int32),
        doc_lengths=torch.tensor(docs, dtype=torch.int32),
        pad_tokens=pad,
        num_patches=n_patches,
        tokens=None if tokens is None else torch.from_numpy(tokens),
        masks=None if masks is None else torch.from_numpy(masks),
    )
    if needs.patches:
        flat = np.empty((n_patches, PATCH_DIM), dtype=np.uint8)
        row = 0
        for p in packs:  # the only read of the patch bytes (mmap views until here)
            flat[row : row + len(p.patches)] = p.patches
            row += len(p.patches)
        wire.patches = torch.from_numpy(flat)
    return wire


def _loss_and_vision_masks(p: Pack, cu: np.ndarray, n_real: int) -> tuple[np.ndarray, np.ndarray]:
    """loss_mask and vision_doc_mask (bool ``[s]``) of one pack."""
    s = len(p.tokens)
    # loss_mask[t] = label t+1 is a loss target (Pack.targets) AND t+1 is inside the same document as t
    same_doc_next = np.zeros(s, dtype=bool)
    same_doc_next[: max(n_real - 1, 0)] = True
    same_doc_next[cu[1:-1] - 1] = False  # last token of each document predicts the next document's start
    loss = np.zeros(s, dtype=bool)
    loss[:-1] = (p.targets[1:] > 0) & same_doc_next[:-1]
    vision = np.zeros(s, dtype=bool)
    doc_of = np.repeat(np.arange(len(cu) - 1), np.diff(cu))
    vision[:n_real] = p.doc_has_image[doc_of]
    return loss, vision


def to_solo_batch(wire: WireBatch, device: torch.device | str = "cpu") -> SoloBatch:
    """Wire form -> SoloBatch on ``device`` (labels and position ids derived here, on every rank)."""
    b, s = wire.shape
    cu = wire.cu_seqlens.to(device, non_blocking=True)
    lengths = (cu[1:] - cu[:-1]).long()
    tokens = labels = position_ids = None
    if wire.tokens is not None:
        tokens = wire.tokens.to(device, non_blocking=True).long()
        labels = torch.zeros_like(tokens)
        labels[:, :-1] = tokens[:, 1:]
        starts = torch.repeat_interleave(cu[:-1].long(), lengths)
        position_ids = (torch.arange(b * s, device=device) - starts).view(b, s)
    masks = None if wire.masks is None else wire.masks.to(device, non_blocking=True)
    return SoloBatch(
        tokens=tokens,
        labels=labels,
        loss_mask=None if masks is None else masks[0].float(),
        position_ids=position_ids,
        patches=None if wire.patches is None else wire.patches.to(device, non_blocking=True),
        cu_seqlens=cu,
        max_seqlen=int(lengths.max()) if len(lengths) else 0,
        vision_doc_mask=None if masks is None else masks[1].bool(),
        pad_tokens=wire.pad_tokens,
        doc_lengths=wire.doc_lengths.tolist(),
        shape=(b, s),
        num_patches=wire.num_patches,
    )


_HEADER = 9  # b, s, n_cu, n_doc, pad, n_patch, has tokens, has masks, has patches


def broadcast_wire(
    wire: WireBatch | None, group: dist.ProcessGroup | None, src: int, device: torch.device | str = "cpu"
) -> WireBatch:
    """Broadcast a WireBatch from global rank ``src`` to the other ranks of ``group`` (None on receivers).

    One small header (shapes, which parts are present) then each present tensor in its compact dtype (patches stay
    uint8).
    """
    is_src = dist.get_rank() == src
    header = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    if is_src:
        w = wire
        sizes = [*w.shape, w.cu_seqlens.numel(), w.doc_lengths.numel(), w.pad_tokens, w.num_patches]
        sizes += [w.tokens is not None, w.masks is not None, w.patches is not None]
        header.copy_(torch.tensor(sizes, device=device))
    dist.broadcast(header, src, group=group)
    b, s, n_cu, n_doc, pad, n_patch, has_tokens, has_masks, has_patches = header.tolist()
    specs = {
        "cu_seqlens": ((n_cu,), torch.int32, True),
        "doc_lengths": ((n_doc,), torch.int32, True),
        "tokens": ((b, s), torch.int32, has_tokens),
        "masks": ((2, b, s), torch.uint8, has_masks),
        "patches": ((n_patch, PATCH_DIM), torch.uint8, has_patches),
    }
    parts = {}
    for name, (shape, dtype, present) in specs.items():
        if not present:
            parts[name] = None
            continue
        t = getattr(wire, name).to(device, non_blocking=True).contiguous() if is_src else None
        t = torch.empty(shape, dtype=dtype, device=device) if t is None else t
        if t.numel():
            dist.broadcast(t, src, group=group)
        parts[name] = t
    return WireBatch((b, s), pad_tokens=pad, num_patches=n_patch, **parts)


class BatchLoader:
    """Per-step micro-batches of this DP rank, read on TP rank 0 and broadcast over the TP group.

    ``dataset`` maps a global sample index (any int >= 0) to a ``Pack`` (``BlendedPacks``, or a ``ShardSet`` with
    wrap-around). ``needs``: what this pipeline stage's chunks read (default: everything). ``prefetch``: collate
    the next step in the background while the current one computes (module docstring). ``last_wait_s``: how long
    the last :meth:`step` kept the caller waiting (the data wait of a step).
    """

    def __init__(
        self,
        dataset,
        global_batch_size: int,
        micro_batch_size: int,
        device: torch.device | str = "cpu",
        wrap: bool = False,
        needs: StageNeeds = ALL,
        prefetch: bool = True,
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
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.tp_src = ps.get_tensor_model_parallel_src_rank()
        self.is_reader = ps.get_tensor_model_parallel_rank() == 0
        self.device = device
        self.wrap = wrap
        self.needs = needs
        self.last_wait_s = 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="solo-batch") if prefetch and self.is_reader else None
        self._ahead: tuple[int, Future] | None = None

    def _pack(self, g: int) -> Pack:
        return self.dataset[g % len(self.dataset)] if self.wrap else self.dataset[g]

    def sample_indices(self, consumed_samples: int) -> list[list[int]]:
        """Global sample indices of this DP rank's micro-batches for the step starting at ``consumed_samples``."""
        per_rank = self.gbs // self.dp_size
        start = consumed_samples + self.dp_rank * per_rank
        return [list(range(start + m * self.mbs, start + (m + 1) * self.mbs)) for m in range(self.num_microbatches)]

    def collate_step(self, consumed_samples: int) -> list[WireBatch]:
        """This rank's wire batches of one step (the reader's work; no communication)."""
        return [
            collate([self._pack(g) for g in idx], self.needs).pin() for idx in self.sample_indices(consumed_samples)
        ]

    def _wires(self, consumed_samples: int, next_consumed: int) -> list[WireBatch | None]:
        if not self.is_reader:
            return [None] * self.num_microbatches
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == consumed_samples:
            wires = ahead[1].result()  # re-raises a reader error here, in step order
        else:
            if ahead is not None and not ahead[1].cancel():  # another position was asked for: drop the read
                ahead[1].exception()  # (after it finished: one reader of the dataset at a time)
            wires = self.collate_step(consumed_samples)
        if self._pool is not None:
            self._ahead = (next_consumed, self._pool.submit(self.collate_step, next_consumed))
        return wires

    def step(self, consumed_samples: int, next_consumed: int | None = None) -> list[SoloBatch]:
        """All micro-batches of one step (collective over the TP group); then the step at ``next_consumed``
        (default: the following one, ``consumed_samples + GBS``) is collated in the background."""
        t0 = time.perf_counter()
        nxt = consumed_samples + self.gbs if next_consumed is None else next_consumed
        out = []
        for wire in self._wires(consumed_samples, nxt):
            if self.tp_size > 1:
                wire = broadcast_wire(wire, self.tp_group, self.tp_src, self.device)
            out.append(to_solo_batch(wire, self.device))
        self.last_wait_s = time.perf_counter() - t0
        return out

    def iterator(self, consumed_samples: int) -> Iterator[SoloBatch]:
        return iter(self.step(consumed_samples))

    def close(self) -> None:
        """Stop the prefetch thread (a pending read is dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._ahead = None, None
