"""``chat``: JSON lines of chat messages, the released SOLO input format.

Record: ``{"messages": [{"role": "user", "content": [{"type": "text", "text": ...}, {"type": "image_url",
"image_url": {"url": ...}}]}]}`` (also ``conversations`` for ``messages``, a bare list of messages, string
``content``, ``{"type": "image", "image": url}``). ``url``: a base64 ``data:`` URL, a path (relative to
``image-root``, default the JSONL file's directory) or ``file://``; ``http(s)`` is ``unsupported_url``. A message
without ``role`` is a user turn. The messages are read by ``format.messages`` (as ``generate`` reads them), so
``<image>`` in a text is a placeholder there too.

Default ``template=plain loss-on=text``: the parts in order, each text part its own token run, nothing inserted (the
released pre-training pipeline; every text token is a target).
"""

from __future__ import annotations

import base64
import binascii

from megatron_solo.preprocess.sources.base import Document, ImageRef, Record, Skip, register
from megatron_solo.preprocess.sources.conversation import json_value, turns
from megatron_solo.preprocess.sources.jsonl import JsonLinesSource, image_dir, local_image


def data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise Skip("bad_base64", f"not a base64 data URL: {header[:40]!r}")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise Skip("bad_base64", str(e)) from None


def _with_role(m: object) -> object:
    if isinstance(m, dict) and "role" not in m and "from" not in m and "content" in m:
        return {"role": "user", **m}
    return m


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
        if not messages:
            raise Skip("empty_text", "no messages")
        # The released format's messages always name a role; a message without one is a user turn (as before).
        messages = [_with_role(m) for m in messages]
        base = image_dir(self, rec)
        try:
            return Document(self.render(turns(messages, (), lambda url, name: self._image(url, base, name))))
        except Skip as s:
            if s.reason == "bad_record" and any(isinstance(m, dict) and ("conversations" in m or "image" in m)
                                                for m in [obj, *messages]):  # fmt: skip
                s.detail += " (a LLaVA-style record: use --source llava:...)"
            raise

    @staticmethod
    def _image(url: object, base: str, name: str) -> ImageRef:
        if not isinstance(url, str) or not url:
            raise Skip("bad_record", f"image url is {type(url).__name__}, not a string")
        if url.startswith("data:"):
            return ImageRef(data_url_bytes(url), name)
        path = local_image(url, base, name)
        return ImageRef(path, f"{name} ({path})")
