"""THE SOLO shard schema: every name and number that the shard writer and the shard readers share, defined once.

Owned by the C++ writer and read from ``megatron_solo._C`` (csrc/shard_schema.h, csrc/format.h): the patch size and
dimension, the format tag and version, the part (file) names, the sidecar suffix and the count keys. Owned here and
passed into the C++ builder: the token-id table (:class:`TokenIds`). Also here: the shard-set manifest's name,
format and version, and the keys a manifest's shard entries share with the sidecar. Everything else (data/shards.py,
preprocess/, convert/, model/config.py) imports these names instead of spelling them. docs/shard_format.md is the
layout in words.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from megatron_solo import _C

# ---- image patches (csrc/format.h) ------------------------------------------------------------------------------
PATCH_SIZE: int = int(_C.PATCH_SIZE)  # pixels a side of one patch
PATCH_DIM: int = int(_C.PATCH_DIM)  # uint8 values a patch: RGB x PATCH_SIZE x PATCH_SIZE, channel-first (c, y, x)

# ---- one shard (csrc/shard_schema.h) ------------------------------------------------------------------------------
SHARD_FORMAT: str = str(_C.SHARD_FORMAT)  # the sidecar's "format"
SHARD_FORMAT_VERSION: int = int(_C.SHARD_FORMAT_VERSION)  # what the builder writes
SHARD_FORMAT_V1 = 1  # before stored targets: no targets part; the reader derives them (data/shards.derive_text_mask)
READABLE_VERSIONS: tuple[int, ...] = (SHARD_FORMAT_V1, SHARD_FORMAT_VERSION)

SHARD_PARTS: tuple[str, ...] = tuple(_C.SHARD_PARTS)  # one MMIDIDX dataset {prefix}.{part} each, in file order
TOKENS, PATCHES, DOCS, TARGETS = SHARD_PARTS  # unpacking fails loudly if the writer's parts change
SIDECAR_SUFFIX: str = str(_C.SHARD_SIDECAR_SUFFIX)  # {prefix}.json: written last, marks a complete shard
MMIDIDX_SUFFIXES: tuple[str, ...] = tuple(_C.MMIDIDX_SUFFIXES)  # the .bin / .idx pair of one IndexedDataset

COUNT_KEYS: tuple[str, ...] = tuple(_C.SHARD_COUNT_KEYS)  # sidecar = finish() counts; summed into the manifest

# ---- a shard set (written by megatron_solo/preprocess, read by data/shards.py) -----------------------------------
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "solo-shard-set"
MANIFEST_VERSION = 1
SHARD_ENTRY_COUNTS: tuple[str, ...] = ("packs", "images", "patches")  # copied from the sidecar into manifest entries


def shard_parts(version: int = SHARD_FORMAT_VERSION) -> tuple[str, ...]:
    """The parts a shard of ``version`` has (v1: no targets part)."""
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{SHARD_FORMAT} v{version} is not readable here (versions {READABLE_VERSIONS})")
    return SHARD_PARTS if version >= 2 else tuple(p for p in SHARD_PARTS if p != TARGETS)


def part_prefix(prefix: str | os.PathLike, part: str) -> str:
    """The IndexedDataset path prefix of one part of the shard at ``prefix``."""
    return f"{os.fspath(prefix)}.{part}"


def sidecar_path(prefix: str | os.PathLike) -> str:
    return f"{os.fspath(prefix)}{SIDECAR_SUFFIX}"


def shard_files(prefix: str | os.PathLike, version: int = SHARD_FORMAT_VERSION) -> list[str]:
    """Every file of a complete shard in the builder's order (``finish()["files"]``): data files, then the sidecar."""
    parts = shard_parts(version)
    return [part_prefix(prefix, p) + ext for p in parts for ext in MMIDIDX_SUFFIXES] + [sidecar_path(prefix)]


# ---- the token-id table ---------------------------------------------------------------------------------------------
class _HasTokenIds(Protocol):  # a SoloTokenizer (format/tokens.py): {role}_id for every role of TokenIds
    bos_id: int


@dataclass(frozen=True)
class TokenIds:
    """THE token-id table of a shard: what the builder lays out (BOS, EOS, padding, the image layout ids) and
    ``first_special`` (ids >= it are vision/special; the v1 target rule). Built from the tokenizer, handed to the C++
    builder as a dict, stored in the sidecar ("token_ids") and the manifest ("tokenizer.token_ids")."""

    bos: int
    eos: int
    pad: int
    vision: int
    vpatch: int
    row_sep: int
    vision_end: int
    first_special: int

    @classmethod
    def roles(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_tokenizer(cls, tokenizer: _HasTokenIds) -> TokenIds:
        """From a ``SoloTokenizer`` (attribute ``{role}_id`` for each role)."""
        return cls(**{role: int(getattr(tokenizer, f"{role}_id")) for role in cls.roles()})

    @classmethod
    def from_dict(cls, table: Mapping[str, int], source: str = "token_ids") -> TokenIds:
        """From a sidecar's / manifest's ``token_ids``; ``source`` names the file in the error."""
        missing = [r for r in cls.roles() if r not in table]
        if missing:
            raise ValueError(f"{source}: token_ids lacks {missing} (has {sorted(table)})")
        return cls(**{r: int(table[r]) for r in cls.roles()})

    def as_dict(self) -> dict[str, int]:
        """``{role: id}``: the form ``_C.ShardBuilder(token_ids=...)``, the sidecar and the manifest hold."""
        return dataclasses.asdict(self)

    @property
    def layout_ids(self) -> tuple[int, int, int, int]:
        """The ids of an image's token layout (never text, never loss targets): vision, vpatch, row_sep, vision_end."""
        return self.vision, self.vpatch, self.row_sep, self.vision_end
