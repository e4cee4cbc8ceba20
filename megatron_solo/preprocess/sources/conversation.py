"""Conversation records as the datasets spell them -> ``chat_template.Turn`` lists (shared by llava, chat, parquet).

Two message shapes occur in the wild: LLaVA / ShareGPT ``{"from": "human" | "gpt" | "system", "value": str}`` with
``<image>`` placeholders in the text, and Hugging Face / OpenAI ``{"role": ..., "content": str | [parts]}`` where a
part is ``{"type": "text", "text": ...}`` or ``{"type": "image"}`` (the next image of the row's image list).
"""

from __future__ import annotations

import json

from megatron_solo.format.chat_template import IMAGE_PLACEHOLDER, Image, Part, TemplateError, Turn, place_images
from megatron_solo.preprocess.sources.base import Skip

ROLE_ALIASES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


def role_of(raw: object) -> str:
    role = ROLE_ALIASES.get(raw.lower()) if isinstance(raw, str) else None
    if role is None:
        raise Skip("bad_record", f"unknown role {raw!r} (known: {', '.join(sorted(ROLE_ALIASES))})")
    return role


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


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise Skip("bad_record", f"{what} is {type(value).__name__}, not a string")
    return value


def turns_from_messages(messages: object, images: list, images_first: bool = True) -> list[Turn]:
    """Turns of a LLaVA (``from``/``value``) or HF (``role``/``content``) message list with ``images`` placed:
    at ``<image>`` placeholders / ``{"type": "image"}`` parts in order; with none, before the first user turn's text
    (LLaVA's rule) when ``images_first``. A placeholder count that does not match the images is a bad record."""
    if not isinstance(messages, list) or not messages:
        raise Skip("bad_record", "no conversation turns (a non-empty list is expected)")
    raw: list[tuple[str, list[Part]]] = []
    used = 0
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Skip("bad_record", f"turn {k} is {type(m).__name__}, not an object")
        if "from" in m or "value" in m:
            role, text = role_of(m.get("from")), _text(m.get("value"), f"turn {k} 'value'")
            n = text.count(IMAGE_PLACEHOLDER)
            try:
                parts = place_images(text, images[used : used + n])
            except TemplateError as e:
                raise Skip("bad_record", f"turn {k}: {e}; the record has {len(images)} image(s)") from None
            used += n
        else:
            role, (parts, n) = role_of(m.get("role")), _content_parts(m.get("content"), images, used, k)
            used += n
        raw.append((role, parts))
    if used == 0 and images and images_first:
        k = next((i for i, (role, _) in enumerate(raw) if role == "user"), 0)  # the first user turn, not a system one
        role, parts = raw[k]
        raw[k] = (role, [*(Image(im) for im in images), *parts])
    elif used != len(images):
        raise Skip("bad_record", f"{used} image placeholder(s) for {len(images)} image(s)")
    return [Turn(role, tuple(parts)) for role, parts in raw]


def _content_parts(content: object, images: list, used: int, k: int) -> tuple[list[Part], int]:
    if isinstance(content, str):
        n = content.count(IMAGE_PLACEHOLDER)
        if used + n > len(images):
            raise Skip("bad_record", f"turn {k}: more {IMAGE_PLACEHOLDER} placeholders than images ({len(images)})")
        return place_images(content, images[used : used + n]), n
    if not isinstance(content, list):
        raise Skip("bad_record", f"turn {k} has no 'value' / 'content' (string or list of parts)")
    parts: list[Part] = []
    n = 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(_text(part.get("text"), f"turn {k} text part"))
        elif kind == "image":
            if used + n >= len(images):
                raise Skip("bad_record", f"turn {k}: more image parts than images ({len(images)})")
            parts.append(Image(images[used + n]))
            n += 1
        else:
            raise Skip("bad_record", f"turn {k}: unknown content part type {kind!r}")
    return parts, n
