"""Stage 2 of ``build``: the ordered stream of worker results cut into shard groups, each packed by its own
``_C.ShardBuilder`` and finished in the background, with every record counted per source (``report.SourceTally``).

A group closes once its documents hold ``shard_size_packs * seq_length`` tokens; its progress entry (record range,
counts, skips, per-source tallies, file checksums) goes into ``progress.json`` once the shard is on disk, always in
shard order. The packer's two rejections (images larger than a pack, ``--long-text drop``) are decided here first,
so the message can say what would fit.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megatron_solo import _C
from megatron_solo.format.schema import TokenIds
from megatron_solo.preprocess import handoff
from megatron_solo.preprocess import manifest as mf
from megatron_solo.preprocess.report import BuildError, SourceTally, merge_tallies, top_reasons
from megatron_solo.preprocess.worker import Result

if TYPE_CHECKING:
    from megatron_solo.preprocess.build import BuildConfig, BuildPlan


def _arrays(items: list) -> list[np.ndarray]:
    """The document's arrays, with handed-off images mapped from their tmpfs files."""
    return [handoff.load(it) if handoff.is_token(it) else it for it in items]


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}"


@dataclass
class _Group:
    """One shard group being filled: its builder and the counts its progress entry will hold."""

    name: str
    first: int
    builder: object
    tokens: int = 0
    docs: int = 0
    skipped: dict = field(default_factory=dict)
    sample: dict = field(default_factory=dict)
    examples: dict = field(default_factory=dict)
    sources: dict[int, SourceTally] = field(default_factory=dict)
    ids: dict[str, int] = field(default_factory=dict)  # record id -> source, for rejections the packer reports

    def tally(self, source: int) -> SourceTally:
        return self.sources.setdefault(source, SourceTally())

    def skip(self, source: int, reason: str, record_id: str, detail: str = "") -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        sample = self.sample.setdefault(reason, [])
        if len(sample) < mf.SAMPLE_IDS:
            sample.append(record_id)
        examples = self.examples.setdefault(reason, [])
        if detail and len(examples) < mf.EXAMPLES:
            examples.append({"id": record_id, "error": detail})
        self.tally(source).skip(reason, record_id, detail)


def _pack_limit_reason(res: Result, cfg: BuildConfig) -> tuple[str, str] | None:
    """The packer's two rejections, decided here so the message can say what would fit."""
    S = cfg.seq_length
    if res.n_image_tokens + 2 > S:
        return "images_exceed_pack", (
            f"{res.n_images} image(s) take {res.n_image_tokens:,} tokens + BOS/EOS, more than a pack of --seq-length "
            f"{S}: this document needs --seq-length >= {res.n_image_tokens + 2}"
        )
    if cfg.long_text == "drop" and res.n_tokens > S:
        return "long_text_dropped", f"{res.n_tokens:,} tokens > --seq-length {S} (--long-text drop)"
    return None


