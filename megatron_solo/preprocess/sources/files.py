"""Reading input files for the source kinds: compressed streams, brace / glob / directory expansion, JSON lines and
JSON arrays by byte range.

Everything here yields raw bytes (a line, an array element) with the position it came from; parsing is the
worker's. The JSON array reader streams: LLaVA's 558K / 665K files are hundreds of MB, and ``json.load`` of one
would hold the whole parsed array in the parent.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from megatron_solo.preprocess.sources.base import Extent, SourceError

COMPRESSED = (".gz", ".tgz", ".zst")
READ_CHUNK = 1 << 22


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


def is_compressed(path: str) -> bool:
    return path.endswith(COMPRESSED)


# --- expanding one --source's inputs ----------------------------------------------------------------------------


def split_top(s: str, sep: str = ",") -> list[str]:
    """``s`` split at ``sep`` outside ``{...}`` (so ``a{1,2}b,c`` is two items)."""
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")


def expand_braces(s: str) -> list[str]:
    """Bash / WebDataset brace expansion: ``{00000..00099}`` (zero-padded ranges, optional ``..step``), ``{a,b}``,
    nested and several groups. A brace group that is neither stays literal."""
    start = s.find("{")
    while start != -1:
        depth = 0
        for end in range(start, len(s)):
            depth += {"{": 1, "}": -1}.get(s[end], 0)
            if depth == 0:
                break
        else:
            return [s]  # unbalanced: literal
        body = s[start + 1 : end]
        m = _RANGE.match(body)
        if m:
            a, b, step = int(m[1]), int(m[2]), int(m[3] or 1)
            width = max(len(m[1]), len(m[2])) if (m[1].lstrip("-").startswith("0") or m[2].startswith("0")) else 0
            seq = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
            alts = [str(v).zfill(width) for v in seq]
        else:
            alts = split_top(body)
            if len(alts) < 2:
                start = s.find("{", start + 1)
                continue
        head, tail = s[:start], s[end + 1 :]
        return [x for alt in alts for x in expand_braces(head + alt + tail)]
    return [s]


def expand_inputs(items: list[str], dir_patterns: tuple[str, ...], accepts_dirs: bool, what: str) -> list[str]:
    """Input paths: braces expanded, globs matched (sorted), directories expanded by ``dir_patterns`` (recursive,
    sorted) or kept when the kind reads directories itself; every path must exist."""
    out: list[str] = []
    for item in items:
        for p in [item] if os.path.exists(item) else expand_braces(item):
            if any(c in p for c in "*?[") and not os.path.exists(p):
                matches = sorted(glob.glob(p, recursive=True))
                if not matches:
                    raise SourceError(f"{what}: {p} matches no file")
                out += matches
            elif not os.path.exists(p):
                raise SourceError(f"{what}: {p} does not exist")
            elif os.path.isdir(p) and not accepts_dirs:
                if not dir_patterns:
                    raise SourceError(f"{what}: {p} is a directory; give its files")
                found = sorted({str(f) for pat in dir_patterns for f in Path(p).rglob(pat) if f.is_file()})
                if not found:
                    raise SourceError(f"{what}: directory {p} holds no {' / '.join(dir_patterns)} file")
                out += found
            else:
                out.append(p)
    return out


# --- line numbers and byte ranges -------------------------------------------------------------------------------


def count_newlines(path: str, end: int) -> int:
    """Newlines in the first ``end`` bytes of an uncompressed file (the line number of a range's first line - 1)."""
    n, left = 0, end
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(min(READ_CHUNK, left))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def byte_ranges(path: str, target_bytes: int | None) -> list[tuple[int, int | None]]:
    """[start, stop) ranges of about ``target_bytes`` covering an uncompressed file (one range: the whole file)."""
    size = os.path.getsize(path)
    if not target_bytes or is_compressed(path) or size <= target_bytes:
        return [(0, None)]
    cuts = list(range(0, size, target_bytes))
    return [(a, b if b < size else None) for a, b in zip(cuts, cuts[1:] + [size])]


def range_extents(path: str, target_bytes: int | None) -> list[Extent]:
    """:func:`byte_ranges` as extents, each with the bytes it covers."""
    size = os.path.getsize(path)
    return [Extent(path, a, b, nbytes=(size if b is None else b) - a) for a, b in byte_ranges(path, target_bytes)]


def cut_units(sizes: list[int], path: str, target_bytes: int, file_bytes: int | None = None) -> list[Extent]:
    """Consecutive units (row groups, record batches, list positions) of ``sizes`` bytes grouped into extents of
    about ``target_bytes``; the last one reads to the end. ``nbytes`` is each extent's share of ``file_bytes`` (the
    file's size on disk; default the sum of ``sizes``), so extents of different kinds weigh alike."""
    total = sum(sizes)
    scale = (file_bytes / total) if file_bytes is not None and total else 1.0
    out, start, acc, done = [], 0, 0, 0  # done: bytes of the units before ``start``
    for k, size in enumerate(sizes):
        acc += size
        if acc >= target_bytes and k + 1 < len(sizes):
            out.append(Extent(path, start, k + 1, nbytes=round((done + acc) * scale) - round(done * scale)))
            start, done, acc = k + 1, done + acc, 0
    return out + [Extent(path, start, None, nbytes=round((done + acc) * scale) - round(done * scale))]


def read_lines(path: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of the non-blank lines whose first byte lies in [start, stop). A range may start
    anywhere: a line that began before ``start`` belongs to the range before (so ranges cut anywhere partition a
    file's lines exactly)."""
    if start and is_compressed(path):
        raise SourceError(f"{path}: a compressed file cannot be read from byte {start}")
    with open_maybe_compressed(path) as f:
        pos, line_no = 0, 0
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # mid-line: that line is the previous range's
                pos = start + len(f.readline())
            else:
                pos = start
            line_no = count_newlines(path, pos)
        for line in f:
            if stop is not None and pos >= stop:
                break
            pos += len(line)
            line_no += 1
            if line.strip():
                yield line_no, line


# --- streaming JSON arrays --------------------------------------------------------------------------------------

# A complete-or-truncated JSON string (closing quote optional: checked by the caller), or a bracket.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
_WS = b" \t\r\n"


def first_byte(path: str) -> bytes:
    """The first non-whitespace byte of a (possibly compressed) file, ``b""`` if none: ``[`` means a JSON array."""
    with open_maybe_compressed(path) as f:
        while chunk := f.read(4096):
            s = chunk.lstrip(_WS + b"\xef\xbb\xbf")
            if s:
                return s[:1]
    return b""


def read_json_array(path: str, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(byte offset, line number, raw bytes) of each element of a top-level JSON array, streamed. Elements are
    delimited by bracket depth outside strings, so a malformed element still comes out whole (its parser skips it)
    and the next one is found. ``start`` > 0 must be an element's offset (one this reader yielded); elements whose
    offset is >= ``stop`` are not read. A truncated file yields its partial last element (a bad record)."""
    if start and is_compressed(path):
        raise SourceError(f"{path}: a compressed file cannot be read from byte {start}")
    with open_maybe_compressed(path) as f:
        if start:
            f.seek(start)
        scan = _ArrayScanner(path, start)
        while True:
            for item in scan.elements():
                if stop is not None and item[0] >= stop:
                    return
                yield item
            if scan.closed:
                return
            chunk = f.read(READ_CHUNK)
            if not chunk:
                yield from scan.finish()
                return
            scan.feed(chunk)


class _ArrayScanner:
    """The state of :func:`read_json_array` between buffer refills: a byte buffer holding the unfinished element,
    the bracket depth, and the line count."""

    def __init__(self, path: str, start: int):
        self.path = path
        self.buf, self.base = b"", start  # buf[0] is at file offset ``base``
        self.pos = 0  # scan position in buf
        self.depth = 1 if start else 0  # 1: inside the top-level array
        self.elem: int | None = None  # buf offset of the current element's first byte
        self.gap = 0  # buf offset where the text between elements began (a scalar element hides there)
        self.line = count_newlines(path, start) + 1 if start else 1
        self.counted = 0  # newlines of buf[:counted] are in ``line``
        self.closed = False

    def _emit(self, a: int, b: int) -> tuple[int, int, bytes]:
        self.line += self.buf.count(b"\n", self.counted, a)
        self.counted = a
        return self.base + a, self.line, self.buf[a:b]

    def _scalar(self, b: int) -> Iterator[tuple[int, int, bytes]]:
        """A non-container, non-string element (a number, ``null``) before ``b``: yielded so it is counted."""
        piece = self.buf[self.gap : b].rstrip(_WS + b",")
        lead = len(piece) - len(piece.lstrip(_WS + b","))
        if piece[lead:]:
            yield self._emit(self.gap + lead, self.gap + len(piece))

    def elements(self) -> Iterator[tuple[int, int, bytes]]:
        """The elements complete in the buffer; stops at its end or at an unfinished string."""
        buf = self.buf
        for m in _TOKEN.finditer(buf, self.pos):
            a, c = m.start(), buf[m.start()]
            self.pos = m.end()
            if c == 0x22:  # '"'
                if m.end() - a < 2 or buf[m.end() - 1] != 0x22 or _escaped_quote(buf, a, m.end()):
                    self.pos = a  # unfinished: rescan it with more bytes
                    return
                if self.depth == 1 and self.elem is None:  # a string element
                    yield self._emit(a, m.end())
                    self.gap = m.end()
            elif c in (0x5B, 0x7B):  # '[' '{'
                if self.depth == 0:
                    if c != 0x5B:
                        raise SourceError(f"{self.path}: not a JSON array (starts with {{)")
                    self.depth, self.gap = 1, m.end()
                    continue
                if self.depth == 1:
                    yield from self._scalar(a)
                    self.elem = a
                self.depth += 1
            else:  # ']' '}'
                self.depth -= 1
                if self.depth == 1 and self.elem is not None:
                    yield self._emit(self.elem, m.end())
                    self.elem, self.gap = None, m.end()
                elif self.depth == 0:
                    yield from self._scalar(a)
                    self.closed = True
                    return
                elif self.depth < 0:
                    raise SourceError(f"{self.path}: unbalanced ']' or '}}' at byte {self.base + a}")
        self.pos = len(buf)

    def feed(self, chunk: bytes) -> None:
        """Drop what is no longer needed (all before the current element / unfinished string) and append."""
        keep = min(x for x in (self.elem, self.pos, self.gap) if x is not None)
        if self.counted > keep:  # newlines are counted up to ``counted``: keep that position, not recount
            self.counted -= keep
        else:
            self.line += self.buf.count(b"\n", self.counted, keep)
            self.counted = 0
        self.buf, self.base = self.buf[keep:] + chunk, self.base + keep
        self.pos -= keep
        self.elem = None if self.elem is None else self.elem - keep
        self.gap = max(0, self.gap - keep)

    def finish(self) -> Iterator[tuple[int, int, bytes]]:
        """End of file before the array closed: a truncated file's partial element is a (bad) record."""
        if self.elem is not None:
            yield self._emit(self.elem, len(self.buf))
        elif self.depth == 0:
            raise SourceError(f"{self.path}: not a JSON array")


def _escaped_quote(buf: bytes, a: int, end: int) -> bool:
    """Whether the string token ``buf[a:end]`` ends on an escaped quote: with its closing quote optional the regex
    stops there when the buffer ends inside ``\"`` (the string is then unfinished)."""
    k, n = end - 2, 0
    while k > a and buf[k] == 0x5C:
        n += 1
        k -= 1
    return n % 2 == 1
