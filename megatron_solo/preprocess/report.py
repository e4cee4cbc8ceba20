"""What a build tells its user: per-source counts (records, documents, skips with examples, dropped images), the
console summary, and the checks that fail a build instead of letting it silently produce little or nothing.

A build fails (``BuildFailed``, non-zero exit from the CLI, after ``manifest.json`` is written so the shards and the
reasons can be looked at) when a source yields no document, or skips more than ``--max-skip-fraction`` of its
records. The default 0.05 lets through the dirt every web corpus has (a few corrupt or missing images in a hundred)
and stops what is nearly always a mistake: a wrong kind, a wrong ``image-root``, a column mapping that fits no row,
a ``--seq-length`` too short for the images. A build that skipped more on purpose is accepted by re-running the same
command with a larger fraction: the complete shard set is kept and only the check runs again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXAMPLES = 3  # (record id, message) kept per reason and source
DELIBERATE = ("long_text_dropped",)  # skips the user asked for (--long-text drop): not counted against the fraction
DEFAULT_MAX_SKIP_FRACTION = 0.05


class BuildError(RuntimeError):
    """The build cannot start or continue (bad options, an output directory holding another build, a source that
    yields nothing from its first records)."""


class BuildFailed(RuntimeError):
    """The build finished but its result fails a check (0 documents from a source, too many skips); ``manifest`` is
    the written manifest."""

    def __init__(self, message: str, manifest: dict):
        super().__init__(message)
        self.manifest = manifest


def _add_example(examples: dict[str, list[dict]], reason: str, record_id: str, detail: str) -> None:
    ex = examples.setdefault(reason, [])
    if len(ex) < EXAMPLES:
        ex.append({"id": record_id, "error": detail})


@dataclass
class SourceTally:
    """One source's counts within one shard group (merged over the shards for the manifest)."""

    records: int = 0
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_examples: dict[str, list[dict]] = field(default_factory=dict)

    def skip(self, reason: str, record_id: str, detail: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        _add_example(self.examples, reason, record_id, detail)

    def drop(self, reason: str, record_id: str, detail: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        _add_example(self.dropped_examples, reason, record_id, detail)

    def merge(self, other: SourceTally) -> None:
        self.records += other.records
        self.documents += other.documents
        for mine, theirs in ((self.skipped, other.skipped), (self.dropped, other.dropped)):
            for k, n in theirs.items():
                mine[k] = mine.get(k, 0) + n
        for mine, theirs in ((self.examples, other.examples), (self.dropped_examples, other.dropped_examples)):
            for k, ex in theirs.items():
                mine.setdefault(k, []).extend(ex[: EXAMPLES - len(mine.get(k, []))])

    def to_json(self) -> dict:
        return {
            "records": self.records,
            "documents": self.documents,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": dict(sorted(self.examples.items())),
            "dropped_images": dict(sorted(self.dropped.items())),
            "dropped_examples": dict(sorted(self.dropped_examples.items())),
        }

    @classmethod
    def from_json(cls, d: dict) -> SourceTally:
        return cls(d["records"], d["documents"], dict(d["skipped"]), {k: list(v) for k, v in d["examples"].items()},
                   dict(d["dropped_images"]), {k: list(v) for k, v in d["dropped_examples"].items()})  # fmt: skip


def merge_tallies(entries: list[dict], n_sources: int) -> list[SourceTally]:
    """Per-source totals over the progress entries of a build's shards."""
    out = [SourceTally() for _ in range(n_sources)]
    for e in entries:
        for i, t in e.get("sources", {}).items():
            out[int(i)].merge(SourceTally.from_json(t))
    return out


def source_report(identity: dict, tally: SourceTally) -> dict:
    """A manifest ``sources[i]`` entry: what was read (identity) and what came of it."""
    skipped_total = sum(tally.skipped.values())
    dropped_total = sum(tally.dropped.values())
    return identity | {
        "counts": {"records": tally.records, "documents": tally.documents},
        "skipped": {"total": skipped_total, "by_reason": dict(sorted(tally.skipped.items())),
                    "examples": dict(sorted(tally.examples.items()))},
        "dropped_images": {"total": dropped_total, "by_reason": dict(sorted(tally.dropped.items())),
                           "examples": dict(sorted(tally.dropped_examples.items()))},
    }  # fmt: skip


REPORT_KEYS = ("counts", "skipped", "dropped_images")  # what source_report adds to a source's identity


def merge_source_reports(reports: list[dict]) -> dict:
    """Several shard sets' reports of the same source (the partitions of one build) as one."""
    total = SourceTally()
    for r in reports:
        sk, dr = r["skipped"], r["dropped_images"]
        total.merge(SourceTally(r["counts"]["records"], r["counts"]["documents"], dict(sk["by_reason"]),
                                {k: list(v) for k, v in sk["examples"].items()}, dict(dr["by_reason"]),
                                {k: list(v) for k, v in dr["examples"].items()}))  # fmt: skip
    identity = {k: v for k, v in reports[0].items() if k not in REPORT_KEYS}
    return source_report(identity, total)


def top_reasons(by_reason: dict[str, int], examples: dict[str, list[dict]], k: int = 3) -> list[str]:
    lines = []
    for reason, n in sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))[:k]:
        ex = examples.get(reason) or []
        eg = f", e.g. {ex[0]['id']}: {ex[0]['error']}" if ex and ex[0].get("error") else (
            f", e.g. {ex[0]['id']}" if ex else "")  # fmt: skip
        lines.append(f"{reason} {n:,}{eg}")
    return lines


