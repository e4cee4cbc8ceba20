"""The three token-weighted LM losses of the SOLO paper's figures: overall, vision LM, text LM.

Each loss is carried as a (sum, count) pair, never as a mean, so that micro-batches and data-parallel ranks combine
exactly: add the pairs of every micro-batch (:func:`add_losses`), all-reduce the sums over the DP group once
(:func:`reduce_losses`), divide last (:func:`mean_losses`). Averaging per-rank means would weight a rank with few
text tokens like one with many.

* overall   = every text target (``loss_mask == 1``),
* vision_lm = text targets in documents that contain an image,
* text_lm   = text targets in text-only documents;
so ``overall.sum == vision_lm.sum + text_lm.sum`` and the same for counts.

Positions with ``loss_mask == 0`` (patches, vision specials, pads, pack separators, the last token of a document)
contribute exactly 0 (``torch.where``, not a multiply, so even a non-finite loss there cannot leak in).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LOSS_NAMES = ("overall", "vision_lm", "text_lm")
LossSums = dict[str, torch.Tensor]
"""name -> float32 tensor ``[2]``: (sum of per-token losses, number of tokens)."""


def solo_losses(per_token_loss: torch.Tensor, loss_mask: torch.Tensor, vision_doc_mask: torch.Tensor) -> LossSums:
    """Per-token loss ``[b, s]`` + ``loss_mask`` ``[b, s]`` (1 = text target) + ``vision_doc_mask`` bool ``[b, s]``
    -> {"overall", "vision_lm", "text_lm"} -> ``tensor([sum, count])`` (sums keep the autograd graph)."""
    if per_token_loss.shape != loss_mask.shape or loss_mask.shape != vision_doc_mask.shape:
        raise ValueError(
            f"shape mismatch: loss {tuple(per_token_loss.shape)}, loss_mask {tuple(loss_mask.shape)}, "
            f"vision_doc_mask {tuple(vision_doc_mask.shape)}"
        )
    text = loss_mask > 0
    vision = vision_doc_mask.bool()
    loss = per_token_loss.float()
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    out = {}
    for name, sel in (("overall", text), ("vision_lm", text & vision), ("text_lm", text & ~vision)):
        total = torch.where(sel, loss, zero).sum()
        count = sel.sum().to(loss.dtype)
        out[name] = torch.stack([total, count])
    return out


def add_losses(total: LossSums | None, new: LossSums) -> LossSums:
    """Accumulate micro-batch (sum, count) pairs (detached): ``total = add_losses(total, solo_losses(...))``."""
    if total is None:
        return {k: v.detach().clone() for k, v in new.items()}
    return {k: total[k] + new[k].detach() for k in total}


def reduce_losses(losses: LossSums, group: dist.ProcessGroup | None = None) -> LossSums:
    """All-reduce (SUM) every (sum, count) pair over ``group`` (the data-parallel group) in ONE collective.

    Call it once per step on the micro-batch-accumulated pairs. A no-op without an initialised process group.
    """
    names = list(losses)
    packed = torch.stack([losses[n].detach().float() for n in names])  # [k, 2]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return {n: packed[i] for i, n in enumerate(names)}


def mean_losses(losses: LossSums) -> dict[str, float]:
    """Token-weighted means (nan where a kind had no tokens, e.g. no image documents in the step)."""
    out = {}
    for name, pair in losses.items():
        total, count = pair.tolist()
        out[name] = total / count if count > 0 else float("nan")
    return out


def training_loss(losses: LossSums, num_tokens: torch.Tensor | float | None = None) -> torch.Tensor:
    """The scalar to back-propagate for one micro-batch: overall sum / ``num_tokens``.

    Pass the step's global text-token count (all micro-batches, all DP ranks) as ``num_tokens`` for an exactly
    token-weighted gradient (Megatron's ``calculate_per_token_loss`` convention); by default the micro-batch's own
    count (the per-micro-batch mean).
    """
    total, count = losses["overall"][0], losses["overall"][1]
    denom = count.detach() if num_tokens is None else num_tokens
    return total / torch.clamp(torch.as_tensor(denom, dtype=total.dtype, device=total.device), min=1.0)
