"""``build --partitions N``: all N partitions of a build, then one merged shard set in ``--out``.

Each partition is its own process (``partition_job``) writing ``OUT/part_K_of_N``; here they run M at a time on
this machine (``--local-partitions M``) or as Ray tasks on a cluster (``--ray``, ray_launch.py). A partition whose
process is killed (a signal) is started again, up to ``retries`` times, and resumes from its finished shards. One
progress bar sums the records of all partitions (read from their ``progress.json`` / ``manifest.json``, so it works
for any engine whose nodes share ``--out``). When every partition is done the set is merged (merge.py) and the
no-silent-build checks run on the merged counts (report.problems): a partition holds part of each source, so its
own counts say little.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from megatron_solo.format.schema import MANIFEST_NAME
from megatron_solo.preprocess import manifest as mf
from megatron_solo.preprocess.build import BuildConfig, BuildFailed
from megatron_solo.preprocess.merge import merge
from megatron_solo.preprocess.partition import Partition, partition_dir
from megatron_solo.preprocess.partition_job import job, retryable, run_child
from megatron_solo.preprocess.report import BuildError, problems

DEFAULT_RETRIES = 2
POLL_S = 1.0


def available_cpus() -> int:
    """CPUs this process may use (a SLURM / cgroup / taskset allocation, not the node's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_workers(at_once: int) -> int:
    """Decode workers per partition when M run on this machine at once: the CPUs split M ways, one each for the
    partition's packer (0: a partition decodes in its own process)."""
    return max(0, available_cpus() // max(1, at_once) - 1)


@dataclass
class Outcome:
    """How one partition ended: exit status (0 ok), attempts made, the tail of its last attempt's output."""

    index: int
    rc: int
    attempts: int
    tail: str = ""


class Progress:
    """One bar over all partitions: records done (each partition's finished shards), partitions done."""

    def __init__(self, out: str, count: int, quiet: bool):
        self.parts = [partition_dir(out, Partition(k, count)) for k in range(count)]
        self.done_records = [0] * count
        self.finished: set[int] = set()
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(unit="rec", desc=f"build {count} partitions", dynamic_ncols=True, file=sys.stderr)

    def _records(self, k: int) -> int:
        d = self.parts[k]
        try:
            man = mf.load_json(d / MANIFEST_NAME)
            if man is not None:
                self.finished.add(k)
                return int(man["counts"]["input_records"])
            prog = mf.load_json(d / mf.PROGRESS_NAME)
        except (OSError, ValueError):  # a file being replaced on a network file system: next poll
            return self.done_records[k]
        return prog["shards"][-1]["records"][1] if prog and prog.get("shards") else 0

    def poll(self, running: int, retried: int) -> None:
        for k in range(len(self.parts)):
            if k not in self.finished:
                self.done_records[k] = max(self.done_records[k], self._records(k))
        if self.bar is not None:
            self.bar.update(sum(self.done_records) - self.bar.n)
            post = {"done": f"{len(self.finished)}/{len(self.parts)}", "running": running}
            if retried:
                post["retried"] = retried
            self.bar.set_postfix(post)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _with_retries(j: dict, retries: int, log: Callable[[str], None]) -> Outcome:
    for attempt in range(1, retries + 2):
        rc, tail = run_child(j)
        if rc == 0 or not retryable(rc) or attempt > retries:
            return Outcome(j["index"], rc, attempt, tail)
        log(f"partition {j['index']}/{j['count']}: process ended by signal {-rc if rc < 0 else rc - 128}; "
            f"retrying (attempt {attempt + 1} of {retries + 1}), it resumes from its finished shards")  # fmt: skip
    raise AssertionError("unreachable")


def run_local(cfg: BuildConfig, count: int, at_once: int, retries: int, quiet: bool) -> list[Outcome]:
    """The N partitions, ``at_once`` at a time, each in its own process (with ``cfg.workers`` decode workers)."""
    jobs = [job(cfg, k, count) for k in range(count)]
    progress = Progress(cfg.out, count, quiet)
    retried = [0]

    def log(msg: str) -> None:
        retried[0] += 1
        (progress.bar.write if progress.bar is not None else print)(msg, file=sys.stderr)

    pool = ThreadPoolExecutor(at_once, thread_name_prefix="partition")
    try:
        futures: list[Future] = [pool.submit(_with_retries, j, retries, log) for j in jobs]
        while not all(f.done() for f in futures):
            time.sleep(POLL_S)
            progress.poll(sum(f.running() for f in futures), retried[0])
        progress.poll(0, retried[0])
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()


def _raise_failures(outcomes: list[Outcome], count: int) -> None:
    bad = [o for o in outcomes if o.rc != 0]
    if not bad:
        return
    lines = []
    for o in bad:
        how = f"killed by signal {-o.rc}" if o.rc < 0 else f"exit status {o.rc}"
        tail = [ln for ln in o.tail.strip().splitlines() if ln.strip()][-6:]
        lines.append(f"partition {o.index}/{count} failed ({how}, {o.attempts} attempt(s)):")
        lines += [f"    {ln}" for ln in tail]
    ok = count - len(bad)
    lines.append(f"{ok} of {count} partitions finished and are kept: re-run the same command to build the rest")
    raise BuildError("\n".join(lines))


def build_partitioned(
    cfg: BuildConfig,
    count: int,
    at_once: int | None = None,
    ray_address: str | None = None,
    use_ray: bool = False,
    retries: int = DEFAULT_RETRIES,
) -> dict:
    """Build the N partitions of ``cfg`` into ``cfg.out/part_K_of_N`` (this machine or Ray), merge them into
    ``cfg.out``, check the merged counts; returns the merged manifest (``BuildFailed`` after writing it when a
    check fails, ``BuildError`` naming the partitions that failed)."""
    if count < 1:
        raise BuildError(f"--partitions {count}: want N >= 1")
    cfg = replace(cfg, out=os.path.abspath(cfg.out), partition=None)
    if use_ray:
        from megatron_solo.preprocess.ray_launch import run_ray

        outcomes = run_ray(cfg, count, ray_address, retries, cfg.quiet)
    else:
        m = min(count, at_once if at_once else available_cpus())
        outcomes = run_local(cfg, count, max(1, m), retries, cfg.quiet)
    _raise_failures(outcomes, count)
    for o in outcomes:  # what a retried partition kept (its build's resume line)
        for line in o.tail.splitlines():
            if line.startswith("resume:"):
                print(f"partition {o.index}/{count}: {line}", file=sys.stderr)
    manifest = merge(cfg.out)
    found = problems(manifest, cfg.max_skip_fraction)
    if found:
        where = os.path.join(cfg.out, MANIFEST_NAME)
        raise BuildFailed("\n".join(found) + f"\n(the shards and every count are in {where})", manifest)
    return manifest
