"""``build``: raw corpora -> a shard set (``manifest.json`` + shards read by ``ShardSet``).

Pipeline: the parent enumerates raw records (``sources``), N worker processes turn chunks of them into documents
(``worker``: Pillow decode + resize, SentencePiece), and the parent feeds the results, in input order whatever N is,
to one ``megatron_solo._C.ShardBuilder`` per shard.

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
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from megatron_solo import _C
from megatron_solo.format.image import DEFAULT_MAX_PIXELS
from megatron_solo.format.schema import MANIFEST_NAME, SHARD_ENTRY_COUNTS, SHARD_PARTS, TokenIds
from megatron_solo.format.tokens import SoloTokenizer
from megatron_solo.preprocess import handoff
from megatron_solo.preprocess import manifest as mf
from megatron_solo.preprocess.sources import SourceSpec, iter_records, read_class_names
from megatron_solo.preprocess.worker import Result, WorkerConfig, init_worker, process_chunk

KILL_AT_RECORD_ENV = "SOLO_PREPROCESS_KILL_AT_RECORD"  # test hook: SIGKILL the build before adding record R


class BuildError(RuntimeError):
    """The build cannot start or continue (bad options, an output directory holding another build)."""


@dataclass
class BuildConfig:
    sources: list[str]
    tokenizer: str
    out: str
    seq_length: int = 32768
    workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) - 1))
    shard_size_packs: int = 128  # fill ~0.993 on the SOLO mix; 64 gives ~0.986 (one part-filled pack a shard)
    seed: int = 1234
    fast_decode: bool = False
    long_text: str = "split"
    class_names: str | None = None
    buffer_docs: int = 4096
    max_pixels: int = DEFAULT_MAX_PIXELS
    chunk_size: int = 32
    checksum: str = mf.CHECKSUMS[0]  # per-file checksum algorithm ("xxh64" or "sha256")
    quiet: bool = False


def _source_files(specs: list[SourceSpec]) -> list[dict]:
    out = []
    for s in specs:
        files = []
        for p in s.paths:
            if os.path.isdir(p):
                files.append({"path": p, "type": "dir"})
            else:
                files.append({"path": p, "bytes": os.path.getsize(p)})
        out.append({"spec": str(s), "kind": s.kind, "files": files})
    return out


def _build_key(cfg: BuildConfig, tok: SoloTokenizer, sources: list[dict]) -> str:
    """Everything the output depends on (not the worker count): a re-run resumes only if this matches."""
    class_names = mf.sha256_file(cfg.class_names) if cfg.class_names else None
    ident = {
        "sources": sources,
        "tokenizer_sha256": tok.checksum,
        "seq_length": cfg.seq_length,
        "shard_size_packs": cfg.shard_size_packs,
        "seed": cfg.seed,
        "fast_decode": cfg.fast_decode,
        "long_text": cfg.long_text,
        "class_names": class_names,
        "buffer_docs": cfg.buffer_docs,
        "max_pixels": cfg.max_pixels,
        "checksum": cfg.checksum,
    }
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


def _arrays(items: list) -> list[np.ndarray]:
    """The document's arrays, with handed-off images mapped from their tmpfs files."""
    return [handoff.load(it) if handoff.is_token(it) else it for it in items]


def _count_skip(group: dict, reason: str, record_id: str, detail: str = "") -> None:
    group["skipped"][reason] = group["skipped"].get(reason, 0) + 1
    sample = group["sample"].setdefault(reason, [])
    if len(sample) < mf.SAMPLE_IDS:
        sample.append(record_id)
    examples = group["examples"].setdefault(reason, [])
    if detail and len(examples) < mf.EXAMPLES:
        examples.append({"id": record_id, "error": detail})


