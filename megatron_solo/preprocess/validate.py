"""``validate DIR``: checksums, counts vs the manifest, pack boundaries. Reads through ShardSet
(i.e. megatron-core's IndexedDataset), so what validates is what training will read. A merged set (merge.py) is
checked the same way through the shards it lists, plus each merged set's manifest against its recorded checksum."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from megatron_solo.data.shards import Shard, read_manifest
from megatron_solo.format.schema import PATCH_DIM, SHARD_ENTRY_COUNTS
from megatron_solo.preprocess import manifest as mf
from megatron_solo.preprocess.merge import check_merged_sets, is_merged

TOTALS = ("packs", "documents", "images", "patches", "tokens_total", "tokens_vision", "tokens_target")


def _check_targets(shard: Shard, i: int, tokens: np.ndarray, cu: np.ndarray, where: str) -> tuple[list[str], int]:
    """(problems, target tokens) of pack i: stored runs well formed (v2) and no target on a document's BOS, an image
    layout token or padding."""
    n_real = int(cu[-1])
    p: list[str] = []
    if shard.targets is not None:
        runs = np.asarray(shard.targets[i], dtype=np.int64)
        bounds = np.concatenate([[0], runs, [n_real]]) if len(runs) % 2 == 0 else None
        # canonical: 0 <= s0 < e0 < s1 < e1 ... <= n_real (maximal runs, so no run ends where the next starts)
        if bounds is None or np.any(np.diff(bounds[1:-1]) <= 0) or np.any(np.diff(bounds) < 0):
            p.append(f"{where}: stored target runs are not sorted disjoint [start, end) pairs in 0..{n_real}")
            return p, 0
    targets = shard.pack_targets(i, tokens, n_real).astype(bool)
    ids = shard.ids
    starts = cu[:-1][tokens[cu[:-1]] == ids.bos]
    if targets[starts].any():
        p.append(f"{where}: a document's BOS is marked as a target")
    on_layout = targets & np.isin(tokens, ids.layout_ids)
    if on_layout.any():
        p.append(f"{where}: {int(on_layout.sum())} image layout tokens marked as targets")
    if targets[n_real:].any():
        p.append(f"{where}: padding marked as a target")
    return p, int(targets.sum())


def _check_pack(shard: Shard, i: int, where: str) -> tuple[list[str], dict]:
    ids, S = shard.ids, shard.seq_length
    tokens = np.asarray(shard.tokens[i])
    cu = np.asarray(shard.docs[i])
    n_patch_values = len(shard.patches[i])
    p: list[str] = []
    if len(tokens) != S:
        p.append(f"{where}: {len(tokens)} tokens, expected seq_length {S}")
    if len(cu) < 2 or cu[0] != 0 or np.any(np.diff(cu) <= 0) or cu[-1] > S:
        p.append(f"{where}: cu_seqlens not 0 < ... strictly increasing <= {S}: {cu[:8].tolist()}...")
        return p, {}
    n_real = int(cu[-1])
    if np.any(tokens[n_real:] != ids.pad):
        p.append(f"{where}: non-pad token after the last document (position >= {n_real})")
    is_patch = tokens[:n_real] == ids.vpatch
    n_patches = int(is_patch.sum())
    if n_patch_values != n_patches * PATCH_DIM:
        p.append(f"{where}: {n_patch_values // PATCH_DIM} patches stored but {n_patches} <vpatch> tokens")
    starts = tokens[cu[:-1]]
    n_vis = int(np.isin(tokens[:n_real], ids.layout_ids).sum())
    n_open, n_close = int((tokens == ids.vision).sum()), int((tokens == ids.vision_end).sum())
    if n_open != n_close:
        p.append(f"{where}: {n_open} <vision> but {n_close} </vision>")
    target_problems, n_target = _check_targets(shard, i, tokens, cu, where)
    counts = {
        "documents": len(cu) - 1,
        "images": n_open,
        "patches": n_patches,
        "tokens_total": n_real,
        "tokens_vision": n_vis,
        "tokens_target": n_target,
        "bos": int((starts == ids.bos).sum()),
    }
    return p + target_problems, counts


def validate(directory: str | os.PathLike, checksums: bool = True) -> tuple[list[str], str]:
    """(problems, one-line report). No problems = the shard set matches its manifest and every pack is well formed."""
    d = Path(directory)
    problems: list[str] = []
    man = read_manifest(d)
    S = man.get("seq_length")
    totals = dict.fromkeys(TOTALS, 0)
    if is_merged(man):  # a merged set's shards are the listed sets': each set must still be the one merged
        problems += check_merged_sets(d, man)
    for entry in man.get("shards", []):
        name = entry["prefix"]
        if checksums:
            problems += mf.verify_checksums(d, entry.get("files", {}))
        try:
            shard = Shard(d / name, S)
        except (FileNotFoundError, ValueError, AssertionError, OSError) as e:
            problems.append(f"{name}: cannot be opened: {e}")
            continue
        if len(shard) != entry.get("packs"):
            problems.append(f"{name}: {len(shard)} packs, manifest says {entry.get('packs')}")
        shard_counts = dict.fromkeys(totals, 0)
        for i in range(len(shard)):
            p, c = _check_pack(shard, i, f"{name} pack {i}")
            problems += p
            for k in totals:
                shard_counts[k] += c.get(k, 0)
            shard_counts["packs"] += 1
        for k in SHARD_ENTRY_COUNTS:
            if shard_counts[k] != entry.get(k):
                problems.append(f"{name}: {shard_counts[k]} {k} in the packs, manifest says {entry.get(k)}")
        if "tokens_target" in shard.meta and shard.meta["tokens_target"] != shard_counts["tokens_target"]:
            problems.append(
                f"{name}: {shard_counts['tokens_target']} target tokens in the packs, sidecar says "
                f"{shard.meta['tokens_target']}"
            )
        for k in totals:
            totals[k] += shard_counts[k]
    counts = man.get("counts", {})
    for k, v in totals.items():
        if k == "tokens_target" and k not in counts:
            continue  # a shard set from before stored targets (v1): its targets are derived
        if counts.get(k) != v:
            problems.append(f"manifest counts.{k} = {counts.get(k)} but the shards hold {v}")
    report = (
        f"{totals['packs']} packs, {totals['documents']} documents, {totals['images']} images, "
        f"{totals['patches']} patches, {totals['tokens_total']} tokens ({totals['tokens_target']} targets)"
        + (", checksums verified" if checksums else "")
    )
    return problems, report
