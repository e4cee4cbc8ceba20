"""Shared by the interleaved-document kinds (obelics, mmc4): rows of images and texts -> one document, order kept.

A web document survives a bad image: an image that is only a URL (no downloads here), a missing file or one that
cannot be decoded is dropped and counted (``skipped.dropped_images`` in the manifest), the rest of the document is
kept. A document has no turns: every text token is a target (the pre-training rule).
"""

from __future__ import annotations

from megatron_solo.format.chat_template import Rendered, Segment
from megatron_solo.preprocess.sources.base import Document, ImageRef, Record, Skip
from megatron_solo.preprocess.sources.conversation import json_object
from megatron_solo.preprocess.sources.tables import TableSource, image_ref


class InterleavedSource(TableSource):
    conversational = False
    line_files = True
    dir_patterns = ("*.parquet", "*.arrow", "*.jsonl", "*.jsonl.gz", "*.jsonl.zst")

    def row(self, rec: Record) -> dict:
        """A table row as it is, or a JSON line parsed."""
        return rec.data if isinstance(rec.data, dict) else json_object(rec.data)

    def image(self, value: object, base: str, name: str, dropped: list) -> ImageRef | None:
        """The image, or None after recording why it is dropped (URL only, no data)."""
        try:
            ref = image_ref(value, base, name)
        except Skip as s:
            if s.reason != "unsupported_url":
                raise
            dropped.append((s.reason, f"{name}: {s.detail}"))
            return None
        if ref is None:
            dropped.append(("missing_file", f"{name}: no image data"))
        return ref

    @staticmethod
    def document(parts: list, dropped: list) -> Document:
        """``parts`` (str or ImageRef, in document order) as one document; blank texts add nothing."""
        segments = [
            Segment("image", False, image=p) if isinstance(p, ImageRef) else Segment("text", True, text=p)
            for p in parts
            if isinstance(p, ImageRef) or p.strip()
        ]
        if not segments:
            raise Skip("empty_text", "no text and no usable image" + (f" ({len(dropped)} dropped)" if dropped else ""))
        return Document(Rendered(segments), drop_bad_images=True, dropped=dropped)
