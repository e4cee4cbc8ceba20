"""The reader half shared by the line-oriented kinds (chat, text, llava, mmc4, obelics): JSON lines by byte range.

Record ids are ``FILE:LINE`` (1-based), the same whether a file is read whole or by ranges.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from megatron_solo.preprocess.sources.base import Extent, Record, Skip, Source
from megatron_solo.preprocess.sources.files import range_extents, read_lines


class JsonLinesSource(Source):
    """A source whose files are JSON lines (``.gz`` / ``.zst`` too); uncompressed files split by byte ranges."""

    dir_patterns = ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst")

    def extents(self, path: str, target_bytes: int | None = None) -> list[Extent]:
        return range_extents(path, target_bytes)

    def read(self, extent: Extent) -> Iterator[Record]:
        for n, line in read_lines(extent.path, extent.start, extent.stop):
            yield Record(f"{extent.path}:{n}", self.index, line)


def record_file(rec: Record) -> str:
    """The input file of a ``FILE:LINE`` (or ``FILE[row]``) record id."""
    rid = rec.record_id
    return rid[: rid.rindex("[")] if rid.endswith("]") else rid.rsplit(":", 1)[0]


def image_dir(source: Source, rec: Record) -> str:
    """Where relative image paths of ``rec`` resolve: the source's ``image-root`` or the input file's directory."""
    root = source.opts.get("image-root")
    return root if root else os.path.dirname(os.path.abspath(record_file(rec)))


def local_image(ref: str, base: str, name: str) -> str:
    """A path (absolute, ``file://`` or relative to ``base``) of a local image; URLs are ``unsupported_url``."""
    if ref.startswith(("http://", "https://")):
        raise Skip("unsupported_url", f"remote image {ref[:80]!r} (download images first)")
    if ref.startswith("file://"):
        ref = ref[len("file://") :]
    return os.path.join(base, ref)
