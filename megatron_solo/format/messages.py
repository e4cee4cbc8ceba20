"""Conversations in the shapes users bring -> chat-template ``Turn`` lists (megatron_solo.format.chat_template).

One reader of message lists for the HF processor's ``apply_chat_template``, ``generate``'s JSONL / chat input and
the evaluation tasks, so the same record becomes the same turns everywhere. Accepted shapes (one conversation):

- HF / OpenAI messages: ``[{"role": "system" | "user" | "assistant", "content": str | [part, ...]}, ...]`` with
  parts ``{"type": "text", "text": str}``, ``{"type": "image"}`` (takes the next of ``images``),
  ``{"type": "image", "image" | "url" | "path": ref}``, ``{"type": "image_url", "image_url": {"url": ref}}``.
- LLaVA / ShareGPT turns: ``[{"from": "human" | "gpt" | "system", "value": str}, ...]``.
- ``Turn`` objects (returned as they are).

In any text, ``<image>`` (LLaVA's placeholder) takes the next of ``images`` at that place. When a conversation has
no image part and no placeholder at all but ``images`` are given, they go before the first user text (LLaVA's
convention). Every given image must be placed exactly once. ``image_root`` resolves relative image paths.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from megatron_solo.format.chat_template import IMAGE_PLACEHOLDER, Image, Part, TemplateError, Turn

ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}


def resolve_image(ref: object, image_root: str | os.PathLike | None) -> object:
    """A relative path under ``image_root``; URLs, data URLs, absolute paths and non-strings unchanged."""
    if image_root is None or not isinstance(ref, str) or os.path.isabs(ref) or "://" in ref or ref.startswith("data:"):
        return ref
    return os.path.join(os.fspath(image_root), ref.removeprefix("file://"))


class _Images:
    """The caller's images, handed out in order; counts what was used."""

    def __init__(self, images: Sequence[object]):
        self.images, self.used = list(images), 0

    def next(self) -> Image:
        if self.used >= len(self.images):
            raise TemplateError(f"the conversation places more images than the {len(self.images)} given")
        self.used += 1
        return Image(self.images[self.used - 1])


def _text_parts(text: str, images: _Images) -> list[Part]:
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[Part] = []
    for k, piece in enumerate(pieces):
        if piece:
            parts.append(piece)
        if k < len(pieces) - 1:
            parts.append(images.next())
    return parts


def _image_ref(part: dict) -> object:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        return url.get("url") if isinstance(url, dict) else url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    return None


def _content_parts(content: object, images: _Images, where: str) -> list[Part]:
    if isinstance(content, str):
        return _text_parts(content, images)
    if not isinstance(content, list):
        raise TemplateError(f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}")
    parts: list[Part] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise TemplateError(f"{where}: a text part without a 'text' string")
            parts += _text_parts(part["text"], images)
        elif kind in ("image", "image_url"):
            ref = _image_ref(part)
            parts.append(images.next() if ref is None else Image(ref))
        else:
            raise TemplateError(f"{where}: unknown content part {part!r:.80} (types: text, image, image_url)")
    return parts


def _turn(message: object, images: _Images, k: int) -> Turn:
    where = f"message {k}"
    if isinstance(message, Turn):
        return message
    if not isinstance(message, dict):
        raise TemplateError(f"{where}: expected a dict with role/content or from/value, got {type(message).__name__}")
    if "role" in message:
        role, content = message["role"], message.get("content", "")
    elif "from" in message:
        role, content = message["from"], message.get("value", "")
    else:
        raise TemplateError(f"{where}: no 'role' (HF messages) or 'from' (LLaVA turns) key in {sorted(message)}")
    if role not in ROLE_NAMES:
        raise TemplateError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLE_NAMES)}")
    return Turn(ROLE_NAMES[role], tuple(_content_parts(content, images, where)))


def _prepend_images(turns: list[Turn], images: Sequence[object]) -> list[Turn]:
    first_user = next((k for k, t in enumerate(turns) if t.role == "user"), None)
    if first_user is None:
        raise TemplateError(f"{len(images)} image(s) given but the conversation has no user turn to hold them")
    t = turns[first_user]
    turns[first_user] = Turn(t.role, (*(Image(i) for i in images), *t.content))
    return turns


def to_turns(
    messages: Sequence[object], images: Sequence[object] = (), image_root: str | os.PathLike | None = None
) -> list[Turn]:
    """One conversation (module docstring) -> ``Turn`` list with every image placed; relative paths under
    ``image_root``."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TemplateError(f"a conversation is a list of messages, got {type(messages).__name__}")
    if not messages:
        raise TemplateError("empty conversation")
    pool = _Images(images)
    turns = [_turn(m, pool, k) for k, m in enumerate(messages)]
    n_placed = sum(isinstance(p, Image) for t in turns for p in t.content)
    if n_placed == 0 and pool.images:
        turns = _prepend_images(turns, pool.images)
    elif pool.used != len(pool.images):
        raise TemplateError(f"{len(pool.images)} image(s) given but the conversation places {pool.used} of them")
    if image_root is not None:
        turns = [
            Turn(
                t.role, tuple(Image(resolve_image(p.ref, image_root)) if isinstance(p, Image) else p for p in t.content)
            )
            for t in turns
        ]
    return turns
