"""Partitioned builds (``build --partition K/N``): which records partition K of N reads, and where it writes.

The split is a pure function of the inputs and N, so every partition (a SLURM array task, a Ray task, a local
process) computes it alone, with no coordination and nothing shared but the input files:

1. every source's inputs, in build order (source, file), are cut into small **units** by the source kind's own
   ``extents(path, target_bytes)`` (byte ranges of JSON lines, element offsets of JSON arrays, row groups of
   parquet, record batches of arrow, positions in imagefolder's seeded file list; compressed files and tars stay
   whole), about ``T / (N * UNITS_PER_PARTITION)`` bytes each (``T``: all input bytes on disk);
2. partition K takes the consecutive units whose byte midpoint lies in ``[K T / N, (K + 1) T / N)``;
3. its consecutive units of one file become one extent (read in one pass).

A record belongs to the unit holding its first byte / row and units cover their files without overlap, so every
record is in exactly one partition, with the record id a whole-file read gives it; the partitions in order are the
single build's record stream in order. Balance: within about one unit (1/8 of a partition's share) of ``T / N``,
except where one file that cannot be cut is larger than that.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_solo.preprocess.sources import Extent, Record, Source, SourceError

UNITS_PER_PARTITION = 8
_SPEC = re.compile(r"^(\d+)/(\d+)$")
_DIR = re.compile(r"^part_(\d+)_of_(\d+)$")


@dataclass(frozen=True)
class Partition:
    """Partition ``index`` (0-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise SourceError(f"--partition {self.index}/{self.count}: want K/N with 0 <= K < N")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @property
    def name(self) -> str:
        """The partition's directory name, ``part_K_of_N`` with K zero-padded to N-1's width (so they sort)."""
        return f"part_{self.index:0{len(str(self.count - 1))}d}_of_{self.count}"

    @classmethod
    def parse(cls, text: str) -> Partition:
        m = _SPEC.match(text.strip())
        if not m:
            raise SourceError(f"--partition {text!r}: want K/N, e.g. 0/8 (partition K of N, 0-based)")
        return cls(int(m[1]), int(m[2]))

    @classmethod
    def from_dir_name(cls, name: str) -> Partition | None:
        m = _DIR.match(name)
        return cls(int(m[1]), int(m[2])) if m and int(m[1]) < int(m[2]) else None


def partition_dir(out: str | os.PathLike, part: Partition) -> Path:
    """Where partition ``part`` of the build ``--out DIR`` writes its own shard set: ``DIR/part_K_of_N``."""
    return Path(out) / part.name


@dataclass(frozen=True)
class Piece:
    """One extent of one source's input that a partition reads."""

    source: int
    extent: Extent
    nbytes: int

    def to_json(self) -> dict:
        e = self.extent
        return {"source": self.source, "path": e.path, "start": e.start, "stop": e.stop, "bytes": self.nbytes}


@dataclass
class PartitionPlan:
    part: Partition
    pieces: list[Piece]
    total_bytes: int  # all partitions' input bytes

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    def describe(self) -> dict:
        """The manifest's ``partition`` entry (what this partition read)."""
        return {
            "index": self.part.index,
            "count": self.part.count,
            "bytes": self.nbytes,
            "total_bytes": self.total_bytes,
            "extents": [p.to_json() for p in self.pieces],
        }


def _units(sources: list[Source], target_bytes: int | None) -> list[Piece]:
    """Every source's inputs as units in build order, each with its bytes on disk."""
    out = []
    for s in sources:
        for path in s.files():
            whole = s.input_bytes(path)
            for e in s.extents(path, target_bytes) if target_bytes else [Extent(path)]:
                out.append(Piece(s.index, e, whole if e.nbytes is None else e.nbytes))
    return out


def _coalesce(pieces: list[Piece]) -> list[Piece]:
    """Consecutive pieces of one file -> one extent (they are adjacent: each unit starts where the one before
    stopped)."""
    out: list[Piece] = []
    for p in pieces:
        last = out[-1] if out else None
        if last and (last.source, last.extent.path, last.extent.stop) == (p.source, p.extent.path, p.extent.start):
            merged = Extent(p.extent.path, last.extent.start, p.extent.stop)
            out[-1] = Piece(p.source, merged, last.nbytes + p.nbytes)
        else:
            out.append(p)
    return out


def plan_partition(sources: list[Source], part: Partition) -> PartitionPlan:
    """The pieces partition ``part`` reads (see the module docstring)."""
    total = sum(s.input_bytes(path) for s in sources for path in s.files())
    if part.count == 1:
        return PartitionPlan(part, _units(sources, None), total)
    target = max(1, -(-total // (part.count * UNITS_PER_PARTITION)))
    mine, acc = [], 0
    for u in _units(sources, target):
        owner = min(part.count - 1, (2 * acc + u.nbytes) * part.count // (2 * total)) if total else 0
        acc += u.nbytes
        if owner == part.index:
            mine.append(u)
    return PartitionPlan(part, _coalesce(mine), total)


def iter_plan_records(sources: list[Source], plan: PartitionPlan) -> Iterator[Record]:
    """The partition's records, in build order."""
    for p in plan.pieces:
        yield from sources[p.source].read(p.extent)