class ShardGroups:
    """The record stream cut into shard groups: each packed by its own builder and finished (flush, fsync, rename,
    checksums) by one background thread while the next is packed; ``progress.json`` lists a shard once it is done,
    always in shard order."""

    def __init__(self, plan: BuildPlan, bar):
        self.plan, self.cfg, self.bar = plan, plan.cfg, bar
        tok = plan.tok
        self.token_ids = TokenIds.from_tokenizer(tok).as_dict()  # the shard schema's table (format.schema)
        self.target_tokens = self.cfg.shard_size_packs * self.cfg.seq_length
        self.progress = {"build_key": plan.key, "shards": list(plan.kept)}
        self.next_shard = len(plan.kept)
        self.group: _Group | None = None
        self.closer = ThreadPoolExecutor(1, thread_name_prefix="shard-closer")
        self.closing: deque[Future] = deque()
        # Per source over the whole build so far (kept shards included), for failing fast with examples.
        self.seen = merge_tallies(plan.kept, len(plan.sources))

    def add(self, idx: int, res: Result) -> None:
        if self.group is None:
            self._open(idx)
        g = self.group
        t = g.tally(res.source)
        t.records += 1
        for reason, detail in res.dropped:
            t.drop(reason, res.record_id, detail)
        reason, detail = res.reason, res.detail
        if reason is None and (limit := _pack_limit_reason(res, self.cfg)) is not None:
            handoff.discard(res.items)
            reason, detail = limit
        seen = self.seen[res.source]
        seen.records += 1
        if reason is not None:
            g.skip(res.source, reason, res.record_id, detail)
            seen.skip(reason, res.record_id, detail)
            self._fail_fast(res.source, seen)
        else:
            self._add_document(g, res)
            t.documents += 1
            seen.documents += 1
        if g.tokens >= self.target_tokens:
            self.close(idx + 1)
        elif self.closing:
            self.commit(block=False)

    def _add_document(self, g: _Group, res: Result) -> None:
        # Queued for the builder's intake thread, which copies the patches, packs, and frees the slots.
        kw = {} if res.targets is None else {"targets": res.targets, "eos_target": res.eos_target}
        g.builder.add_document(res.record_id, _arrays(res.items), release=handoff.busy_flags(res.items), **kw)
        g.docs += 1
        g.tokens += res.n_tokens
        g.ids[res.record_id] = res.source

    def _fail_fast(self, source: int, seen: SourceTally) -> None:
        """A source whose first ``fail_fast_records`` records were all skipped is misconfigured: stop now rather
        than after hours (the shards finished so far are kept for a resume)."""
        n = self.cfg.fail_fast_records
        if seen.documents == 0 and seen.records == n and self.cfg.max_skip_fraction < 1.0:
            top = "; ".join(top_reasons(seen.skipped, seen.examples))
            spec = self.plan.sources[source].spec()
            raise BuildError(f"source {source + 1} {spec}: its first {n:,} records were all skipped, stopping: {top}")

    def _open(self, first: int) -> None:
        name = _shard_name(self.next_shard)
        self.next_shard += 1
        builder = _C.ShardBuilder(str(self.plan.out / name), self.cfg.seq_length, self.token_ids,
                                  buffer_docs=self.cfg.buffer_docs, long_text=self.cfg.long_text,
                                  checksum=self.cfg.checksum)  # fmt: skip
        self.group = _Group(name, first, builder)

    def close(self, end: int) -> None:
        group, self.group = self.group, None
        self.commit(block=True, keep=1)  # at most two shards in memory: the one closing and the one being filled
        self.closing.append(self.closer.submit(_finish_shard, self.plan.out, group, end))

    def commit(self, block: bool, keep: int = 0) -> None:
        while len(self.closing) > keep and (block or self.closing[0].done()):
            entry = self.closing.popleft().result()
            self.progress["shards"].append(entry)
            mf.write_json_atomic(self.plan.out / mf.PROGRESS_NAME, self.progress)
            st = entry["stats"]
            if st["packs"]:
                self.bar.fill = st["tokens_total"] / st["slots"]
            self.bar.write(f"{entry['name']}: {st['packs']} packs, records {entry['records'][0]}:{entry['records'][1]}")

    def abort(self) -> None:
        if self.group is not None:
            self.group.builder.abort()

    def shutdown(self) -> None:
        self.closer.shutdown(wait=True)


def _finish_shard(out: Path, g: _Group, end: int) -> dict:
    """Finish one shard group's builder (GIL released); returns its progress entry. The file checksums come from
    the builder, which hashes the bytes as it writes them (the same digests that ``mf.verify_checksums`` reads back)."""
    if g.docs:
        stats = g.builder.finish()
        for rid, reason in stats.pop("rejected"):  # decided in Python already (_pack_limit_reason); kept as a net
            source = g.ids.get(rid, 0)
            g.tally(source).documents -= 1
            g.skip(source, reason, rid)
    else:
        g.builder.abort()
        stats = {"packs": 0}
    if stats["packs"] == 0:  # every record of the group skipped/rejected: counts only, no files
        for f in out.glob(f"{g.name}.*"):
            f.unlink()
        files = {}
    else:
        files = stats.pop("files")
    return {
        "name": g.name,
        "records": [g.first, end],
        "stats": {k: stats.get(k, 0) for k in mf.COUNT_KEYS} | {"input_documents": g.docs},
        "skipped": dict(sorted(g.skipped.items())),
        "skipped_sample": dict(sorted(g.sample.items())),
        "skipped_examples": dict(sorted(g.examples.items())),
        "sources": {str(i): t.to_json() for i, t in sorted(g.sources.items())},
        "files": files,
    }
