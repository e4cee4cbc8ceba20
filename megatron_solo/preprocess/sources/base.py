"""What every source kind is made of: the record a reader yields, the document a parser makes of it, the registry.

A source kind is one module with one :class:`Source` subclass registered under its kind name (``@register``). It
has two halves that run in different processes:

- the **reader** (parent process): ``files()`` (the inputs, checked when the build starts), ``extents(path)`` (the
  independently readable pieces of one input) and ``read(extent)`` (cheap raw records: a line, an array element's
  bytes, a table row, a tar member group). Nothing is parsed or decoded here, so a bad record is never found here;
- the **parser** (worker processes): ``parse(record) -> Document``: the record's turns rendered through the one chat
  template owner (``megatron_solo.format.chat_template``), images still as references (bytes or paths) that the
  worker decodes. A bad record raises :class:`Skip` with a reason from ``SKIP_REASONS``.

Extents are what a partitioned build (#14) hands out: deterministic, disjoint, together the whole input, each
readable on its own (``Extent.start``/``stop`` are byte offsets for JSONL and JSON arrays, row groups for parquet,
record batches for arrow; a record belongs to the extent holding its first byte / row).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from megatron_solo.format.chat_template import LOSS_POLICIES, TEMPLATES, Rendered, TemplateError, Turn, render

# Reasons a record is skipped (parser / worker side); the build adds images_exceed_pack and long_text_dropped.
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


class SourceError(ValueError):
    """A source spec or source file cannot be used at all (as opposed to a bad record, which is skipped)."""


class Skip(Exception):
    """A record (or, in interleaved documents, one image) that cannot be used: ``reason`` from SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Record:
    """One raw input record: ``source`` is the index of its ``--source``; ``data`` is whatever the kind's reader
    yields (bytes of a line or an array element, a table row dict, a tar member group, a (path, label) pair)."""

    record_id: str
    source: int
    data: object


@dataclass(frozen=True)
class Extent:
    """One independently readable piece of one input file (see the module docstring for the units)."""

    path: str
    start: int = 0
    stop: int | None = None  # None: to the end
    nbytes: int | None = field(default=None, compare=False)  # bytes on disk it covers (None: the whole file's)


@dataclass(frozen=True)
class ImageRef:
    """An image inside a parsed document, decoded by the worker: ``data`` is encoded bytes or a local path;
    ``name`` says where it came from in error messages."""

    data: bytes | str
    name: str


@dataclass
class Document:
    """A parsed record: the segments of ONE document (``Rendered``: text, ``ImageRef`` images, end-of-turn EOS).

    ``drop_bad_images``: interleaved web documents (OBELICS, MMC4) lose an image that cannot be read (counted as a
    dropped image) instead of the whole document. ``dropped``: images the parser already dropped, (reason, detail).
    """

    rendered: Rendered
    drop_bad_images: bool = False
    dropped: list[tuple[str, str]] = field(default_factory=list)