def _finish_shard(out: Path, group: dict, end: int) -> dict:
    """Finish one shard group's builder (GIL released); returns its progress entry. The file checksums come from
    the builder, which hashes the bytes as it writes them (the same digests that ``mf.verify_checksums`` reads back)."""
    b, name = group["builder"], group["name"]
    if group["docs"]:
        stats = b.finish()
        for rid, reason in stats.pop("rejected"):
            _count_skip(group, reason, rid)
    else:
        b.abort()
        stats = {"packs": 0}
    if stats["packs"] == 0:  # every record of the group skipped/rejected: counts only, no files
        for f in out.glob(f"{name}.*"):
            f.unlink()
        files = {}
    else:
        files = stats.pop("files")
    return {
        "name": name,
        "records": [group["first"], end],
        "stats": {k: stats.get(k, 0) for k in mf.COUNT_KEYS} | {"input_documents": group["docs"]},
        "skipped": dict(sorted(group["skipped"].items())),
        "skipped_sample": dict(sorted(group["sample"].items())),
        "skipped_examples": dict(sorted(group["examples"].items())),
        "files": files,
    }


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


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


def build(cfg: BuildConfig) -> dict:
    """Build (or resume) the shard set ``cfg.out``; returns the manifest dict (also written to manifest.json)."""

    def log(msg: str) -> None:  # resume decisions: printed in quiet mode too
        print(msg, file=sys.stderr)

    if cfg.long_text not in ("split", "drop"):
        raise BuildError(f"--long-text must be 'split' or 'drop', got {cfg.long_text!r}")
    if cfg.seq_length < 64:
        raise BuildError(f"--seq-length {cfg.seq_length} is too small")
    if cfg.shard_size_packs < 1:
        raise BuildError("--shard-size-packs must be >= 1")
    if cfg.checksum not in mf.CHECKSUMS:
        raise BuildError(f"--checksum must be one of {', '.join(mf.CHECKSUMS)}, got {cfg.checksum!r}")
    specs = [SourceSpec.parse(s) for s in cfg.sources]
    if not specs:
        raise BuildError("no --source given")
    tok = SoloTokenizer(cfg.tokenizer)
    class_names = read_class_names(cfg.class_names)
    sources = _source_files(specs)
    key = _build_key(cfg, tok, sources)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    existing = mf.load_json(out / MANIFEST_NAME)
    if existing is not None:
        if existing.get("build", {}).get("build_key") != key:
            raise BuildError(f"{out} already holds a different shard set (manifest.json); use a new --out directory")
        log(f"{out}: already complete (manifest.json present with the same build key); nothing to do")
        return existing

    kept = _keep_verified(out, mf.load_json(out / mf.PROGRESS_NAME), key, log)
    _remove_unlisted(out, {e["name"] for e in kept})
    start = kept[-1]["records"][1] if kept else 0
    progress = {"build_key": key, "shards": list(kept)}

    token_ids = TokenIds.from_tokenizer(tok).as_dict()
    target_tokens = cfg.shard_size_packs * cfg.seq_length
    kill_at = int(os.environ.get(KILL_AT_RECORD_ENV, "-1"))
    handoff_dir = handoff.default_dir() if cfg.workers > 0 else ""
    handoff.remove_stale(handoff_dir)
    wcfg = WorkerConfig(str(cfg.tokenizer), cfg.fast_decode, cfg.max_pixels, handoff_dir, os.getpid())
    records = islice(enumerate(iter_records(specs, class_names, cfg.seed)), start, None)
    bar = _Progress(cfg.quiet, start)

    state: dict = {}
    next_shard = len(kept)
    # Shards are finished (flush, fsync, rename, checksums) by one background thread while the next one is packed;
    # progress.json lists a shard only once that is done, always in shard order.
    closer = ThreadPoolExecutor(1, thread_name_prefix="shard-closer")
    closing: deque[Future] = deque()

    def commit(block: bool, keep: int = 0) -> None:
        while len(closing) > keep and (block or closing[0].done()):
            entry = closing.popleft().result()
            progress["shards"].append(entry)
            mf.write_json_atomic(out / mf.PROGRESS_NAME, progress)
            if entry["stats"]["packs"]:
                bar.fill = entry["stats"]["tokens_total"] / entry["stats"]["slots"]
            bar.write(
                f"{entry['name']}: {entry['stats']['packs']} packs, records {entry['records'][0]}:{entry['records'][1]}"
            )

    def open_group(first: int) -> None:
        nonlocal next_shard
        name = _shard_name(next_shard)
        next_shard += 1
        state.update(
            name=name,
            first=first,
            tokens=0,
            docs=0,
            skipped={},
            sample={},
            examples={},
            builder=_C.ShardBuilder(
                str(out / name),
                cfg.seq_length,
                buffer_docs=cfg.buffer_docs,
                long_text=cfg.long_text,
                checksum=cfg.checksum,
                token_ids=token_ids,
            ),
        )

    def close_group(end: int) -> None:
        group = dict(state)
        state.clear()
        commit(block=True, keep=1)  # at most two shards in memory: the one closing and the one being filled
        closing.append(closer.submit(_finish_shard, out, group, end))

    last = start
    results = _ordered_results(records, cfg, wcfg)
    try:
        for idx, res in results:
            if idx == kill_at:  # test hook: die mid-shard, after the shards before it are committed
                commit(block=True)
                print(f"{KILL_AT_RECORD_ENV}: build pid {os.getpid()} kills itself at record {idx}", file=sys.stderr)
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if "builder" not in state:
                open_group(idx)
            if res.reason is not None:
                _count_skip(state, res.reason, res.record_id, res.detail)
            else:
                # Queued for the builder's intake thread, which copies the patches, packs, and frees the slots.
                state["builder"].add_document(res.record_id, _arrays(res.items), release=handoff.busy_flags(res.items))
                state["docs"] += 1
                state["tokens"] += res.n_tokens
            bar.update(res)
            last = idx + 1
            if state["tokens"] >= target_tokens:
                close_group(last)
            elif closing:
                commit(block=False)
        if "builder" in state:
            close_group(last)
        commit(block=True)
    except BaseException:
        if "builder" in state:
            state["builder"].abort()
        raise
    finally:
        results.close()  # stops the worker pool (waits for chunks in flight) before their handoff files are removed
        closer.shutdown(wait=True)
        bar.close()
        handoff.forget_maps()
        handoff.remove_own(handoff_dir, os.getpid())
        _C.release_buffers()

    manifest = make_manifest(cfg, tok, sources, key, progress["shards"])
    mf.write_json_atomic(out / MANIFEST_NAME, manifest)
    (out / mf.PROGRESS_NAME).unlink(missing_ok=True)
    return manifest


