"""Input sources of ``build``, one plug-in module per format, one registry: ``--source KIND:SPEC``.

``SPEC`` is comma-separated items: input paths (files, directories, globs, WebDataset braces ``{00000..00099}``)
and ``key=value`` options of that kind (``template=mistral``, ``loss-on=assistant``, ``image-root=DIR``, column
mappings, ...), e.g. ``llava:/data/llava_v1_5_mix665k.json,image-root=/data,template=mistral``. A new format is one
new module here with a ``@register``-ed :class:`~megatron_solo.preprocess.sources.base.Source` subclass (reader +
parser); see ``base`` for the contract and docs/preprocess.md for every kind's record shape and defaults.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

from megatron_solo.preprocess.sources import (  # noqa: F401  (each module registers its kind)
    chat,
    imagefolder,
    llava,
    mmc4,
    obelics,
    parquet,
    text,
    wds,
)
from megatron_solo.preprocess.sources.base import (
    REGISTRY,
    SKIP_REASONS,
    Document,
    Extent,
    ImageRef,
    Record,
    Skip,
    Source,
    SourceError,
)
from megatron_solo.preprocess.sources.files import open_maybe_compressed, split_top
from megatron_solo.preprocess.sources.imagefolder import IMAGE_EXTS, read_class_names

__all__ = [
    "IMAGE_EXTS",
    "REGISTRY",
    "SKIP_REASONS",
    "Document",
    "Extent",
    "ImageRef",
    "Record",
    "Skip",
    "Source",
    "SourceError",
    "group_words",
    "iter_records",
    "kinds",
    "make_sources",
    "open_maybe_compressed",
    "parse_spec",
    "read_class_names",
]

_KEY = re.compile(r"[a-z][a-z0-9_-]*")


def kinds() -> tuple[str, ...]:
    return tuple(REGISTRY)


def parse_spec(spec: str) -> tuple[str, list[str], dict[str, str]]:
    """``KIND:ITEM,ITEM,...`` -> (kind, paths, options). An item ``key=value`` whose key is an option of the kind is
    an option (``_`` and ``-`` alike); one that looks like an option but is not one (and is no existing path) is an
    error listing the kind's options; anything else is a path."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in REGISTRY or not rest:
        raise SourceError(f"--source {spec!r}: expected KIND:PATH[,PATH...][,key=value...] with KIND one of "
                          f"{', '.join(REGISTRY)}")  # fmt: skip
    cls = REGISTRY[kind]
    names = cls.option_names()
    paths, opts = [], {}
    for item in split_top(rest):
        if not item:
            continue
        key, eq, value = item.partition("=")
        norm = key.replace("_", "-")
        if eq and norm in names:
            if not value:
                raise SourceError(f"--source {spec!r}: option {norm}= needs a value")
            opts[norm] = value
        elif eq and _KEY.fullmatch(key) and not os.path.exists(item):
            known = ", ".join(names) if names else "none"
            raise SourceError(f"--source {spec!r}: {key!r} is not an option of {kind} sources (options: {known})")
        else:
            paths.append(item)
    if not paths:
        raise SourceError(f"--source {spec!r}: no input path")
    cls.check_options(opts, f"--source {spec!r}")
    return kind, paths, opts


def group_words(words: list[str]) -> list[str]:
    """The words one ``--source`` took (the shell's brace or glob expansion of one spec makes several) -> specs:
    consecutive words of the same kind and options become one source."""
    out: list[tuple[str, list[str], dict[str, str]]] = []
    for w in words:
        kind, paths, opts = parse_spec(w)
        if out and out[-1][0] == kind and out[-1][2] == opts:
            out[-1][1].extend(paths)
        else:
            out.append((kind, paths, opts))
    return [f"{k}:" + ",".join([*p, *(f"{n}={v}" for n, v in o.items())]) for k, p, o in out]


def make_sources(specs: list[str], defaults: dict[str, str] | None = None, seed: int = 0) -> list[Source]:
    """The build's sources, in order. ``defaults``: build-wide option values (``--template``, ``--loss-on``,
    ``--image-root``, ``--class-names``) for every source whose kind has that option and whose spec does not set it."""
    out = []
    for i, spec in enumerate(specs):
        kind, paths, opts = parse_spec(spec)
        cls = REGISTRY[kind]
        build_wide = {k: v for k, v in (defaults or {}).items() if v is not None and k in cls.option_names()}
        cls.check_options(build_wide, "build-wide option")
        out.append(cls(i, paths, build_wide | opts, seed, build_wide=set(build_wide) - set(opts)))
    return out


def iter_records(sources: list[Source]) -> Iterator[Record]:
    """All records of all sources, in source order, file order, record order (imagefolder: seeded shuffle)."""
    for s in sources:
        yield from s.records()
