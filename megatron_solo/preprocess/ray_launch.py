"""``build --ray [ADDRESS] --partitions N``: the partitions as Ray tasks (``pip install megatron-solo[ray]``).

Each task asks for ``--workers + 1`` CPUs (the partition's packer and its decode workers) and runs the partition's
process (``partition_job.run_child``) on whichever node Ray picks; the task body only waits for it. A task whose
partition process is killed raises ``PartitionCrashed`` and a task whose Ray worker dies is lost: Ray retries both
(``max_retries``, ``retry_exceptions``), and the retry resumes from the partition's finished shards. A partition that
fails on its own (bad input: exit status 2) is not retried. Every node must see the inputs, the tokenizer and
``--out`` at the same paths (a shared file system), and run the same megatron-solo; the driver polls the partitions'
progress files for the one bar and merges at the end (launch.py).
"""

from __future__ import annotations

import sys

from megatron_solo.preprocess.build import BuildConfig
from megatron_solo.preprocess.launch import POLL_S, Outcome, Progress
from megatron_solo.preprocess.partition_job import PartitionCrashed, job, retryable, run_child
from megatron_solo.preprocess.report import BuildError


def _task(j: dict) -> tuple[int, str]:
    """The Ray task: one attempt of one partition."""
    rc, tail = run_child(j)
    if retryable(rc):
        raise PartitionCrashed(f"partition {j['index']}/{j['count']}: process killed (status {rc})\n{tail}")
    return rc, tail


def _import_ray():
    try:
        import ray
    except ImportError:
        raise BuildError("--ray needs Ray: pip install 'megatron-solo[ray]' (or pip install ray)") from None
    return ray


def _outcome(ray, ref, index: int, retries: int) -> Outcome:
    try:
        rc, tail = ray.get(ref)
        return Outcome(index, rc, 0, tail)
    except ray.exceptions.RayTaskError as e:  # PartitionCrashed on the last attempt
        return Outcome(index, -9, retries + 1, str(e.cause if e.cause is not None else e)[-2000:])
    except ray.exceptions.RayError as e:  # the worker died on every attempt, the node was lost, ...
        return Outcome(index, -9, retries + 1, f"{type(e).__name__}: {e}"[-2000:])


def _check_fits(ray, cpus: int) -> None:
    """A task no node can hold would wait forever: say so instead."""
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if cpus > largest:
        raise BuildError(f"each partition task asks for --workers + 1 = {cpus} CPUs but the largest Ray node has "
                         f"{largest:g}: lower --workers (to at most {max(0, int(largest) - 1)})")  # fmt: skip


def run_ray(cfg: BuildConfig, count: int, address: str | None, retries: int, quiet: bool) -> list[Outcome]:
    """The N partitions as Ray tasks on the cluster at ``address`` (None: ``ray.init()``'s default, a local
    cluster or ``RAY_ADDRESS``)."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    pending: list = []
    try:
        _check_fits(ray, cfg.workers + 1)
        remote = ray.remote(_task).options(
            num_cpus=cfg.workers + 1, max_retries=retries, retry_exceptions=[PartitionCrashed], name="solo-partition"
        )
        refs = {remote.remote(job(cfg, k, count)): k for k in range(count)}
        progress = Progress(cfg.out, count, quiet)
        pending, outcomes = list(refs), {}
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
                for ref in done:
                    outcomes[refs[ref]] = _outcome(ray, ref, refs[ref], retries)
                progress.poll(len(pending), 0)
        finally:
            progress.close()
        return [outcomes[k] for k in range(count)]
    except KeyboardInterrupt:
        print("interrupted: cancelling the partitions' tasks (their finished shards are kept)", file=sys.stderr)
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
