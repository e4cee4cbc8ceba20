"""Read SOLO shards (written by ``megatron_solo._C.ShardBuilder``) as ``Pack``s.

Each shard prefix holds one Megatron-Core MMIDIDX dataset per part (one IndexedDataset "sequence" per pack) and a
JSON sidecar; see docs/shard_format.md (the names: megatron_solo/format/schema.py). Reading goes through Megatron's
own ``IndexedDataset`` (mmap): ``Pack.patches`` is a read-only view into the mapped ``.patches.bin``, never a copy.
Format v2 stores the loss targets; a v1 shard (no targets part) reads with the targets derived by the v1 rule.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_solo.format.schema import (
    DOCS,
    MANIFEST_NAME,
    MMIDIDX_SUFFIXES,
    PATCH_DIM,
    PATCHES,
    READABLE_VERSIONS,
    SHARD_FORMAT,
    TARGETS,
    TOKENS,
    TokenIds,
    part_prefix,
    shard_parts,
    sidecar_path,
)


@dataclass
class Pack:
    """One packed training sequence (see the ``ShardSet`` contract in docs/architecture.md)."""

    tokens: np.ndarray  # int32[S], padded with pad id after cu_seqlens[-1]
    targets: np.ndarray  # uint8[S], 1 where token t is a loss target (never BOS, an image layout token or padding)
    patches: np.ndarray  # uint8[P, PATCH_DIM], one row per <vpatch> token, in token order
    cu_seqlens: np.ndarray  # int32[D+1], document boundaries; cu_seqlens[-1] = real tokens
    doc_has_image: np.ndarray  # bool[D]


def read_shard_meta(prefix: str | os.PathLike) -> dict:
    """The sidecar ``{prefix}.json`` (its presence marks a complete shard)."""
    path = Path(sidecar_path(prefix))
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; the shard at prefix {prefix} is incomplete (finish() never ran?)")
    meta = json.loads(path.read_text())
    if meta.get("format") != SHARD_FORMAT or meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: not a {SHARD_FORMAT} sidecar of a readable version {READABLE_VERSIONS}: format "
            f"{meta.get('format')!r} version {meta.get('format_version')!r}"
        )
    return meta


def read_manifest(path: str | os.PathLike) -> dict:
    """``manifest.json`` of a shard-set directory (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.exists():
        raise FileNotFoundError(f"{p}: no shard-set manifest")
    return json.loads(p.read_text())


def _manifest_prefixes(directory: Path, manifest: dict) -> list[str]:
    """Shard prefixes listed by the manifest (``shards``: names/prefixes or dicts with ``prefix``/``name``),
    relative to the directory; without a list, every complete shard (with its sidecar) in sorted order."""
    entries = manifest.get("shards")
    if entries is None:
        index = part_prefix("", TOKENS) + MMIDIDX_SUFFIXES[-1]  # ".tokens.idx": one per shard
        prefixes = [str(s)[: -len(index)] for s in sorted(directory.glob(f"*{index}"))]
        return [p for p in prefixes if Path(sidecar_path(p)).exists()]
    prefixes = []
    for e in entries:
        name = e if isinstance(e, str) else e.get("prefix", e.get("name"))
        if name is None:
            raise ValueError(f"{directory / MANIFEST_NAME}: shard entry without 'prefix'/'name': {e!r}")
        prefixes.append(str(directory / name) if not os.path.isabs(name) else name)
    return prefixes


def derive_text_mask(tokens: np.ndarray, n_real: int, ids: TokenIds) -> np.ndarray:
    """The v1 target rule (shards before stored targets): 1 where position < n_real (not padding), token != BOS and
    token < first_special (vision/special ids are >= first_special; EOS is text)."""
    mask = (tokens != ids.bos) & (tokens < ids.first_special)
    mask[n_real:] = False
    return mask.astype(np.uint8)


def targets_from_runs(runs: np.ndarray, length: int) -> np.ndarray:
    """uint8[length] target mask from a pack's stored targets: int32[2K], the [start, end) runs of target tokens."""
    mask = np.zeros(length, dtype=np.uint8)
    for start, end in np.asarray(runs, dtype=np.int64).reshape(-1, 2):
        mask[start:end] = 1
    return mask


def derive_doc_has_image(tokens: np.ndarray, cu_seqlens: np.ndarray, ids: TokenIds) -> np.ndarray:
    """doc_has_image rule: the document (cu_seqlens[d]:cu_seqlens[d+1]) holds at least one <vpatch>."""
    if len(cu_seqlens) < 2:
        return np.zeros(0, dtype=np.bool_)
    is_patch = (tokens[: cu_seqlens[-1]] == ids.vpatch).astype(np.int64)
    return np.add.reduceat(is_patch, cu_seqlens[:-1].astype(np.int64)) > 0


class _Pinned:
    """Zero-copy array holder that keeps the owning Shard alive: megatron-core's IndexedDataset closes its mmap in
    __del__, so a bare view into it must never outlive the dataset (it would crash on access)."""

    def __init__(self, view: np.ndarray, owner: object):
        self.__array_interface__ = view.__array_interface__
        self._view = view
        self._owner = owner


def _pinned(view: np.ndarray, owner: object) -> np.ndarray:
    return np.asarray(_Pinned(view, owner))


class Shard:
    """One shard prefix: one IndexedDataset per part + the sidecar."""

    def __init__(self, prefix: str | os.PathLike, seq_length: int | None = None):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        self.meta = read_shard_meta(self.prefix)
        self.version = int(self.meta["format_version"])
        self.seq_length = int(self.meta["seq_length"])
        if seq_length is not None and seq_length != self.seq_length:
            raise ValueError(f"{self.prefix}: shard seq_length {self.seq_length} != requested {seq_length}")
        self.ids = TokenIds.from_dict(self.meta["token_ids"], sidecar_path(self.prefix))
        parts = shard_parts(self.version)
        missing = [f for p in parts for f in (part_prefix(self.prefix, p) + e for e in MMIDIDX_SUFFIXES)]
        missing = [f for f in missing if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{self.prefix}: a v{self.version} shard has parts {parts}; missing {missing}")
        self.parts = {p: IndexedDataset(part_prefix(self.prefix, p)) for p in parts}
        self.tokens, self.patches, self.docs = self.parts[TOKENS], self.parts[PATCHES], self.parts[DOCS]
        self.targets = self.parts.get(TARGETS)  # None: a v1 shard, targets derived
        counts = {p: len(ds) for p, ds in self.parts.items()}
        if len(set(counts.values())) > 1 or counts[TOKENS] != self.meta["packs"]:
            raise ValueError(f"{self.prefix}: pack counts disagree ({counts}, sidecar {self.meta['packs']})")

    def __len__(self) -> int:
        return len(self.tokens)

    def pack_targets(self, i: int, tokens: np.ndarray, n_real: int) -> np.ndarray:
        """uint8[S] targets of pack i: stored (v2) or derived by the v1 rule."""
        if self.targets is None:
            return derive_text_mask(tokens, n_real, self.ids)
        return targets_from_runs(self.targets[i], len(tokens))

    def __getitem__(self, i: int) -> Pack:
        tokens = _pinned(self.tokens[i], self)
        cu = _pinned(self.docs[i], self)
        patches = _pinned(self.patches[i].reshape(-1, PATCH_DIM), self)
        if len(tokens) != self.seq_length:
            raise ValueError(f"{self.prefix}: pack {i} has {len(tokens)} tokens, expected {self.seq_length}")
        return Pack(
            tokens=tokens,
            targets=self.pack_targets(i, tokens, int(cu[-1])),
            patches=patches,
            cu_seqlens=cu,
            doc_has_image=derive_doc_has_image(tokens, cu, self.ids),
        )


class ShardSet:
    """All packs of a shard set, indexed 0..len-1 in manifest order (shard by shard, pack by pack)."""

    def __init__(self, path: str | os.PathLike):
        directory = Path(path)
        self.path = directory
        self.manifest = read_manifest(directory)
        seq_length = self.manifest.get("seq_length")
        self._init_shards(_manifest_prefixes(directory, self.manifest), seq_length)

    @classmethod
    def from_prefixes(cls, prefixes: Sequence[str | os.PathLike], seq_length: int | None = None) -> ShardSet:
        """A shard set from shard prefixes directly (no manifest)."""
        self = cls.__new__(cls)
        self.path = None
        self.manifest = None
        self._init_shards([str(p) for p in prefixes], seq_length)
        return self

    def _init_shards(self, prefixes: list[str], seq_length: int | None) -> None:
        self.shards = [Shard(p, seq_length) for p in prefixes]
        lengths = {s.seq_length for s in self.shards}
        if len(lengths) > 1:
            raise ValueError(f"shards disagree on seq_length: {sorted(lengths)}")
        self.seq_length = lengths.pop() if lengths else seq_length
        self._offsets = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, i: int) -> tuple[int, int]:
        """(shard index, pack index inside it) of global pack i."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"pack {i} out of range for a shard set of {len(self)} packs")
        s = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return s, i - int(self._offsets[s])

    def __getitem__(self, i: int) -> Pack:
        s, j = self.locate(int(i))
        return self.shards[s][j]
