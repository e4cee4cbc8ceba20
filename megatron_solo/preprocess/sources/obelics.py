"""``obelics``: OBELICS-style interleaved web documents (parquet / arrow / JSON lines).

Record: aligned lists ``images`` (a URL, a local path, bytes or an ``Image`` struct; None) and ``texts`` (str or
None), one non-None per index, index order = document order (``images=`` / ``texts=`` rename the columns). Other
columns (``metadata``, ``general_metadata``) are not read. URL-only images are dropped and counted (download them
first, e.g. with img2dataset, and point the column at the files or bytes); see ``interleaved``.
"""

from __future__ import annotations

from megatron_solo.preprocess.sources.base import Document, Record, Skip, register
from megatron_solo.preprocess.sources.interleaved import InterleavedSource
from megatron_solo.preprocess.sources.jsonl import image_dir


@register
class ObelicsSource(InterleavedSource):
    kind = "obelics"
    summary = "OBELICS-style interleaved documents: aligned images / texts lists (parquet, arrow or JSONL)"
    options = {
        "images": "images column (default images)",
        "texts": "texts column (default texts)",
        "image-root": "directory relative image paths resolve against (default: the file's)",
    }

    def columns(self, schema) -> list[str]:
        return [self.opts.get("images", "images"), self.opts.get("texts", "texts")]

    def parse(self, rec: Record) -> Document:
        row = self.row(rec)
        images, texts = (row.get(c) for c in self.columns(None))
        if not isinstance(images, list) or not isinstance(texts, list):
            raise Skip("bad_record", "'images' and 'texts' must be lists")
        if len(images) != len(texts):
            raise Skip("bad_record", f"'images' ({len(images)}) and 'texts' ({len(texts)}) are not aligned")
        base, parts, dropped = image_dir(self, rec), [], []
        for k, (im, text) in enumerate(zip(images, texts)):
            if im is not None:
                ref = self.image(im, base, f"image at {k}", dropped)
                if ref is not None:
                    parts.append(ref)
            if text is not None:
                if not isinstance(text, str):
                    raise Skip("bad_record", f"texts[{k}] is {type(text).__name__}, not a string")
                parts.append(text)
        return self.document(parts, dropped)
