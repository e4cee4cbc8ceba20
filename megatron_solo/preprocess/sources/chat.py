"""``chat``: JSON lines of chat messages, the released SOLO input format.

Record: ``{"messages": [{"role": "user", "content": [{"type": "text", "text": ...}, {"type": "image_url",
"image_url": {"url": ...}}]}]}`` (also ``conversations`` for ``messages``, a bare list of messages, string
``content``, ``{"type": "image", "image": url}``). ``url``: a base64 ``data:`` URL, a path (relative to
``image-root``, default the JSONL file's directory) or ``file://``; ``http(s)`` is ``unsupported_url``. A message
without ``role`` is a user turn.

Default ``template=plain loss-on=text``: the parts in order, each text part its own token run, nothing inserted (the
released pre-training pipeline; every text token is a target).
"""

from __future__ import annotations

import base64
import binascii

from megatron_solo.format.chat_template import Image, Part, Turn
from megatron_solo.preprocess.sources.base import Document, ImageRef, Record, Skip, register
from megatron_solo.preprocess.sources.conversation import json_value, role_of
from megatron_solo.preprocess.sources.jsonl import JsonLinesSource, image_dir, local_image


def data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise Skip("bad_base64", f"not a base64 data URL: {header[:40]!r}")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise Skip("bad_base64", str(e)) from None


@register
class ChatSource(JsonLinesSource):
    kind = "chat"
    summary = "chat-style JSON lines (the released SOLO format: messages with text / image_url parts)"
    options = {"image-root": "directory relative image paths resolve against (default: the JSONL file's)"}
    defaults = {"template": "plain", "loss-on": "text"}

    def parse(self, rec: Record) -> Document:
        obj = json_value(rec.data)
        messages = obj.get("messages", obj.get("conversations")) if isinstance(obj, dict) else obj
        if not isinstance(messages, list):
            raise Skip("bad_record", "no 'messages' list")
        base = image_dir(self, rec)
        turns, n_img = [], 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            if not isinstance(parts, list):
                llava = isinstance(m, dict) and ("from" in m or "conversations" in m)
                hint = " (LLaVA-style records: use --source llava:...)" if llava else ""
                raise Skip("bad_record", f"message without a 'content' string or list{hint}")
            out: list[Part] = []
            for part in parts:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise Skip("bad_record", "text part without a 'text' string")
                    out.append(text)
                elif kind in ("image_url", "image"):
                    url = part.get(kind)
                    if isinstance(url, dict):
                        url = url.get("url")
                    n_img += 1
                    out.append(Image(self._image(url, base, f"image {n_img}")))
                else:
                    raise Skip("bad_record", f"unknown content part type {kind!r}")
            turns.append(Turn(role_of(m.get("role", "user")), tuple(out)))
        return Document(self.render(turns))

    @staticmethod
    def _image(url: object, base: str, name: str) -> ImageRef:
        if not isinstance(url, str) or not url:
            raise Skip("bad_record", f"image url is {type(url).__name__}, not a string")
        if url.startswith("data:"):
            return ImageRef(data_url_bytes(url), name)
        path = local_image(url, base, name)
        return ImageRef(path, f"{name} ({path})")
