"""``merge OUT [SET ...]``: one shard set made of other shard sets by reference (a manifest only, no data copied).

``OUT/manifest.json`` lists every shard of the sets it merges, its prefix and file checksums relative to OUT, so
whatever reads a shard set (``ShardSet``: the trainer's ``--data-path``, ``validate``, ``inspect``, the blend) reads
the merged set as one with no change. Counts, the token mix, skips and per-source reports are summed over the sets;
each set is recorded (``merged.sets``) with the checksum of its own manifest, which ``validate`` checks again (a set
rebuilt after the merge is caught).

The sets: OUT's own partitions (``OUT/part_K_of_N``, written by ``build --partition K/N --out OUT``), then the sets
OUT's manifest already lists (merging again appends: new data is added without rebuilding anything), then the SETs
given (a merged set gives its sets). Refused, with the set named: a set built with another tokenizer (checksum or
token ids), ``seq_length``, manifest or shard format version; an unfinished partition; the same partition twice;
a partitioned build with partitions missing (unless ``allow_partial``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_solo.data.shards import read_shard_meta
from megatron_solo.format.schema import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION
from megatron_solo.preprocess import manifest as mf
from megatron_solo.preprocess.partition import Partition
from megatron_solo.preprocess.report import REPORT_KEYS, BuildError, merge_source_reports

MANIFEST_CHECKSUM = "xxh64"  # of each merged set's manifest.json (recorded in merged.sets[i].manifest)


class MergeError(BuildError):
    """The sets cannot be merged (the message names the set and what differs)."""


def is_merged(manifest: dict) -> bool:
    return "merged" in manifest


def own_partitions(out: Path) -> list[Path]:
    """``OUT/part_K_of_N`` directories, by N then K; an unfinished one (no manifest.json) is an error."""
    found = sorted(
        ((p, part) for p in out.iterdir() if p.is_dir() and (part := Partition.from_dir_name(p.name))),
        key=lambda pp: (pp[1].count, pp[1].index),
    )
    unfinished = [f"{part} ({p})" for p, part in found if not (p / MANIFEST_NAME).exists()]
    if unfinished:
        raise MergeError(
            f"{out}: partition(s) {', '.join(unfinished)} not finished (no {MANIFEST_NAME}): run (or re-run, it "
            "resumes) their build --partition K/N first"
        )
    return [p for p, _ in found]


def _leaves(path: Path) -> list[Path]:
    """The plain shard sets behind ``path`` (a merged set's sets, or ``path`` itself)."""
    man = mf.load_json(path / MANIFEST_NAME)
    if man is None:
        raise MergeError(f"{path}: no {MANIFEST_NAME} (not a shard set, or its build has not finished)")
    if not is_merged(man):
        return [path]
    return [(path / s["path"]).resolve() for s in man["merged"]["sets"]]


def _shard_version(set_dir: Path, man: dict) -> int | None:
    if not man.get("shards"):
        return None
    prefix = man["shards"][0]["prefix"]
    return int(read_shard_meta(prefix if os.path.isabs(prefix) else set_dir / prefix)["format_version"])


def _identity(set_dir: Path, man: dict) -> dict:
    """What must agree between merged sets."""
    if man.get("format") != MANIFEST_FORMAT:
        raise MergeError(f"{set_dir}: not a {MANIFEST_FORMAT} manifest (format {man.get('format')!r})")
    tok = man.get("tokenizer", {})
    return {
        "manifest format_version": man.get("format_version"),
        "shard format_version": _shard_version(set_dir, man),
        "seq_length": man.get("seq_length"),
        "tokenizer sha256": tok.get("sha256"),
        "token ids": tok.get("token_ids"),
    }


def _check_compatible(sets: list[tuple[Path, dict]]) -> None:
    first_dir, first = sets[0][0], _identity(*sets[0])
    for d, man in sets[1:]:
        ident = _identity(d, man)
        for k, v in ident.items():
            want = first[k]
            if k == "shard format_version" and None in (v, want):
                continue  # a set without shards has no shard version
            if v != want:
                raise MergeError(f"cannot merge {d}: its {k} is {v!r}, but {first_dir} has {want!r}")


def _data_key(man: dict) -> str | None:
    """The key of the build a set is (part of): a partition's ``plan_key`` is the key its build would have had
    unpartitioned, so a plain build and any partitioning of the same inputs and options share it."""
    part = man.get("partition")
    return part["plan_key"] if part else man.get("build", {}).get("build_key")


def _check_partitions(sets: list[tuple[Path, dict]], allow_partial: bool) -> None:
    """No build's records twice (a build listed twice, partitioned two ways, or one partition twice); no
    partitioned build with partitions missing (unless allowed)."""
    builds: dict[str, dict] = {}  # data key -> {"count": N or None (plain), "have": {index: dir}}
    for d, man in sets:
        key, part = _data_key(man), man.get("partition")
        if key is None:
            continue
        count, index = (part["count"], part["index"]) if part else (None, None)
        b = builds.setdefault(key, {"count": count, "have": {}})
        first = next(iter(b["have"].values()), None)
        if b["count"] != count or index in b["have"]:
            how = "twice" if b["count"] == count else "partitioned two ways (or also unpartitioned)"
            raise MergeError(f"cannot merge {d}: the same build (key {key}) is already there as {first}, "
                             f"{how}: its records would be in the merged set twice")  # fmt: skip
        b["have"][index] = d
    for key, b in builds.items():
        if b["count"] is None:
            continue
        missing = [f"{k}/{b['count']}" for k in range(b["count"]) if k not in b["have"]]
        if missing and not allow_partial:
            where = next(iter(b["have"].values())).parent
            raise MergeError(
                f"the partitioned build in {where} (key {key}) lacks partition(s) {', '.join(missing)}: build them "
                "first, or merge what there is with --allow-partial"
            )


def _sources(sets: list[tuple[Path, dict]]) -> tuple[list[dict], list[list[int]]]:
    """The merged ``sources`` (one per distinct source identity, in first-seen order) and, per set, where each of
    its sources went."""
    keys: dict[str, int] = {}
    reports: list[list[dict]] = []
    where: list[list[int]] = []
    for _, man in sets:
        idx = []
        for src in man["sources"]:
            key = json.dumps({k: v for k, v in src.items() if k not in REPORT_KEYS}, sort_keys=True)
            if key not in keys:
                keys[key] = len(reports)
                reports.append([])
            reports[keys[key]].append(src)
            idx.append(keys[key])
        where.append(idx)
    return [merge_source_reports(r) for r in reports], where


def _shard_entries(out: Path, set_dir: Path, rel: str, man: dict, i: int) -> list[dict]:
    def under(name: str) -> str:
        return name if os.path.isabs(name) else os.path.normpath(os.path.join(rel, name))

    return [
        e | {"prefix": under(e["prefix"]), "files": {under(f): c for f, c in e["files"].items()}, "set": i}
        for e in man["shards"]
    ]


def merged_manifest(out: Path, sets: list[tuple[Path, dict]]) -> dict:
    """The manifest of ``out`` listing ``sets`` ((directory, manifest) pairs) as one shard set."""
    sources, where = _sources(sets)
    entries, shards = [], []
    for i, ((d, man), src_idx) in enumerate(zip(sets, where)):
        rel = os.path.relpath(d, out)
        entry = {
            "path": rel,
            "manifest": mf.file_checksum(d / MANIFEST_NAME, MANIFEST_CHECKSUM),
            "build_key": man.get("build", {}).get("build_key"),
            "packs": man["counts"]["packs"],
            "input_records": man["counts"]["input_records"],
            "sources": src_idx,
        }
        if "partition" in man:
            entry["partition"] = {k: man["partition"][k] for k in ("index", "count", "plan_key", "bytes")}
        entries.append(entry)
        shards += _shard_entries(out, d, rel, man, i)
    first = sets[0][1]
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "seq_length": first["seq_length"],
        "counts": mf.merge_counts(m["counts"] for _, m in sets),
        "skipped": mf.merge_skipped(m["skipped"] for _, m in sets),
        "sources": sources,
        "tokenizer": first["tokenizer"],
        "merged": {"sets": entries},
        "shard_parts": first.get("shard_parts"),
        "shards": shards,
    }