def _name(i: int, src: dict) -> str:
    opts = ", ".join(f"{k}={v['path'] if isinstance(v, dict) else v}" for k, v in src.get("options", {}).items())
    return f"source {i + 1} {src['spec']}" + (f" ({opts})" if opts else "")


def summary(manifest: dict, manifest_path: str | None = None) -> str:
    """A few human lines: packs, images, text/vision tokens, fill; per source: records -> documents and the top skip
    reasons with one example each; where the details are."""
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
    noisy = False
    for i, src in enumerate(manifest["sources"]):
        sc, sk, dr = src.get("counts"), src.get("skipped"), src.get("dropped_images")
        if sc is None:
            continue
        if len(manifest["sources"]) > 1 or sk["total"] or dr["total"]:
            frac = f" ({sk['total'] / sc['records']:.1%})" if sc["records"] else ""
            lines.append(f"{_name(i, src)}: {sc['records']:,} records -> {sc['documents']:,} documents"
                         + (f"; skipped {sk['total']:,}{frac}" if sk["total"] else ""))  # fmt: skip
            lines += [f"    {ln}" for ln in top_reasons(sk["by_reason"], sk["examples"])]
            if dr["total"]:
                lines.append(f"    dropped images {dr['total']:,} (documents kept): "
                             + "; ".join(top_reasons(dr["by_reason"], dr["examples"])))  # fmt: skip
            noisy = noisy or bool(sk["total"] or dr["total"])
    if noisy:
        where = manifest_path or "manifest.json"
        lines.append(f'details: {where} ("sources"[i].skipped / .dropped_images; "skipped".samples: record ids)')
    return "\n".join(lines)


def problems(manifest: dict, max_skip_fraction: float) -> list[str]:
    """Why this build must not pass as a success (empty: it may)."""
    out = []
    for i, src in enumerate(manifest["sources"]):
        sc, sk = src.get("counts"), src.get("skipped")
        if sc is None:
            continue
        top = "; ".join(top_reasons(sk["by_reason"], sk["examples"]))
        if sc["records"] == 0:
            out.append(f"{_name(i, src)}: no records at all (empty input files?)")
        elif sc["documents"] == 0:
            out.append(f"{_name(i, src)}: 0 documents from {sc['records']:,} records: {top}")
        else:
            counted = sum(n for r, n in sk["by_reason"].items() if r not in DELIBERATE)
            frac = counted / sc["records"]
            if frac > max_skip_fraction:
                out.append(
                    f"{_name(i, src)}: skipped {counted:,} of {sc['records']:,} records ({frac:.1%}) > "
                    f"--max-skip-fraction {max_skip_fraction:g}: {top}. If that is expected, re-run the same command "
                    f"with --max-skip-fraction {min(1.0, round(frac + 0.005, 2)):g} (the shards are kept)"
                )
    return out
