"""Turn one raw record into a document (text token arrays + resized uint8 images), or a skip reason.

Runs in the worker processes of ``megatron_solo.preprocess.build`` (Pillow decode + resize, SentencePiece), so
everything here is per-process state set up by :func:`init_worker`. The record's source kind parses it (``sources``:
turns rendered by the chat template, images as references); this module encodes the text segments and decodes the
images. A bad record never raises: it returns a reason from ``SKIP_REASONS``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass, field

import numpy as np

from megatron_solo.format.image import DEFAULT_MAX_PIXELS, ImageLoadError, load_and_resize
from megatron_solo.format.layout import PATCH_SIZE, image_token_count, patch_grid
from megatron_solo.format.tokens import SoloTokenizer
from megatron_solo.preprocess import handoff
from megatron_solo.preprocess.sources import SKIP_REASONS, Document, ImageRef, Record, Skip, Source

__all__ = ["SKIP_REASONS", "Result", "WorkerConfig", "init_worker", "process", "process_chunk"]


@dataclass
class Result:
    """A record's document (``items`` + ``targets``) or its skip ``reason``; ``n_tokens`` = the document's packed
    length. ``targets``: one 0/1 flag per item (``ShardBuilder.add_document``'s contract), None for the pre-training
    rule (every text token and the closing EOS). ``dropped``: images an interleaved document lost, (reason, detail)."""

    record_id: str
    source: int = -1
    items: list[np.ndarray] = field(default_factory=list)
    targets: list[int] | None = None
    eos_target: bool = True
    reason: str | None = None
    detail: str = ""
    n_tokens: int = 0
    n_images: int = 0
    n_image_tokens: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class WorkerConfig:
    tokenizer: str
    sources: list[Source] = field(default_factory=list)  # the build's sources (their parsers), by Record.source
    fast_decode: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    handoff_dir: str = ""  # non-empty: images go back as tmpfs files (megatron_solo.preprocess.handoff), not pickled
    parent_pid: int = 0


_tok: SoloTokenizer | None = None
_cfg: WorkerConfig | None = None


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when ``parent_pid`` (the process that started it) dies, even by SIGKILL, so no
    orphan outlives it (decode workers of a build; a partition's build under its launcher)."""
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
        die_with_parent(parent_pid)
    _cfg = cfg
    _tok = SoloTokenizer(cfg.tokenizer)


def _encode(text: str) -> np.ndarray:
    try:
        text.encode("utf-8")  # lone surrogates (e.g. a "\ud800" JSON escape) are not text
    except UnicodeEncodeError as e:
        raise Skip("invalid_utf8", str(e)) from None
    return np.asarray(_tok.encode(text), dtype=np.int32)


def _image(ref: ImageRef) -> np.ndarray:
    try:
        return load_and_resize(ref.data, ref.name, fast_decode=_cfg.fast_decode, max_pixels=_cfg.max_pixels)
    except ImageLoadError as e:
        msg = str(e)
        if "file not found" in msg:
            raise Skip("missing_file", msg) from None
        if "decompression" in msg:
            raise Skip("decompression_bomb", msg) from None
        raise Skip("corrupt_image", msg) from None


def _materialize(doc: Document) -> tuple[list[np.ndarray], list[int], list[tuple[str, str]]]:
    """The document's items (int32 token runs, uint8 images, ``[EOS]`` runs for end-of-turn tokens), one target
    flag per item, and the images dropped on the way (interleaved documents only; elsewhere a bad image skips)."""
    items, flags, dropped = [], [], list(doc.dropped)
    for seg in doc.rendered.segments:
        if seg.kind == "text":
            items.append(_encode(seg.text))
        elif seg.kind == "eos":
            items.append(np.array([_tok.eos_id], np.int32))
        else:
            try:
                items.append(_image(seg.image))
            except Skip as s:
                if not doc.drop_bad_images:
                    raise
                dropped.append((s.reason, s.detail))
                continue
            flags.append(0)
            continue
        flags.append(int(seg.target))
    return items, flags, dropped


def process(rec: Record) -> Result:
    try:
        doc = _cfg.sources[rec.source].parse(rec)
        items, flags, dropped = _materialize(doc)
        if not items:
            lost = f" ({len(dropped)} image(s) dropped, e.g. {dropped[0][0]}: {dropped[0][1]})" if dropped else ""
            raise Skip("empty_text", "no text and no image" + lost)
    except Skip as s:
        return Result(rec.record_id, rec.source, reason=s.reason, detail=s.detail[:300])
    except Exception as e:  # a record shape nobody foresaw must not stop a web-scale job: count it, keep going
        return Result(rec.record_id, rec.source, reason="unexpected_error", detail=f"{type(e).__name__}: {e}"[:300])
    n_text, n_images, n_image_tokens = 2, 0, 0  # BOS + EOS
    for it in items:
        if it.dtype == np.uint8:
            n_images += 1
            n_image_tokens += image_token_count(it.shape[0] // PATCH_SIZE, it.shape[1] // PATCH_SIZE)
        else:
            n_text += len(it)
    eos_target = doc.rendered.eos_target
    pretraining = eos_target and all(f or it.dtype == np.uint8 for f, it in zip(flags, items))
    return Result(
        rec.record_id,
        rec.source,
        items=items,
        targets=None if pretraining else flags,
        eos_target=eos_target,
        n_tokens=n_text + n_image_tokens,
        n_images=n_images,
        n_image_tokens=n_image_tokens,
        dropped=[(r, d[:300]) for r, d in dropped],
    )


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
