"""Records of the conversational kinds (chat, llava, parquet): JSON decoding with skip reasons, and message lists
-> ``chat_template.Turn`` lists through the one owner of that, ``megatron_solo.format.messages``.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from megatron_solo.format.chat_template import Image, TemplateError, Turn
from megatron_solo.format.messages import to_turns
from megatron_solo.preprocess.sources.base import ImageRef, Skip


def json_object(data: bytes) -> dict:
    """A record's JSON object (``bad_json`` / ``invalid_utf8`` / ``bad_record`` otherwise)."""
    obj = json_value(data)
    if not isinstance(obj, dict):
        raise Skip("bad_record", f"a JSON {type(obj).__name__}, not an object")
    return obj


def json_value(data: bytes) -> object:
    text = decode_utf8(data)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise Skip("bad_json", str(e)) from None


def decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("invalid_utf8", str(e)) from None


def turns(
    messages: object, images: list | tuple = (), resolve: Callable[[object, str], ImageRef] | None = None
) -> list:
    """``format.messages.to_turns`` (THE reader of message lists: the HF processor, ``generate`` and the evaluation
    tasks read conversations through it too, so a record becomes the same turns everywhere), its errors as bad
    records. ``images`` (``ImageRef``s) fill ``<image>`` placeholders / ``{"type": "image"}`` parts, or go before the
    first user turn's text; an image referenced inline (``image_url``) becomes an ``ImageRef`` through ``resolve(ref,
    name)``."""
    try:
        out = to_turns(messages, images)
    except TemplateError as e:
        raise Skip("bad_record", str(e)) from None
    given = {id(im) for im in images}
    n = 0
    fixed = []
    for t in out:
        parts = []
        for p in t.content:
            if isinstance(p, Image):
                n += 1
                if id(p.ref) not in given:
                    if resolve is None:
                        raise Skip("bad_record", f"image {n} is referenced inline, which this kind does not read")
                    p = Image(resolve(p.ref, f"image {n}"))
            parts.append(p)
        fixed.append(Turn(t.role, tuple(parts)))
    return fixed
