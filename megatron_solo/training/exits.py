"""When a run stops before ``--train-iters``: ``--exit-interval``, ``--exit-duration-in-mins``,
``--exit-signal-handler`` (Megatron-LM's flags). The loop asks after every step; it then saves and exits 0.

SIGTERM (what SLURM sends before a preemption or the time limit, see examples/multinode_slurm.sbatch) only sets a
flag in the rank that receives it: the step in flight finishes. After each step one all-reduce (MAX over the world)
of ``[signal received, time is up]`` makes every rank stop at the same iteration even when the signal reached only
some of them, or the clocks differ. Without either flag no collective is added.
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist


class ExitConditions:
    def __init__(
        self,
        exit_interval: int | None,
        exit_duration_in_mins: float | None,
        exit_signal_handler: bool,
        device: torch.device,
        start_time: float | None = None,
    ):
        self.exit_interval = exit_interval
        start = time.time() if start_time is None else start_time
        self.deadline = None if exit_duration_in_mins is None else start + 60 * exit_duration_in_mins
        self.device = device
        self.received: int | None = None
        self.handles_signal = exit_signal_handler
        self._previous = signal.signal(signal.SIGTERM, self._on_signal) if exit_signal_handler else None

    def _on_signal(self, signum, _frame) -> None:
        self.received = signum  # finish the step in flight; the loop checks after it

    def close(self) -> None:
        """Restore the SIGTERM handler of before (a second run in the same process starts clean)."""
        if self.handles_signal:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self.handles_signal = False

    def check(self, iteration: int) -> str | None:
        """Collective when a duration or the signal handler is set: the reason to stop after ``iteration``."""
        reason = None
        if self.deadline is not None or self.handles_signal:
            flags = torch.tensor(
                [float(self.received is not None), float(self.deadline is not None and time.time() >= self.deadline)],
                device=self.device,
            )
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            signalled, late = (bool(v) for v in flags.tolist())
            if signalled:
                reason = "SIGTERM received (--exit-signal-handler)"
            elif late:
                reason = "--exit-duration-in-mins reached"
        if reason is None and self.exit_interval and iteration % self.exit_interval == 0:
            reason = f"--exit-interval {self.exit_interval}"
        return reason