def merge(out: str | os.PathLike, sets: list[str | os.PathLike] = (), fresh: bool = False,
          allow_partial: bool = False) -> dict:  # fmt: skip
    """Write ``out/manifest.json`` merging OUT's partitions, the sets its manifest lists (unless ``fresh``) and
    ``sets``; returns the manifest."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    existing = mf.load_json(out / MANIFEST_NAME)
    if existing is not None and not is_merged(existing):
        raise MergeError(f"{out} holds a built shard set, not a merged one: merge into a new directory (NEW {out} ...)")
    dirs = own_partitions(out)
    if existing is not None and not fresh:
        dirs += [(out / s["path"]).resolve() for s in existing["merged"]["sets"]]
    for s in sets:
        dirs += _leaves(Path(s).resolve())
    seen, unique = set(), []
    for d in dirs:
        d = d.resolve()
        if d == out:
            raise MergeError(f"{out}: a merged set cannot list itself")
        if d not in seen:
            seen.add(d)
            unique.append(d)
    if not unique:
        raise MergeError(f"{out}: nothing to merge (no part_K_of_N directories and no sets given)")
    loaded = []
    for d in unique:
        man = mf.load_json(d / MANIFEST_NAME)
        if man is None:
            raise MergeError(f"{d}: no {MANIFEST_NAME} (a listed set is gone or unfinished)")
        loaded.append((d, man))
    _check_compatible(loaded)
    _check_partitions(loaded, allow_partial)
    manifest = merged_manifest(out, loaded)
    mf.write_json_atomic(out / MANIFEST_NAME, manifest)
    return manifest


def check_merged_sets(directory: Path, manifest: dict) -> list[str]:
    """``validate``'s check of a merged set: every set it lists still has the manifest it had at the merge."""
    problems = []
    for s in manifest.get("merged", {}).get("sets", []):
        p = directory / s["path"] / MANIFEST_NAME
        if not p.exists():
            problems.append(f"{p}: missing (a merged set is gone)")
        elif mf.file_checksum(p, MANIFEST_CHECKSUM) != s["manifest"]:
            problems.append(f"{p}: changed since the merge (the set was rebuilt?): run merge again")
    return problems