class Source:
    """One ``--source``: a kind's reader and parser with its resolved options (see the module docstring).

    Class attributes a kind sets: ``kind``, ``summary`` (one line for --help), ``options`` (name -> help, besides the
    common ``template`` / ``loss-on`` of conversational kinds), ``defaults`` (option -> default), ``conversational``
    (documents have turns: ``template`` and ``loss-on`` apply), ``dir_patterns`` (glob patterns a directory input
    expands to; empty: directories are an error unless ``accepts_dirs``), ``file_options`` (options naming a file
    whose checksum belongs to the build key).
    """

    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, str]] = {}
    defaults: ClassVar[dict[str, str]] = {}
    conversational: ClassVar[bool] = True
    dir_patterns: ClassVar[tuple[str, ...]] = ()
    accepts_dirs: ClassVar[bool] = False
    file_options: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, index: int, paths: list[str], options: dict[str, str], seed: int = 0, build_wide: set[str] = frozenset()
    ):
        self.index = index
        self.build_wide = set(build_wide)  # options that came from a build-wide flag, not from this spec
        self.paths = paths
        self.opts = dict(options)
        self.seed = seed
        self._files: list[str] | None = None
        self.setup()
        self.template = self.opts.get("template", self.defaults.get("template", "plain"))
        self.loss_on = self.opts.get("loss-on", self.defaults.get("loss-on", "text"))

    # --- options ------------------------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        common = ("template", "loss-on") if cls.conversational else ()
        return (*common, *cls.options)

    @classmethod
    def check_options(cls, opts: dict[str, str], where: str) -> None:
        if cls.conversational:
            if opts.get("template", "plain") not in TEMPLATES:
                raise SourceError(f"{where}: template={opts['template']} (choose {', '.join(TEMPLATES)})")
            if opts.get("loss-on", "text") not in LOSS_POLICIES:
                raise SourceError(f"{where}: loss-on={opts['loss-on']} (choose {', '.join(LOSS_POLICIES)})")

    def setup(self) -> None:
        """Check the options against the inputs (runs in the parent when the build starts); may set ``defaults``
        (a kind whose default policy depends on what its files hold)."""

    # --- reader (parent) ----------------------------------------------------------------------------------------
    def files(self) -> list[str]:
        """The input files (directories expanded by ``dir_patterns``), in the order they are read."""
        if self._files is None:
            from megatron_solo.preprocess.sources.files import expand_inputs

            self._files = expand_inputs(self.paths, self.dir_patterns, self.accepts_dirs, f"{self.kind} source")
        return self._files

    def extents(self, path: str, target_bytes: int | None = None) -> list[Extent]:
        """The pieces of ``path`` that can be read independently; one per file unless a kind can split (JSONL byte
        ranges, parquet row groups, arrow batches) and ``target_bytes`` asks for pieces of about that size."""
        return [Extent(path)]

    def input_bytes(self, path: str) -> int:
        """Bytes on disk of one input (a directory: of the files under it): what a partitioned build balances."""
        if os.path.isdir(path):
            return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
        return os.path.getsize(path)

    def read(self, extent: Extent) -> Iterator[Record]:
        raise NotImplementedError

    def records(self) -> Iterator[Record]:
        for path in self.files():
            for extent in self.extents(path):
                yield from self.read(extent)

    def identity(self) -> dict:
        """What the output depends on (build key, manifest): kind, options, files and their sizes."""
        opts = dict(self.opts)
        if self.conversational:
            opts |= {"template": self.template, "loss-on": self.loss_on}
        opts = dict(sorted(opts.items()))
        for k in self.file_options:
            if k in opts:
                opts[k] = {"path": opts[k], "sha256": _sha256(opts[k])}
        files = [{"path": p, "type": "dir"} if os.path.isdir(p) else {"path": p, "bytes": os.path.getsize(p)}
                 for p in self.files()]  # fmt: skip
        return {"spec": self.spec(), "kind": self.kind, "options": opts, "files": files}

    def spec(self) -> str:
        return f"{self.kind}:{','.join(self.paths)}"

    # --- parser (worker) ----------------------------------------------------------------------------------------
    def parse(self, rec: Record) -> Document:
        raise NotImplementedError

    def render(self, turns: list[Turn]) -> Rendered:
        """``turns`` through the source's chat template and loss policy; a conversation the template cannot hold is a
        bad record."""
        if not turns:
            raise Skip("empty_text", "no turns")
        try:
            return render(turns, self.template, self.loss_on)
        except TemplateError as e:
            raise Skip("bad_record", str(e)) from None


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


REGISTRY: dict[str, type[Source]] = {}


def register(cls: type[Source]) -> type[Source]:
    """Class decorator: make ``cls`` the reader/parser of ``--source cls.kind:...``."""
    if not cls.kind or cls.kind in REGISTRY:
        raise ValueError(f"source kind {cls.kind!r} is empty or registered twice")
    REGISTRY[cls.kind] = cls
    return cls
