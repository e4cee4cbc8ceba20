"""Launch a worker script under ``torchrun --nproc_per_node N`` (gloo) and assert on its per-rank check results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from megatron_solo.testing.dist_checks import MARKER

REPO = Path(__file__).resolve().parent.parent


@dataclass
class LaunchResult:
    script: str
    nproc: int
    returncode: int
    output: str
    results: dict[tuple[str, int], dict] = field(default_factory=dict)

    def tail(self, n: int = 6000) -> str:
        return self.output[-n:]

    def assert_check(self, name: str) -> None:
        """Fail unless check ``name`` passed on every rank; show each failing rank's traceback."""
        errors, missing = [], []
        for rank in range(self.nproc):
            res = self.results.get((name, rank))
            if res is None:
                missing.append(rank)
            elif not res["ok"]:
                errors.append(f"--- rank {rank} ---\n{res['error']}")
        if errors:
            pytest.fail(f"{name} failed in {self.script}:\n" + "\n".join(errors), pytrace=False)
        if missing:
            pytest.fail(
                f"{name} did not run on ranks {missing} ({self.script}, rc={self.returncode}); output tail:\n"
                + self.tail(),
                pytrace=False,
            )


# torch.distributed rendezvous variables: megatron_solo.parallel.initialize sets them in a process that starts a
# 1-rank world (some tests do, in pytest's own process); a child must not inherit them.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CPU gloo launch: the repo importable, 1 thread per rank, no GPU, unbuffered output.

    Rendezvous variables are dropped: an in-process test that started a 1-rank world leaves ``RANK=0`` etc. in
    pytest's environment, and torchrun's agent must not carry them (a test finding "the rank-0 worker" by its
    environment would find the agent too)."""
    full_env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("TORCHELASTIC_")}
    full_env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
    )
    full_env.update(env or {})
    return full_env


def torchrun_cmd(script: str, nproc: int, args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``torchrun --standalone --nproc_per_node N <repo>/script args...`` with this Python."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(REPO / script), *args,
    ]  # fmt: skip


def launch(
    script: str,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    args: list[str] | tuple[str, ...] = (),
    timeout: int = 600,
) -> LaunchResult:
    """Run ``script`` (path relative to the repo root) on ``nproc`` gloo ranks; parse every rank's check lines."""
    full_env = torchrun_env(env)
    cmd = torchrun_cmd(script, nproc, args)
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        returncode, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        returncode, output = -9, (out.decode(errors="replace") if isinstance(out, bytes) else out)
        output += f"\n[tests.dist] launch timed out after {timeout}s"
    result = LaunchResult(script, nproc, returncode, output)
    # Split on the marker, not on lines: another rank's output may land mid-line before or after a record.
    decoder = json.JSONDecoder()
    for chunk in output.split(MARKER)[1:]:
        try:
            rec, _ = decoder.raw_decode(chunk)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "name" in rec:
            result.results[(rec["name"], rec["rank"])] = rec
    return result
