"""Shard-set manifest and build-progress files: checksums, atomic JSON writes, count aggregation."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from megatron_solo import _C
from megatron_solo.format.schema import (  # noqa: F401 (MANIFEST_FORMAT, MANIFEST_VERSION: as build.py names them)
    COUNT_KEYS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    shard_files,
)

PROGRESS_NAME = "progress.json"
SAMPLE_IDS = 20  # offending record ids kept per skip reason
EXAMPLES = 3  # (record id, error message) kept per skip reason

CHECKSUMS = ("xxh64", "sha256")  # --checksum choices; the first is the default


def sha256_file(path: str | os.PathLike) -> str:
    """Plain hex sha256 of a file (the tokenizer and class-name files the build key names)."""
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11: reads into one reused buffer
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        return h.hexdigest()


def file_checksum(path: str | os.PathLike, algo: str = CHECKSUMS[0]) -> str:
    """``"<algo>:<hex>"`` of a file, the form the builder records (C++, GIL released: XXH64 ~14 GB/s, SHA-256 with
    SHA-NI ~1.8 GB/s)."""
    return _C.file_checksum(os.fspath(path), algo)


def checksum_algo(digest: str) -> str:
    """The algorithm a recorded digest names. A bare 64-hex digest is sha256 (shard sets from before tagged digests)."""
    algo, sep, _ = digest.partition(":")
    if sep:
        if algo not in CHECKSUMS:
            raise ValueError(f"unknown checksum algorithm {algo!r} in {digest!r}")
        return algo
    return "sha256"


def _matches(path: Path, want: str) -> bool:
    algo = checksum_algo(want)
    return file_checksum(path, algo) == (want if ":" in want else f"{algo}:{want}")


def shard_checksums(out_dir: Path, name: str, algo: str = CHECKSUMS[0]) -> dict[str, str]:
    """Checksums of the shard's files read back from disk, keyed by file name (relative to the shard-set
    directory). The build takes the same digests from ``ShardBuilder.finish()["files"]`` (hashed while writing)."""
    return {Path(f).name: file_checksum(f, algo) for f in shard_files(out_dir / name)}


def verify_checksums(out_dir: Path, files: dict[str, str]) -> list[str]:
    """Problems (empty list = all files present with the recorded checksums)."""
    problems = []
    for fname, want in files.items():
        p = out_dir / fname
        try:
            algo = checksum_algo(want)
        except ValueError as e:
            problems.append(f"{p}: {e}")
            continue
        if not p.exists():
            problems.append(f"{p}: missing")
        elif not _matches(p, want):
            problems.append(f"{p}: {algo} checksum mismatch (file changed or corrupt)")
    return problems


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write to a temp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    data = (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def aggregate(shards: Iterable[dict], seq_length: int) -> tuple[dict, dict]:
    """(counts, skipped) over the shard entries of a build (SOLO Table 1 style counts + skip reasons)."""
    counts = dict.fromkeys(COUNT_KEYS, 0)
    counts["input_records"] = 0
    by_reason: dict[str, int] = {}
    samples: dict[str, list[str]] = {}
    examples: dict[str, list[dict]] = {}
    for s in shards:
        for k in COUNT_KEYS:
            counts[k] += int(s["stats"].get(k, 0))
        counts["input_records"] += s["records"][1] - s["records"][0]
        for reason, n in s["skipped"].items():
            by_reason[reason] = by_reason.get(reason, 0) + n
        for reason, ids in s["skipped_sample"].items():
            room = SAMPLE_IDS - len(samples.setdefault(reason, []))
            samples[reason].extend(ids[:room])
        for reason, ex in s.get("skipped_examples", {}).items():
            room = EXAMPLES - len(examples.setdefault(reason, []))
            examples[reason].extend(ex[:room])
    skipped = {
        "total": sum(by_reason.values()),
        "by_reason": dict(sorted(by_reason.items())),
        "samples": dict(sorted(samples.items())),
        "examples": dict(sorted(examples.items())),
    }
    return _with_fractions(counts), skipped


def _with_fractions(counts: dict) -> dict:
    """``counts`` with the derived ratios (fill, text / vision / target fraction) computed from its sums."""
    total = counts["tokens_total"]
    counts["fill"] = round(total / counts["slots"], 6) if counts["slots"] else 0.0
    counts["text_fraction"] = round(counts["tokens_text"] / total, 6) if total else 0.0
    counts["vision_fraction"] = round(counts["tokens_vision"] / total, 6) if total else 0.0
    counts["target_fraction"] = round(counts["tokens_target"] / total, 6) if total else 0.0
    return counts


def merge_counts(all_counts: Iterable[dict]) -> dict:
    """The ``counts`` of several shard sets' manifests as one set's (sums; the ratios recomputed)."""
    out = dict.fromkeys((*COUNT_KEYS, "input_records"), 0)
    for c in all_counts:
        for k in out:
            out[k] += int(c.get(k, 0))
    return _with_fractions(out)


def merge_skipped(all_skipped: Iterable[dict]) -> dict:
    """The ``skipped`` of several manifests as one (sums; the first record ids and examples per reason kept)."""
    out = {"total": 0, "by_reason": {}, "samples": {}, "examples": {}, "dropped_images": 0}
    for s in all_skipped:
        out["total"] += s["total"]
        out["dropped_images"] += s.get("dropped_images", 0)
        for reason, n in s["by_reason"].items():
            out["by_reason"][reason] = out["by_reason"].get(reason, 0) + n
        for key, keep in (("samples", SAMPLE_IDS), ("examples", EXAMPLES)):
            for reason, items in s.get(key, {}).items():
                have = out[key].setdefault(reason, [])
                have.extend(items[: keep - len(have)])
    for key in ("by_reason", "samples", "examples"):
        out[key] = dict(sorted(out[key].items()))
    return out


def load_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    return json.loads(path.read_text())


def manifest_path(out_dir: Path) -> Path:
    return out_dir / MANIFEST_NAME
