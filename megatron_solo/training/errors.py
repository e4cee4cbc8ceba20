"""Setup errors reach the user ONCE: rank 0 prints one message, every rank exits with the same code.

A run that cannot start as asked (a flag that contradicts the checkpoint, a missing data set, an invalid layout)
raises :class:`SetupError` with a message that says what differs and what to pass instead. ``pretrain_solo.py``
catches it (``report``): no traceback from every rank. Most checks run before process groups exist (every rank
reads the same files and flags, so all decide the same); rank 0 is ``RANK`` from torchrun's environment.
"""

from __future__ import annotations

import os
import sys

EXIT_CODE = 2  # as argparse's usage errors


class SetupError(Exception):
    """The run cannot start as asked; ``str(e)`` is the one message the user reads."""


def is_rank0() -> bool:
    """Global rank 0 by torchrun's environment (valid before torch.distributed is initialised)."""
    return os.environ.get("RANK", "0") == "0"


def report(error: BaseException, prog: str = "pretrain_solo.py") -> int:
    """Print ``error`` once (rank 0, stderr) and return the exit code every rank should use."""
    if is_rank0():
        print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
    return EXIT_CODE
