"""``text``: JSON lines ``{"text": ...}`` (SlimPajama style); ``field=KEY`` reads another key.

A text document has no turns: ``[BOS] text [EOS]``, every token a target (the pre-training rule).
"""

from __future__ import annotations

from megatron_solo.format.chat_template import Rendered, Segment
from megatron_solo.preprocess.sources.base import Document, Record, Skip, register
from megatron_solo.preprocess.sources.conversation import json_value
from megatron_solo.preprocess.sources.jsonl import JsonLinesSource


@register
class TextSource(JsonLinesSource):
    kind = "text"
    summary = "JSON lines {'text': ...} (pre-training text)"
    options = {"field": "the key holding the text (default text)"}
    conversational = False

    def parse(self, rec: Record) -> Document:
        obj = json_value(rec.data)
        key = self.opts.get("field", "text")
        text = obj.get(key) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise Skip("bad_record", f"no {key!r} string")
        if not text.strip():
            raise Skip("empty_text", "empty text")
        return Document(Rendered([Segment("text", True, text=text)]))
