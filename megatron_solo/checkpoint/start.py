"""THE decision of where a run starts: resume a trainer checkpoint, start from weights only, or start fresh.

Megatron-LM's rules, as the trainer (``--load`` / ``--pretrained-checkpoint`` / ``--finetune``) and SFT use them:

1. ``--load DIR`` holding a trainer checkpoint (and no ``--finetune``): **resume** (weights, optimizer, schedule,
   iteration, data position, RNG). A restarted stage resumes even when it also names ``--pretrained-checkpoint``.
2. ``--load DIR --finetune``, or ``--load DIR`` holding weights only (an HF import): **weights** from DIR.
3. ``--pretrained-checkpoint DIR``: **weights** from DIR (fresh optimizer and schedule, iteration 0).
4. Otherwise **fresh** (random init). A ``--load`` dir that holds no checkpoint yet (a stage's first run with
   ``--load $SAVE``) falls through to 3 / 4, as in Megatron-LM.

Only files are read (no process group), so every rank decides the same before the world is built, and a path that
must hold a checkpoint but does not stops the run before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_solo.checkpoint.layout import Checkpoint, CheckpointNotFound, find_checkpoint, open_checkpoint

StartKind = Literal["resume", "weights", "fresh"]


@dataclass(frozen=True)
class RunStart:
    kind: StartKind
    checkpoint: Checkpoint | None = None
    flag: str | None = None
    """The flag that named the checkpoint (``--load`` or ``--pretrained-checkpoint``), for messages."""

    @property
    def architecture(self) -> dict | None:
        """The architecture the run must have (the checkpoint's solo_config.json), None when fresh."""
        return None if self.checkpoint is None else self.checkpoint.architecture

    def describe(self) -> str:
        if self.kind == "resume":
            return f"resuming {self.checkpoint.it_dir} ({self.flag}) at iteration {self.checkpoint.iteration}"
        if self.kind == "weights":
            return f"weights from {self.checkpoint.it_dir} ({self.flag}); fresh optimizer and schedule"
        return "fresh start (random init)"


def resolve_start(load: str | None, pretrained_checkpoint: str | None = None, finetune: bool = False) -> RunStart:
    """Where a run starts (see the module docstring). Raises CheckpointNotFound / CheckpointError for a path that
    must hold a checkpoint (``--finetune``'s ``--load``, ``--pretrained-checkpoint``) but does not."""
    loaded = find_checkpoint(load)
    if loaded is not None and loaded.is_trainer_checkpoint and not finetune:
        return RunStart("resume", loaded, "--load")
    if finetune and load:
        if loaded is None:
            raise CheckpointNotFound(f"--load {load} --finetune: no checkpoint there to take the weights from")
        return RunStart("weights", loaded, "--load --finetune")
    if loaded is not None:
        return RunStart("weights", loaded, "--load")
    if pretrained_checkpoint:
        try:
            return RunStart("weights", open_checkpoint(pretrained_checkpoint), "--pretrained-checkpoint")
        except CheckpointNotFound as e:
            raise CheckpointNotFound(f"--pretrained-checkpoint: {e}") from None
    return RunStart("fresh")
