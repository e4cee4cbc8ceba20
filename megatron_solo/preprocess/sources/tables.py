"""The reader half shared by the table kinds (parquet, arrow, obelics, mmc4): Hugging Face datasets files, read with
pyarrow in record batches of a few rows (never a whole file or row group converted at once).

Containers, told by the file name: ``.parquet`` (by row groups), ``.arrow`` (Arrow IPC, stream or file format, as
``datasets`` writes them; memory-mapped, by record batches), a ``datasets.save_to_disk`` directory (its
``state.json`` lists the ``.arrow`` files) or a directory of parquet / arrow files; and for the interleaved kinds
also JSON lines. Record ids are ``FILE[row]`` (0-based row in the file) or ``FILE:LINE`` for JSON lines.

An ``Image`` feature is a struct ``{"bytes": binary | None, "path": str | None}``; :func:`image_ref` turns it (or
plain bytes, or a path) into the worker's ``ImageRef``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from megatron_solo.preprocess.sources.base import Extent, ImageRef, Record, Skip, Source, SourceError
from megatron_solo.preprocess.sources.files import cut_units, range_extents, read_lines
from megatron_solo.preprocess.sources.jsonl import local_image

BATCH_ROWS = 32  # rows converted to Python at a time (a row may hold several MB of image bytes)
LINE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")


def _pa():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise SourceError("parquet / arrow sources need pyarrow (pip install pyarrow)") from e
    return pa, pq


def dataset_dir_files(path: str) -> list[str] | None:
    """The data files of a ``datasets.save_to_disk`` directory (None: not one). A DatasetDict is an error naming
    its splits: reading all of them into one training set is never what was meant."""
    p = Path(path)
    if (p / "dataset_dict.json").exists():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        raise SourceError(f"{path} is a DatasetDict (splits {', '.join(splits)}): give one split, e.g. {p / splits[0]}")
    state = p / "state.json"
    if not state.exists():
        return None
    files = [str(p / f["filename"]) for f in json.loads(state.read_text()).get("_data_files", [])]
    if not files:
        raise SourceError(f"{state}: lists no data files")
    return files


def expand_table_dirs(paths: list[str], patterns: tuple[str, ...]) -> list[str]:
    out = []
    for path in paths:
        if not os.path.isdir(path):
            out.append(path)
            continue
        files = dataset_dir_files(path)
        if files is None:
            files = sorted({str(f) for pat in patterns for f in Path(path).rglob(pat) if f.is_file()})
            if not files:
                raise SourceError(f"directory {path} holds no {' / '.join(patterns)} file (nor a save_to_disk dataset)")
        out += files
    return out


def schema_of(path: str):
    """The arrow schema of a table file (a JSON-lines file has none: None)."""
    pa, pq = _pa()
    if path.endswith(".parquet"):
        return pq.ParquetFile(path).schema_arrow
    if path.endswith(".arrow"):
        with _open_ipc(path) as reader:
            return reader.schema
    return None


class _open_ipc:
    """An Arrow IPC reader of ``path``, memory-mapped: file format (random access) or stream format (``datasets``)."""

    def __init__(self, path: str):
        pa, _ = _pa()
        self.source = pa.memory_map(path, "r")
        try:
            self.reader = pa.ipc.open_file(self.source)
            self.batches = (self.reader.get_batch(i) for i in range(self.reader.num_record_batches))
        except pa.ArrowInvalid:
            self.source.seek(0)
            self.reader = pa.ipc.open_stream(self.source)
            self.batches = iter(self.reader)
        self.schema = self.reader.schema

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.source.close()


def _rows(batches, columns: list[str], first_row: int) -> Iterator[tuple[int, dict]]:
    row = first_row
    for batch in batches:
        batch = batch.select(columns) if columns else batch
        for off in range(0, batch.num_rows, BATCH_ROWS):
            for values in batch.slice(off, BATCH_ROWS).to_pylist():
                yield row, values
                row += 1


class TableSource(Source):
    """Reads parquet / arrow (and, with ``line_files``, JSON lines) inputs; ``columns()`` names what to read."""

    dir_patterns = ("*.parquet", "*.arrow")
    accepts_dirs = True
    line_files = False  # JSON lines accepted too (obelics, mmc4)

    def files(self) -> list[str]:
        if self._files is None:
            files = expand_table_dirs(super().files(), self.dir_patterns)
            for f in files:
                ok = f.endswith((".parquet", ".arrow")) or (self.line_files and f.endswith(LINE_SUFFIXES))
                if not ok:
                    want = ".parquet / .arrow" + (" / .jsonl" if self.line_files else "")
                    raise SourceError(f"{self.kind} source: {f} is not a {want} file")
            self._files = files
        return self._files

    def columns(self, schema) -> list[str]:
        """The columns a record needs (all if empty)."""
        return []

    def extents(self, path: str, target_bytes: int | None = None) -> list[Extent]:
        """Parquet: runs of row groups; arrow: runs of record batches (mapped, so counting them reads no data);
        JSON lines: byte ranges. Each about ``target_bytes`` (uncompressed), the last one open-ended."""
        if path.endswith((".parquet", ".arrow")):
            if not target_bytes:
                return [Extent(path)]
            return cut_units(_unit_sizes(path), path, target_bytes, os.path.getsize(path))
        return range_extents(path, target_bytes)

    def read(self, extent: Extent) -> Iterator[Record]:
        path = extent.path
        if path.endswith(".parquet"):
            rows = self._parquet_rows(extent)
        elif path.endswith(".arrow"):
            rows = self._arrow_rows(extent)
        else:
            for n, line in read_lines(path, extent.start, extent.stop):
                yield Record(f"{path}:{n}", self.index, line)
            return
        for row, values in rows:
            yield Record(f"{path}[{row}]", self.index, values)

    def _parquet_rows(self, extent: Extent) -> Iterator[tuple[int, dict]]:
        """Row groups [start, stop); the first row's index counts the rows of the groups before."""
        _, pq = _pa()
        f = pq.ParquetFile(extent.path)
        md = f.metadata
        groups = list(range(extent.start, md.num_row_groups if extent.stop is None else extent.stop))
        first = sum(md.row_group(g).num_rows for g in range(extent.start))
        cols = self._checked_columns(f.schema_arrow, extent.path)
        if groups:
            yield from _rows(f.iter_batches(batch_size=BATCH_ROWS, row_groups=groups, columns=cols or None), [], first)

    def _arrow_rows(self, extent: Extent) -> Iterator[tuple[int, dict]]:
        """Record batches [start, stop) of a memory-mapped IPC file."""
        with _open_ipc(extent.path) as ipc:
            cols = self._checked_columns(ipc.schema, extent.path)
            first = 0
            for k, batch in enumerate(ipc.batches):
                if extent.stop is not None and k >= extent.stop:
                    break
                if k >= extent.start:
                    yield from _rows([batch], cols, first)
                first += batch.num_rows

    def _checked_columns(self, schema, path: str) -> list[str]:
        cols = self.columns(schema)
        missing = [c for c in cols if c not in schema.names]
        if missing:
            raise SourceError(
                f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(schema.names)}); "
                f"set the {self.kind} source's column mapping (docs/preprocess.md)"
            )
        return cols


def _unit_sizes(path: str) -> list[int]:
    """Bytes of each row group (parquet) / record batch (arrow) of a table file."""
    if path.endswith(".parquet"):
        md = _pa()[1].ParquetFile(path).metadata
        return [md.row_group(g).total_byte_size for g in range(md.num_row_groups)]
    with _open_ipc(path) as ipc:
        return [b.nbytes for b in ipc.batches]


def image_ref(value: object, base: str, name: str) -> ImageRef | None:
    """An ``Image`` feature struct, encoded bytes or a path -> ``ImageRef``; None for a missing image (None, or a
    struct with neither bytes nor path). URLs are ``unsupported_url``."""
    if value is None:
        return None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return ImageRef(bytes(data), name)
        value = path
        if not value:
            return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ImageRef(bytes(value), name)
    if isinstance(value, str):
        full = local_image(value, base, name)
        return ImageRef(full, f"{name} ({full})")
    raise Skip("bad_record", f"{name}: an image is {type(value).__name__} (want an Image struct, bytes or a path)")
