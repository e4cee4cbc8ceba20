"""Turn one raw record into a document (text token arrays + resized uint8 images), or a skip reason.

Runs in the worker processes of ``megatron_solo.preprocess.build`` (Pillow decode + resize, SentencePiece), so
everything here is per-process state set up by :func:`init_worker`. A bad record never raises: it returns a reason from
``SKIP_REASONS``.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import json
import os
import signal
import sys
from dataclasses import dataclass, field

import numpy as np

from megatron_solo.format.image import DEFAULT_MAX_PIXELS, ImageLoadError, load_and_resize
from megatron_solo.format.layout import PATCH_SIZE, image_token_count, patch_grid
from megatron_solo.format.tokens import SoloTokenizer
from megatron_solo.preprocess import handoff
from megatron_solo.preprocess.sources import Record

# Reasons a record is skipped (worker side); the packer adds images_exceed_pack and long_text_dropped.
SKIP_REASONS = (
    "bad_json",
    "invalid_utf8",
    "bad_record",
    "empty_text",
    "bad_base64",
    "missing_file",
    "decompression_bomb",
    "corrupt_image",
    "unsupported_url",
    "unexpected_error",
)


class Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Result:
    """A record's document (``items``) or its skip ``reason``; ``n_tokens`` = the document's packed length."""

    record_id: str
    items: list[np.ndarray] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    n_tokens: int = 0
    n_images: int = 0


@dataclass
class WorkerConfig:
    tokenizer: str
    fast_decode: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    handoff_dir: str = ""  # non-empty: images go back as tmpfs files (megatron_solo.preprocess.handoff), not pickled
    parent_pid: int = 0


_tok: SoloTokenizer | None = None
_cfg: WorkerConfig | None = None


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this worker when the build process dies (even by SIGKILL), so no orphan outlives it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # a forkserver's child, or the parent died before prctl took effect
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)


def init_worker(cfg: WorkerConfig, parent_pid: int | None = None) -> None:
    global _tok, _cfg
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    _cfg = cfg
    _tok = SoloTokenizer(cfg.tokenizer)


def _decode_utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("invalid_utf8", str(e)) from None


def _json(data: bytes) -> object:
    text = _decode_utf8(data)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise Skip("bad_json", str(e)) from None


def _encode(text: str) -> np.ndarray:
    try:
        text.encode("utf-8")  # lone surrogates (e.g. a "\ud800" JSON escape) are not text
    except UnicodeEncodeError as e:
        raise Skip("invalid_utf8", str(e)) from None
    return np.asarray(_tok.encode(text), dtype=np.int32)


def _image(source: str | bytes, name: str) -> np.ndarray:
    try:
        return load_and_resize(source, name, fast_decode=_cfg.fast_decode, max_pixels=_cfg.max_pixels)
    except ImageLoadError as e:
        msg = str(e)
        if "file not found" in msg:
            raise Skip("missing_file", msg) from None
        if "decompression" in msg:
            raise Skip("decompression_bomb", msg) from None
        raise Skip("corrupt_image", msg) from None


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise Skip("bad_base64", f"not a base64 data URL: {header[:40]!r}")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise Skip("bad_base64", str(e)) from None


def _chat_image(url: object, base_dir: str, name: str) -> np.ndarray:
    if not isinstance(url, str) or not url:
        raise Skip("bad_record", f"image url is {type(url).__name__}, not a string")
    if url.startswith("data:"):
        return _image(_data_url_bytes(url), name)
    if url.startswith(("http://", "https://")):
        raise Skip("unsupported_url", f"remote image {url[:80]!r} (download images first)")
    path = os.path.join(base_dir, url[len("file://") :] if url.startswith("file://") else url)
    return _image(path, f"{name} ({path})")


def _chat(rec: Record) -> list[np.ndarray]:
    obj = _json(rec.data)
    messages = obj.get("messages", obj.get("conversations")) if isinstance(obj, dict) else obj
    if not isinstance(messages, list):
        raise Skip("bad_record", "no 'messages' list")
    items: list[np.ndarray] = []
    n_img = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise Skip("bad_record", "message without a 'content' string or list")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise Skip("bad_record", "text part without a 'text' string")
                if text.strip():
                    items.append(_encode(text))
            elif kind in ("image_url", "image"):
                url = part.get(kind)
                if isinstance(url, dict):
                    url = url.get("url")
                n_img += 1
                items.append(_chat_image(url, rec.base_dir, f"{rec.record_id} image {n_img}"))
            else:
                raise Skip("bad_record", f"unknown content part type {kind!r}")
    if not items:
        raise Skip("empty_text", "no text and no image")
    return items


def _text(rec: Record) -> list[np.ndarray]:
    obj = _json(rec.data)
    text = obj.get("text") if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise Skip("bad_record", "no 'text' string")
    if not text.strip():
        raise Skip("empty_text", "empty text")
    return [_encode(text)]


def _imagefolder(rec: Record) -> list[np.ndarray]:
    path, label = rec.data
    return [_image(path, rec.record_id), _encode(label)]


_WDS_IMAGE = ("jpg", "jpeg", "png", "webp")


def _wds(rec: Record) -> list[np.ndarray]:
    group: dict[str, bytes] = rec.data
    img_key = next((k for k in _WDS_IMAGE if k in group), None)
    if img_key is None:
        raise Skip("bad_record", f"no image member (have {sorted(group)})")
    if "txt" in group:
        caption = _decode_utf8(group["txt"])
    elif "json" in group:
        meta = _json(group["json"])
        caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
        if not isinstance(caption, str):
            raise Skip("bad_record", "json member without a 'caption'/'text' string")
    else:
        raise Skip("bad_record", f"no .txt/.json caption (have {sorted(group)})")
    if not caption.strip():
        raise Skip("empty_text", "empty caption")
    return [_image(group[img_key], f"{rec.record_id}.{img_key}"), _encode(caption)]


_PARSERS = {"chat": _chat, "text": _text, "imagefolder": _imagefolder, "wds": _wds}


def process(rec: Record) -> Result:
    try:
        items = _PARSERS[rec.kind](rec)
    except Skip as s:
        return Result(rec.record_id, reason=s.reason, detail=s.detail[:300])
    except Exception as e:  # a record shape nobody foresaw must not stop a web-scale job: count it, keep going
        return Result(rec.record_id, reason="unexpected_error", detail=f"{type(e).__name__}: {e}"[:300])
    n_tokens, n_images = 2, 0  # BOS + EOS
    for it in items:
        if it.dtype == np.uint8:
            n_images += 1
            n_tokens += image_token_count(it.shape[0] // PATCH_SIZE, it.shape[1] // PATCH_SIZE)
        else:
            n_tokens += len(it)
    return Result(rec.record_id, items=items, n_tokens=n_tokens, n_images=n_images)


def process_chunk(records: list[Record]) -> list[Result]:
    """Documents for the packer. In a worker process (the build gave a handoff directory) images leave as patch grids,
    patchified here while the pixels are in this core's cache, large ones through a tmpfs slot (``handoff``). In the
    build's own process (``--workers 0``) they stay pixels: the packer patchifies them in its one copy."""
    results = [process(r) for r in records]
    handoff_dir = _cfg.handoff_dir if _cfg is not None else ""
    if not handoff_dir:
        return results
    for res in results:
        res.items = [
            (
                handoff.export_slot(it, handoff_dir, _cfg.parent_pid)
                if it.nbytes >= handoff.MIN_BYTES
                else patch_grid(it)
            )
            if it.dtype == np.uint8
            else it
            for it in res.items
        ]
    return results
