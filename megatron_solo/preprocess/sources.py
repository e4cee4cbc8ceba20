"""Input sources of ``build``: each yields raw records in a deterministic order.

A record is cheap to produce (a raw line, a path, the bytes of a tar member); all parsing and decoding happens in the
worker processes (``megatron_solo.preprocess.worker``), so a bad record is found and counted there, never here.

Source specs (``--source KIND:PATH[,PATH...]``):

- ``chat``: JSON lines of chat messages (the released SOLO input format); images as base64 ``data:`` URLs or paths
  (relative paths are resolved against the JSONL file's directory).
- ``text``: JSON lines ``{"text": ...}`` (SlimPajama style).
- ``imagefolder``: an ImageNet-layout tree ``ROOT/<class_dir>/<image>``; the target text is the class name, from
  ``--class-names FILE`` (``class_dir name`` per line, or a JSON object) or else the directory name.
- ``wds``: WebDataset tar shards; members grouped by key (name up to the first dot): one image + ``.txt`` or
  ``.json`` (``caption``/``text``) caption.

``.gz`` and ``.zst`` inputs are decompressed on the fly (``.tar.gz``/``.tgz``/``.tar.zst`` for wds).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

SOURCE_KINDS = ("chat", "text", "imagefolder", "wds")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm")


class SourceError(ValueError):
    """A source spec or source file cannot be used at all (as opposed to a bad record, which is skipped)."""


@dataclass(frozen=True)
class Record:
    """One raw input record. ``kind`` picks the worker's parser; ``data`` is bytes (a line / a member) or a tuple."""

    record_id: str
    kind: str
    data: object
    base_dir: str = ""  # chat: where relative image paths are resolved


@dataclass
class SourceSpec:
    kind: str
    paths: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, spec: str) -> SourceSpec:
        kind, sep, rest = spec.partition(":")
        if not sep or kind not in SOURCE_KINDS or not rest:
            raise SourceError(f"--source {spec!r}: expected KIND:PATH[,PATH...] with KIND one of {SOURCE_KINDS}")
        paths = [p for p in rest.split(",") if p]
        for p in paths:
            if not os.path.exists(p):
                raise SourceError(f"--source {spec!r}: {p} does not exist")
            if kind == "imagefolder" and not os.path.isdir(p):
                raise SourceError(f"--source {spec!r}: {p} is not a directory (imagefolder wants ROOT/<class>/<image>)")
        return cls(kind, paths)

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(self.paths)}"


def open_maybe_compressed(path: str | os.PathLike) -> IO[bytes]:
    """A binary reader of ``path``, transparently decompressing ``.gz`` / ``.tgz`` / ``.zst``."""
    p = str(path)
    if p.endswith((".gz", ".tgz")):
        return gzip.open(p, "rb")
    if p.endswith(".zst"):
        import zstandard

        raw = open(p, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(p, "rb")


def read_class_names(path: str | os.PathLike | None) -> dict[str, str]:
    """``class_dir -> name`` from a JSON object file or ``class_dir name...`` lines (ImageNet's synset files)."""
    if path is None:
        return {}
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, name = line.partition(" ") if " " in line else line.partition("\t")
        if not name.strip():
            raise SourceError(f"{path}:{n}: expected 'class_dir name', got {line!r}")
        out[key.strip()] = name.strip()
    return out


def _jsonl(kind: str, path: str) -> Iterator[Record]:
    base = str(Path(path).resolve().parent)
    with open_maybe_compressed(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield Record(f"{path}:{n}", kind, line, base)


def _imagefolder(root: str, class_names: dict[str, str], seed: int) -> Iterator[Record]:
    rootp = Path(root)
    items = []
    for cdir in sorted(d for d in rootp.iterdir() if d.is_dir()):
        label = class_names.get(cdir.name, cdir.name.replace("_", " "))
        for f in sorted(cdir.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                items.append((str(f.relative_to(rootp)), str(f), label))
    # Class-sorted order would put one class per pack; a seeded shuffle mixes them (deterministic for a seed).
    random.Random(seed).shuffle(items)
    for rel, full, label in items:
        yield Record(f"{root}:{rel}", "imagefolder", (full, label))


def _open_tar(path: str) -> tarfile.TarFile:
    if path.endswith(".zst"):
        return tarfile.open(fileobj=open_maybe_compressed(path), mode="r|")
    return tarfile.open(path, mode="r|*")


def _wds(path: str) -> Iterator[Record]:
    """Group consecutive tar members by key (WebDataset convention) into one record each."""
    key, group = None, {}
    with _open_tar(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            name = m.name
            base = name.rsplit("/", 1)[-1]
            dirpart = name[: len(name) - len(base)]
            k, dot, ext = base.partition(".")
            k = dirpart + k
            if key is not None and k != key:
                yield Record(f"{path}:{key}", "wds", group)
                group = {}
            key = k
            f = tar.extractfile(m)
            group[ext.lower() if dot else ""] = f.read() if f is not None else b""
    if key is not None:
        yield Record(f"{path}:{key}", "wds", group)


def iter_records(specs: list[SourceSpec], class_names: dict[str, str] | None = None, seed: int = 0) -> Iterator[Record]:
    """All records of all sources, in spec order, file order, record order (imagefolder: seeded shuffle)."""
    for spec in specs:
        for path in spec.paths:
            if spec.kind in ("chat", "text"):
                yield from _jsonl(spec.kind, path)
            elif spec.kind == "imagefolder":
                yield from _imagefolder(path, class_names or {}, seed)
            else:
                yield from _wds(path)
