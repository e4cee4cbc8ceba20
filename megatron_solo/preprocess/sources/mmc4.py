"""``mmc4``: MMC4-style interleaved documents (JSON lines as distributed, or parquet / arrow).

Record: ``text_list`` (the document's sentences) and ``image_info`` (a list of ``{"image_name", "matched_text_index",
"raw_url", ...}``): each image belongs at the sentence it is matched to, placed before it (``placement=before``, the
common convention) or after it (``placement=after``); several images at one sentence keep their list order. An image
is ``image_base64`` if present, else ``image_name`` under ``image-root`` (default: the file's directory); one that is
only a ``raw_url`` (not found locally) is dropped and counted, as are missing / undecodable files (``interleaved``).
"""

from __future__ import annotations

import base64
import binascii
import os

from megatron_solo.preprocess.sources.base import Document, ImageRef, Record, Skip, SourceError, register
from megatron_solo.preprocess.sources.interleaved import InterleavedSource
from megatron_solo.preprocess.sources.jsonl import image_dir


@register
class Mmc4Source(InterleavedSource):
    kind = "mmc4"
    summary = "MMC4-style interleaved documents: text_list + image_info[matched_text_index] (JSONL, parquet)"
    options = {
        "placement": "before (default) or after: where an image goes relative to its matched sentence",
        "image-root": "directory image_name files are in (default: the file's)",
    }

    def setup(self) -> None:
        if self.opts.get("placement", "before") not in ("before", "after"):
            raise SourceError(f"{self.spec()}: placement={self.opts['placement']} (choose before or after)")

    def columns(self, schema) -> list[str]:
        return ["text_list", "image_info"]

    def parse(self, rec: Record) -> Document:
        row = self.row(rec)
        texts, infos = row.get("text_list"), row.get("image_info") or []
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise Skip("bad_record", "'text_list' must be a list of strings")
        if not isinstance(infos, list):
            raise Skip("bad_record", "'image_info' must be a list")
        base, dropped = image_dir(self, rec), []
        at: dict[int, list[ImageRef]] = {}
        for k, info in enumerate(infos):
            idx = info.get("matched_text_index") if isinstance(info, dict) else None
            if not isinstance(idx, int) or not 0 <= idx < max(1, len(texts)):
                raise Skip("bad_record", f"image_info[{k}] has no matched_text_index in range (0..{len(texts) - 1})")
            ref = self._image(info, base, f"image {k + 1}", dropped)
            if ref is not None:
                at.setdefault(idx, []).append(ref)
        after = self.opts.get("placement", "before") == "after"
        parts: list = []
        for i, text in enumerate(texts):
            parts += ([text] + at.get(i, [])) if after else (at.get(i, []) + [text])
        if not texts:
            parts = at.get(0, [])
        return self.document(parts, dropped)

    @staticmethod
    def _image(info: dict, base: str, name: str, dropped: list) -> ImageRef | None:
        b64 = info.get("image_base64")
        if isinstance(b64, str) and b64:
            try:
                return ImageRef(base64.b64decode(b64, validate=True), name)
            except (binascii.Error, ValueError) as e:
                dropped.append(("bad_base64", f"{name}: {e}"))
                return None
        fname = info.get("image_name")
        if isinstance(fname, str) and fname:
            path = os.path.join(base, fname)
            if os.path.exists(path) or not info.get("raw_url"):
                return ImageRef(path, f"{name} ({path})")
        if info.get("raw_url"):
            dropped.append(("unsupported_url", f"{name}: only a URL {str(info['raw_url'])[:80]!r} (not at {base})"))
        else:
            dropped.append(("missing_file", f"{name}: neither image_base64 nor image_name"))
        return None
