"""Collective checkpoint I/O: the ONE save (trainer and HF import alike) and the model-weights load.

``save`` writes a sharded state dict with ``dist_checkpointing`` (torch_dist) into the temp dir, adds per-rank
files (the trainer's RNG states), then rank 0 commits (layout.py): a checkpoint is complete or absent.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch

from megatron_solo import platform
from megatron_solo.checkpoint.layout import (
    RNG_DIR,
    Checkpoint,
    begin_iteration_dir,
    commit_iteration_dir,
    iteration_dirs,
    model_part_names,
)

KILL_IN_SAVE_ITER = "SOLO_TEST_KILL_IN_SAVE_ITER"
"""Test hook (fault injection): SIGKILL rank 0 once every rank has written this iteration's temp dir."""


def save(
    root: str | os.PathLike,
    iteration: int,
    sharded_state: dict,
    config,
    tokenizer_model: str | os.PathLike | None = None,
    trainer_state: dict | None = None,
    rank_state: object | None = None,
    chat_template: str | None = None,
) -> Path:
    """Collective: write ``sharded_state`` as ``<root>/iter_{iteration}`` atomically, then point the tracker at it.

    ``trainer_state`` (JSON) marks a trainer checkpoint; ``rank_state`` (any picklable) is saved per global rank
    under ``rng/`` (the trainer's RNG states); ``chat_template`` is recorded in solo_config.json (SFT). Returns the
    iteration dir.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    tmp = iteration_dirs(root, iteration)[1]
    if rank == 0:
        begin_iteration_dir(root, iteration)
    dist.barrier()
    platform.writer_queue_dies_with_rank()
    dist_checkpointing.save(sharded_state, str(tmp))
    if rank_state is not None:
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        torch.save(rank_state, tmp / RNG_DIR / f"rank_{rank:05d}.pt")
    dist.barrier()
    if os.environ.get(KILL_IN_SAVE_ITER) == str(iteration):
        if rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
    final = iteration_dirs(root, iteration)[0]
    if rank == 0:
        commit_iteration_dir(root, iteration, config, tokenizer_model, trainer_state, chat_template)
    dist.barrier()
    return final


def _chunks(model) -> list:
    return list(model) if isinstance(model, list | tuple) else [model]


def sharded_model_state(model) -> dict:
    """The model part of a save / load request: ``{"model": sd}`` for one module, ``{"model0": .., ..}`` for a list
    of pipeline chunks (``layout.model_part_names``). ``model``: a SoloModel or a list of them (not DDP-wrapped)."""
    chunks = _chunks(model)
    return {name: c.sharded_state_dict() for name, c in zip(model_part_names(len(chunks)), chunks, strict=True)}


def save_model(model, config, root: str | os.PathLike, iteration: int = 0, tokenizer_model=None) -> Path:
    """Collective: a weights-only checkpoint (:func:`sharded_model_state`), e.g. an HF import."""
    return save(root, iteration, sharded_model_state(model), config, tokenizer_model)


def load(checkpoint: Checkpoint, request: dict, strict=None) -> dict:
    """Collective: ``dist_checkpointing.load`` of the sharded ``request`` from ``checkpoint`` (resharded to the
    caller's TP / PP / DP layout)."""
    from megatron.core import dist_checkpointing

    kwargs = {} if strict is None else {"strict": strict}
    return dist_checkpointing.load(request, str(checkpoint.it_dir), **kwargs)


def load_model_weights(model, checkpoint: Checkpoint) -> None:
    """Collective: the weights of ``model`` (any TP; a list = this rank's pipeline chunks) from a checkpoint saved
    at any TP / PP / VPP / DP.

    Only the model's own keys are requested, so a trainer checkpoint's optimizer / scheduler / trainer state is
    never read. ``RAISE_UNEXPECTED``: a model key absent from the checkpoint is an error naming it (a wrong
    architecture); keys of the checkpoint the model does not ask for (other stages' layers) are fine.
    """
    from megatron.core.dist_checkpointing.validation import StrictHandling

    request = sharded_model_state(model)
    state = load(checkpoint, request, strict=StrictHandling.RAISE_UNEXPECTED)
    for chunk, name in zip(_chunks(model), request, strict=True):
        chunk.load_state_dict(state[name], strict=True)
