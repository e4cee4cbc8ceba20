"""One partition of a partitioned build as a child process: what ``--local-partitions`` and ``--ray`` start (a SLURM
array task runs ``build --partition K/N`` itself).

The child is ``python -m megatron_solo.preprocess.partition_job CONFIG_JSON`` (a ``BuildConfig`` as JSON, its
``partition`` set) run in the launcher's working directory. It is its own process, not a thread of the launcher or
of a Ray worker: the build forks decode workers, which is only safe from a process with no foreign threads. It dies
with the process that started it (``PR_SET_PDEATHSIG``), so a killed Ray worker or launcher never leaves a build
writing behind its retry.

Exit status: 0 done; 2 bad inputs or options (``BuildError``: a retry cannot help); 1 another error (a bug: not
retried either); killed by a signal (SIGKILL, the OOM killer, a lost node): retried by the launcher, and the retry
resumes from the partition's finished shards (``build``'s resume), so the result is the same bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_solo.preprocess.build import BuildConfig

PARENT_ENV = "SOLO_PARTITION_PARENT_PID"  # the child dies with this process (set by run_child)
ENV_PREFIX = "SOLO_PREPROCESS_"  # the launcher's settings and test hooks of that prefix reach every partition
LOG_TAIL = 4000  # characters of a child's output kept for the launcher's error message


class PartitionCrashed(RuntimeError):
    """The partition's process was killed (a signal): the launcher retries it."""


def job(cfg: BuildConfig, index: int, count: int) -> dict:
    """What one partition's process needs, as plain data (it crosses to Ray workers on other nodes)."""
    c = asdict(cfg) | {"partition": f"{index}/{count}", "quiet": True, "out": os.path.abspath(cfg.out)}
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    return {"index": index, "count": count, "config": c, "cwd": os.getcwd(), "env": env}


def run_child(job: dict) -> tuple[int, str]:
    """Run the partition's process to its end: (exit status, negative for a signal; the tail of its output)."""
    cmd = [sys.executable, "-m", "megatron_solo.preprocess.partition_job", json.dumps(job["config"])]
    if not os.path.isdir(job["cwd"]):
        return 2, f"working directory {job['cwd']} does not exist on this node: run from a shared directory"
    with tempfile.TemporaryFile("w+") as log:
        env = os.environ | job["env"] | {PARENT_ENV: str(os.getpid())}
        proc = subprocess.Popen(
            cmd, cwd=job["cwd"], env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        log.seek(0)
        tail = log.read()[-LOG_TAIL:]
    return rc, tail


def retryable(rc: int) -> bool:
    """A partition process that ended by a signal (negative status, or a shell's 128 + signal)."""
    return rc < 0 or rc > 128


def main(argv: list[str] | None = None) -> int:
    from megatron_solo.format.tokens import TokenizerError
    from megatron_solo.preprocess.build import BuildConfig, BuildError, build, summary
    from megatron_solo.preprocess.sources import SourceError
    from megatron_solo.preprocess.worker import die_with_parent

    if PARENT_ENV in os.environ:
        die_with_parent(int(os.environ[PARENT_ENV]))
    argv = sys.argv[1:] if argv is None else argv
    cfg = BuildConfig(**json.loads(argv[0]))
    try:
        manifest = build(cfg)
    except (BuildError, SourceError, TokenizerError, FileNotFoundError, ValueError) as e:
        print(f"error: partition {cfg.partition}: {e}", file=sys.stderr)
        return 2
    print(f"partition {cfg.partition}: {summary(manifest).splitlines()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
