"""JSONL records -> conversations, for ``generate --input`` and the evaluation tasks: line-numbered errors, images
resolved next to the file.

A conversation record (``generate --input``) is one JSON object per line::

    {"id": "q1", "image": "cat.jpg" | ["a.jpg", "b.jpg"],          # or "images"; relative to the JSONL's folder
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"}, ...]}     # LLaVA / ShareGPT turns
    {"id": "q2", "messages": [{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                                           {"type": "text", "text": "What is it?"}]}]}  # HF

A conversation ends with a user turn (the model writes the next assistant turn). A trailing assistant turn is taken
off and kept as the record's ``reference`` (LLaVA-style files carry the answer there).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_solo.format.chat_template import TemplateError, Turn
from megatron_solo.format.messages import to_turns


class RecordError(ValueError):
    """A record of an input file is malformed; the message names the file and line."""


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(``file:line``, object) for each non-blank line; a line that is not a JSON object is a RecordError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def images_of(obj: dict, where: str) -> list:
    """The record's ``images`` (list) or ``image`` (one or a list); none -> []."""
    value = obj.get("images", obj.get("image"))
    if value is None:
        return []
    images = value if isinstance(value, list) else [value]
    if not all(isinstance(i, str) and i for i in images):
        raise RecordError(f"{where}: images must be path strings, got {value!r:.100}")
    return images


def record_id(obj: dict, where: str, default: str) -> str:
    for key in ("id", "question_id", "image_id"):
        if obj.get(key) is not None:
            return str(obj[key])
    return default


@dataclass
class Conversation:
    id: str
    turns: list[Turn]  # ends with a user turn
    reference: str | None = None  # the trailing assistant turn of the record, if it had one
    where: str = ""


def _text_of(turn: Turn) -> str:
    return "".join(p for p in turn.content if isinstance(p, str)).strip()


def conversation_of(obj: dict, where: str, image_root: str | os.PathLike | None, default_id: str) -> Conversation:
    messages = obj.get("messages", obj.get("conversations"))
    if not isinstance(messages, list):
        raise RecordError(f"{where}: no 'conversations' (LLaVA turns) or 'messages' (HF messages) list")
    try:
        turns = to_turns(messages, images_of(obj, where), image_root)
    except TemplateError as e:
        raise RecordError(f"{where}: {e}") from None
    reference = None
    if turns[-1].role == "assistant":
        reference, turns = _text_of(turns[-1]), turns[:-1]
    if not turns or turns[-1].role != "user":
        raise RecordError(f"{where}: the conversation must end with a user turn (the model answers it)")
    return Conversation(record_id(obj, where, default_id), turns, reference, where)


def read_conversations(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[Conversation]:
    """All conversation records of a JSONL file; images relative to ``image_root`` (default: the file's folder)."""
    root = Path(path).resolve().parent if image_root is None else image_root
    out = [conversation_of(obj, where, root, str(k)) for k, (where, obj) in enumerate(read_jsonl(path))]
    if not out:
        raise RecordError(f"{path}: no records")
    return out