def make_manifest(cfg: BuildConfig, tok: SoloTokenizer, sources: list[dict], key: str, entries: list[dict]) -> dict:
    counts, skipped = mf.aggregate(entries, cfg.seq_length)
    shards = [
        {"prefix": e["name"], "records": e["records"], **{k: e["stats"][k] for k in SHARD_ENTRY_COUNTS}}
        | {"files": e["files"]}
        for e in entries
        if e["files"]
    ]
    build_opts = asdict(cfg)
    for k in ("out", "workers", "quiet", "chunk_size", "sources", "tokenizer"):
        build_opts.pop(k)
    return {
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
        "build": build_opts | {"build_key": key},
        "shard_parts": list(SHARD_PARTS),
        "shards": shards,
    }


def summary(manifest: dict) -> str:
    """A few human lines: packs, images, text/vision tokens, fill, skipped."""
    c, s = manifest["counts"], manifest["skipped"]
    lines = [
        f"packs {c['packs']:,} x {manifest['seq_length']} tokens in {len(manifest['shards'])} shard(s); "
        f"documents {c['documents']:,} from {c['input_records']:,} records; images {c['images']:,} "
        f"({c['patches']:,} patches)",
        f"tokens {c['tokens_total']:,}: text {c['tokens_text']:,} ({c['text_fraction']:.1%}), vision "
        f"{c['tokens_vision']:,} ({c['vision_fraction']:.1%}); fill {c['fill']:.4f}",
    ]
    if s["total"]:
        lines.append(f"skipped {s['total']:,}: " + ", ".join(f"{k} {v}" for k, v in s["by_reason"].items()))
    return "\n".join(lines)
