"""``build``: raw corpora -> a shard set (``manifest.json`` + shards read by ``ShardSet``).

Pipeline: the parent enumerates raw records (``sources``), N worker processes turn chunks of them into documents
(``worker``: the source's parser, Pillow decode + resize, SentencePiece), and the parent feeds the results, in input
order whatever N is, to one ``megatron_solo._C.ShardBuilder`` per shard.

Four named stages (``build`` calls them in order): :func:`plan_build` (options checked, sources opened, the build
key, what a resume keeps), :func:`pack_shards` (records -> workers -> ``shard_groups.ShardGroups``),
:func:`write_manifest`, and :func:`check_build` (``report.problems``: a build that yields nothing, or skips too much,
fails).

Shards and resume: the record stream is cut into shard groups deterministically: a group closes once its documents
hold ``shard_size_packs * seq_length`` tokens (so a shard has about that many packs). Each group is packed by a fresh
builder into ``shard_NNNNN``, so a shard depends only on its records. After each shard the parent records its record
range, counts and file checksums in ``progress.json`` (atomic). A re-run with the same inputs and options keeps the
shards whose checksums verify, deletes everything else, skips the kept records without decoding them and rebuilds
the rest: the result is byte-identical to an uninterrupted run. ``manifest.json`` is written last.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

from megatron_solo import _C
from megatron_solo.format.image import DEFAULT_MAX_PIXELS
from megatron_solo.format.schema import MANIFEST_NAME, SHARD_ENTRY_COUNTS, SHARD_PARTS, TokenIds
from megatron_solo.format.tokens import SoloTokenizer
from megatron_solo.preprocess import handoff
from megatron_solo.preprocess import manifest as mf
from megatron_solo.preprocess.partition import (
    Partition,
    PartitionPlan,
    iter_plan_records,
    partition_dir,
    plan_partition,
)
from megatron_solo.preprocess.report import (
    DEFAULT_MAX_SKIP_FRACTION,
    BuildError,
    BuildFailed,
    merge_tallies,
    problems,
    source_report,
    summary,
)
from megatron_solo.preprocess.shard_groups import ShardGroups
from megatron_solo.preprocess.sources import Record, Source, iter_records, make_sources
from megatron_solo.preprocess.worker import Result, WorkerConfig, init_worker, process_chunk

__all__ = ["BuildConfig", "BuildError", "BuildFailed", "build", "summary"]

KILL_AT_RECORD_ENV = "SOLO_PREPROCESS_KILL_AT_RECORD"  # test hook: SIGKILL the build before adding record R
KILL_ONCE_ENV = "SOLO_PREPROCESS_KILL_ONCE"  # test hook: a directory; each kill of KILL_AT_RECORD happens once


@dataclass
class BuildConfig:
    sources: list[str]  # --source specs, KIND:PATH[,PATH...][,key=value...]
    tokenizer: str
    out: str
    seq_length: int = 32768
    workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1))
    # 256: fill ~0.996 on the SOLO and interleaved+SFT mixes (0.993 at 128: each shard ends part-filled); a resumed
    # build redoes at most one shard, seconds of work at ~1K images/s (bench_pack_fill.py, docs/preprocess.md)
    shard_size_packs: int = 256
    seed: int = 1234
    fast_decode: bool = False
    long_text: str = "split"
    class_names: str | None = None  # build-wide defaults of the sources' options (a spec's own value wins)
    image_root: str | None = None
    template: str | None = None
    loss_on: str | None = None
    max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION
    fail_fast_records: int = 1000  # stop once a source's first this-many records are all skipped
    buffer_docs: int = 4096
    max_pixels: int = DEFAULT_MAX_PIXELS
    chunk_size: int = 32
    checksum: str = mf.CHECKSUMS[0]  # per-file checksum algorithm ("xxh64" or "sha256")
    partition: str | None = None  # "K/N": build only partition K of N, into OUT/part_K_of_N (partition.py)
    quiet: bool = False

    def source_defaults(self) -> dict[str, str | None]:
        return {"class-names": self.class_names, "image-root": self.image_root, "template": self.template,
                "loss-on": self.loss_on}  # fmt: skip


NOT_IN_KEY = ("out", "workers", "quiet", "chunk_size", "sources", "tokenizer", "max_skip_fraction",
              "fail_fast_records", "class_names", "image_root", "template", "loss_on")  # fmt: skip


def _build_options(cfg: BuildConfig, partition: bool = True) -> dict:
    """The options that shape the output (the manifest's ``build``); ``partition`` only when one is built."""
    opts = {k: v for k, v in asdict(cfg).items() if k not in NOT_IN_KEY}
    if not partition or opts["partition"] is None:
        del opts["partition"]
    return opts


def _build_key(cfg: BuildConfig, tok: SoloTokenizer, identity: list[dict], partition: bool = True) -> str:
    """Everything the output depends on (not the worker count): a re-run resumes only if this matches. The
    build-wide source defaults enter through each source's resolved options. Without ``partition``: the key the
    partitions of one build share (``partition.plan_key``, checked by ``merge``)."""
    ident = _build_options(cfg, partition) | {"sources": identity, "tokenizer_sha256": tok.checksum}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _start_method() -> str:
    """How worker processes start: fork on Linux unless SOLO_PREPROCESS_START_METHOD names another method."""
    default = "fork" if sys.platform.startswith("linux") else "spawn"
    return os.environ.get("SOLO_PREPROCESS_START_METHOD", default)


def _ordered_results(
    records: Iterable[tuple[int, object]], cfg: BuildConfig, wcfg: WorkerConfig
) -> Iterator[tuple[int, Result]]:
    """(record index, Result) in input order; chunks go to the workers with a bounded number in flight."""

    def chunks() -> Iterator[list]:
        it = iter(records)
        while chunk := list(islice(it, cfg.chunk_size)):
            yield chunk

    if cfg.workers <= 0:
        init_worker(wcfg)
        for chunk in chunks():
            yield from zip((i for i, _ in chunk), process_chunk([r for _, r in chunk]))
        return
    ctx = get_context(_start_method())
    with ProcessPoolExecutor(
        cfg.workers, mp_context=ctx, initializer=init_worker, initargs=(wcfg, os.getpid())
    ) as pool:
        pending: deque = deque()
        depth = 4 * cfg.workers
        for chunk in chunks():
            pending.append(([i for i, _ in chunk], pool.submit(process_chunk, [r for _, r in chunk])))
            if len(pending) >= depth:
                idx, fut = pending.popleft()
                yield from zip(idx, fut.result())
        while pending:
            idx, fut = pending.popleft()
            yield from zip(idx, fut.result())


def _remove_unlisted(out: Path, keep: set[str]) -> None:
    """Delete shard files (complete, partial, ``.tmp``) that no kept shard owns."""
    for p in out.glob("shard_*"):
        if p.name.split(".", 1)[0] not in keep:
            p.unlink()


def _keep_verified(out: Path, progress: dict | None, key: str, log) -> list[dict]:
    if progress is None:
        return []
    if progress.get("build_key") != key:
        raise BuildError(
            f"{out / mf.PROGRESS_NAME}: belongs to a build with other inputs/options (build_key "
            f"{progress.get('build_key')} != {key}); use a new --out directory or delete {out}"
        )
    kept = []
    for entry in progress["shards"]:
        problems = mf.verify_checksums(out, entry["files"])
        if problems:
            log(f"resume: rebuilding from {entry['name']} ({problems[0]})")
            break
        kept.append(entry)
    if kept:
        log(f"resume: kept {len(kept)} verified shard(s), continuing at record {kept[-1]['records'][1]}")
    return kept


class _Progress:
    """tqdm bar (records/s, images/s, tokens/s, fill) or, quiet, nothing but one line per shard."""

    def __init__(self, quiet: bool, start: int):
        self.quiet = quiet
        self.t0 = time.perf_counter()
        self.images = self.tokens = 0
        self.fill = None
        self.last = 0.0
        self.bar = None
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(initial=start, unit="rec", desc="build", dynamic_ncols=True, file=sys.stderr)

    def update(self, res: Result) -> None:
        self.images += res.n_images
        self.tokens += res.n_tokens
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.last = now
            dt = max(now - self.t0, 1e-9)
            post = {"img/s": f"{self.images / dt:.0f}", "tok/s": f"{self.tokens / dt:.3g}"}
            if self.fill is not None:
                post["fill"] = f"{self.fill:.4f}"
            self.bar.set_postfix(post, refresh=False)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --- stage 1: the plan -------------------------------------------------------------------------------------------


def _log(msg: str) -> None:  # resume decisions and failures: printed in quiet mode too
    print(msg, file=sys.stderr)


def _check_options(cfg: BuildConfig) -> None:
    if cfg.long_text not in ("split", "drop"):
        raise BuildError(f"--long-text must be 'split' or 'drop', got {cfg.long_text!r}")
    if cfg.seq_length < 64:
        raise BuildError(f"--seq-length {cfg.seq_length} is too small")
    if cfg.shard_size_packs < 1:
        raise BuildError("--shard-size-packs must be >= 1")
    if cfg.checksum not in mf.CHECKSUMS:
        raise BuildError(f"--checksum must be one of {', '.join(mf.CHECKSUMS)}, got {cfg.checksum!r}")
    if not 0.0 <= cfg.max_skip_fraction <= 1.0:
        raise BuildError(f"--max-skip-fraction must be in [0, 1], got {cfg.max_skip_fraction}")
    if not cfg.sources:
        raise BuildError("no --source given")


@dataclass
class BuildPlan:
    """Everything decided before the first record is read."""

    cfg: BuildConfig
    tok: SoloTokenizer
    sources: list[Source]
    identity: list[dict]  # per source: kind, resolved options, files (the build key's and manifest's view)
    key: str
    out: Path
    kept: list[dict]  # progress entries of the verified shards a resume keeps
    done: dict | None = None  # the manifest, when the output already holds this complete build
    partition: PartitionPlan | None = None  # --partition K/N: the pieces of the inputs this build reads
    plan_key: str | None = None  # the build key without the partition (shared by the partitions of one build)

    @property
    def start(self) -> int:
        return self.kept[-1]["records"][1] if self.kept else 0

    def records(self) -> Iterator[Record]:
        """The records this build reads: all of them, or its partition's."""
        if self.partition is None:
            return iter_records(self.sources)
        return iter_plan_records(self.sources, self.partition)


def plan_build(cfg: BuildConfig) -> BuildPlan:
    """Check the options, open the sources (their files must exist, their options fit), compute the build key and
    decide what a resume keeps (deleting every shard file it does not)."""
    _check_options(cfg)
    part = Partition.parse(cfg.partition) if cfg.partition is not None else None
    sources = make_sources(cfg.sources, cfg.source_defaults(), cfg.seed)
    tok = SoloTokenizer(cfg.tokenizer)
    identity = [s.identity() for s in sources]
    key = _build_key(cfg, tok, identity)
    out = Path(cfg.out) if part is None else partition_dir(cfg.out, part)
    out.mkdir(parents=True, exist_ok=True)
    plan = BuildPlan(cfg, tok, sources, identity, key, out, kept=[])
    if part is not None:
        plan.partition = plan_partition(sources, part)
        plan.plan_key = _build_key(cfg, tok, identity, partition=False)
    existing = mf.load_json(out / MANIFEST_NAME)
    if existing is not None:
        if existing.get("build", {}).get("build_key") != key:
            raise BuildError(f"{out} already holds a different shard set (manifest.json); use a new --out directory")
        _log(f"{out}: already complete (manifest.json present with the same build key); nothing to do")
        plan.done = existing
        return plan
    plan.kept = _keep_verified(out, mf.load_json(out / mf.PROGRESS_NAME), key, _log)
    _remove_unlisted(out, {e["name"] for e in plan.kept})
    return plan


# --- stage 2: packing shard groups (shard_groups.py) ---------------------------------------------------------------


def pack_shards(plan: BuildPlan) -> list[dict]:
    """Stage 2: the records after the kept ones -> workers -> shard groups; returns every shard's progress entry."""
    cfg = plan.cfg
    kill_at, kill_parent = _kill_hook(plan)
    handoff_dir = handoff.default_dir() if cfg.workers > 0 else ""
    handoff.remove_stale(handoff_dir)
    wcfg = WorkerConfig(str(cfg.tokenizer), plan.sources, cfg.fast_decode, cfg.max_pixels, handoff_dir, os.getpid())
    records = islice(enumerate(plan.records()), plan.start, None)
    bar = _Progress(cfg.quiet, plan.start)
    groups = ShardGroups(plan, bar)
    last = plan.start
    results = _ordered_results(records, cfg, wcfg)
    try:
        for idx, res in results:
            if idx == kill_at:  # test hook: die mid-shard, after the shards before it are committed
                groups.commit(block=True)
                _die(idx, kill_parent)
            groups.add(idx, res)
            bar.update(res)
            last = idx + 1
        if groups.group is not None:
            groups.close(last)
        groups.commit(block=True)
    except BaseException:
        groups.abort()
        raise
    finally:
        results.close()  # stops the worker pool (waits for chunks in flight) before their handoff files are removed
        groups.shutdown()
        bar.close()
        handoff.forget_maps()
        handoff.remove_own(handoff_dir, os.getpid())
        _C.release_buffers()
    return groups.progress["shards"]


def _kill_hook(plan: BuildPlan) -> tuple[int, bool]:
    """(record index to SIGKILL the build at, -1: never; whether to kill the parent process too) from the test hooks:
    ``SOLO_PREPROCESS_KILL_AT_RECORD=R`` (any build), or ``K:R`` / ``K:R:parent`` entries, comma-separated (partition K
    only; ``parent``: first the process that started the build, e.g. the Ray worker running it). With
    ``SOLO_PREPROCESS_KILL_ONCE=DIR`` each kill happens once (a marker file in DIR), so a retried build goes on."""
    spec = os.environ.get(KILL_AT_RECORD_ENV, "").strip()
    if not spec:
        return -1, False
    if ":" not in spec:
        at, parent = int(spec), False
    else:
        part = plan.partition.part.index if plan.partition is not None else None
        hits = [e.split(":") for e in spec.split(",") if int(e.split(":")[0]) == part]
        if not hits:
            return -1, False
        at, parent = int(hits[0][1]), hits[0][2:] == ["parent"]
    once = os.environ.get(KILL_ONCE_ENV)
    if once:
        marker = Path(once) / f"killed_{plan.key}_{at}"
        if marker.exists():
            return -1, False
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return at, parent


def _die(idx: int, parent: bool) -> None:
    who = f"its parent pid {os.getppid()} and itself" if parent else "itself"
    print(f"{KILL_AT_RECORD_ENV}: build pid {os.getpid()} kills {who} at record {idx}", file=sys.stderr)
    sys.stderr.flush()
    if parent:
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


# --- stages 3 and 4: manifest, checks ----------------------------------------------------------------------------


def write_manifest(plan: BuildPlan, entries: list[dict]) -> dict:
    manifest = make_manifest(plan, entries)
    mf.write_json_atomic(plan.out / MANIFEST_NAME, manifest)
    (plan.out / mf.PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


def check_build(manifest: dict, cfg: BuildConfig) -> None:
    """Stage 4: raise ``BuildFailed`` when the result must not pass as a success (``report.problems``)."""
    found = problems(manifest, cfg.max_skip_fraction)
    if found:
        where = Path(cfg.out) / MANIFEST_NAME
        raise BuildFailed("\n".join(found) + f"\n(the shards and every count are in {where})", manifest)


def build(cfg: BuildConfig) -> dict:
    """Build (or resume) the shard set ``cfg.out``; returns the manifest dict (also written to manifest.json).
    Raises ``BuildFailed`` (after writing the manifest) when a source yields nothing or skips too much."""
    plan = plan_build(cfg)
    manifest = plan.done if plan.done is not None else write_manifest(plan, pack_shards(plan))
    if plan.partition is None:  # a partition holds part of each source: the checks run on the merged set (merge.py)
        check_build(manifest, cfg)
    return manifest


def make_manifest(plan: BuildPlan, entries: list[dict]) -> dict:
    cfg, tok = plan.cfg, plan.tok
    counts, skipped = mf.aggregate(entries, cfg.seq_length)
    tallies = merge_tallies(entries, len(plan.sources))
    sources = [source_report(ident, t) for ident, t in zip(plan.identity, tallies)]
    skipped["dropped_images"] = sum(s["dropped_images"]["total"] for s in sources)
    shards = [
        {"prefix": e["name"], "records": e["records"], **{k: e["stats"][k] for k in SHARD_ENTRY_COUNTS}}
        | {"files": e["files"]}
        for e in entries
        if e["files"]
    ]
    build_opts = _build_options(cfg)
    manifest = {
        "format": mf.MANIFEST_FORMAT,
        "format_version": mf.MANIFEST_VERSION,
        "seq_length": cfg.seq_length,
        "counts": counts,
        "skipped": skipped,
        "sources": sources,
        "tokenizer": {
            "path": str(cfg.tokenizer),
            "sha256": tok.checksum,
            "vocab_size": tok.vocab_size,
            "token_ids": TokenIds.from_tokenizer(tok).as_dict(),
        },
        "build": build_opts | {"build_key": plan.key},
        "shard_parts": list(SHARD_PARTS),
        "shards": shards,
    }
    if plan.partition is not None:
        manifest["partition"] = plan.partition.describe() | {"plan_key": plan.plan_key}
    return manifest
