"""Run many named checks in ONE torchrun launch (a launch costs 8-15 s on 2 cores) and report each rank's result.

A worker script registers checks and calls ``checks.main()``; every rank runs every check in order and prints one
machine-readable line per check (parsed by ``tests/dist.py``). A failing check ends that rank at once (its peers may be
waiting in a collective), so torchrun tears the launch down and the remaining checks are reported as not run.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable

MARKER = "@@SOLO_CHECK "


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _emit(record: dict) -> None:
    """One write per record: ranks share the launcher's stdout, so a line split over writes could interleave."""
    sys.stdout.write(MARKER + json.dumps(record) + "\n")
    sys.stdout.flush()


class DistChecks:
    """An ordered registry of check functions (plain asserts), run on every rank by :meth:`main`."""

    def __init__(self) -> None:
        self._checks: list[Callable[[], None]] = []

    def check(self, fn: Callable[[], None]) -> Callable[[], None]:
        self._checks.append(fn)
        return fn

    @property
    def names(self) -> list[str]:
        return [fn.__name__ for fn in self._checks]

    def main(self) -> None:
        only = os.environ.get("SOLO_ONLY_CHECKS")
        selected = [fn for fn in self._checks if not only or fn.__name__ in only.split(",")]
        _emit({"planned": [fn.__name__ for fn in selected], "rank": _rank()})
        for fn in selected:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - report everything, then stop this rank
                tb = "".join(traceback.format_exception(exc))[-4000:]
                _emit({"name": fn.__name__, "rank": _rank(), "ok": False, "error": tb})
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
            _emit({"name": fn.__name__, "rank": _rank(), "ok": True})
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                from megatron_solo import parallel

                parallel.destroy()
        except Exception:  # noqa: BLE001 - teardown problems must not hide results
            pass
