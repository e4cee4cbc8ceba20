"""``imagefolder``: an ImageNet-layout tree ``ROOT/<class_dir>/**/<image>``; the document is the image, then the class
name (SOLO stage 1's target).

Class names: ``class-names=FILE`` (or ``--class-names``) in one of three shapes: lines ``class_dir name...``
(ImageNet's ``LOC_synset_mapping.txt``), a JSON object ``{"class_dir": "name"}``, or torchvision's
``imagenet_class_index.json`` ``{"0": ["n01440764", "tench"], ...}``. Without a file, the directory name with ``_`` ->
space. A file of another shape, or one that names none / not all of ROOT's class directories, is an error naming it.

Records are the files of each ROOT in a seeded shuffle (``--seed``): class-sorted order would put one class per pack.
As a conversation the image is the user turn and the name the assistant turn (default ``template=plain
loss-on=text``: image then name, the name is the target).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path

from megatron_solo.format.chat_template import Image, Turn
from megatron_solo.preprocess.sources.base import Document, Extent, ImageRef, Record, Source, SourceError, register
from megatron_solo.preprocess.sources.files import cut_units

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm")


def read_class_names(path: str | os.PathLike | None) -> dict[str, str]:
    """``class_dir -> name`` from one of the shapes in the module docstring; SourceError naming the file otherwise."""
    if path is None:
        return {}
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith(("{", "[")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}: class names file is not valid JSON ({e})") from None
        if isinstance(obj, dict) and obj and all(isinstance(v, str) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        if (
            isinstance(obj, dict)
            and obj
            and all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v) for v in obj.values())
        ):
            return {synset: name for synset, name in obj.values()}  # torchvision: {"0": ["n01440764", "tench"]}
        raise SourceError(
            f"{path}: unknown class names shape (want {{'class_dir': 'name'}}, torchvision's "
            f"{{'0': ['n01440764', 'tench']}} or 'class_dir name' lines)"
        )
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


@register
class ImageFolderSource(Source):
    kind = "imagefolder"
    summary = "ImageNet-layout folders ROOT/<class_dir>/<image>; target = the class name"
    options = {"class-names": "class_dir -> name file (lines, JSON object, or torchvision's imagenet_class_index.json)"}
    defaults = {"template": "plain", "loss-on": "text"}
    accepts_dirs = True
    file_options = ("class-names",)

    def setup(self) -> None:
        self.names = read_class_names(self.opts.get("class-names"))
        for root in self.files():
            if not os.path.isdir(root):
                raise SourceError(
                    f"imagefolder source: {root} is not a directory (imagefolder wants ROOT/<class>/<image>)"
                )
            if self.names:
                dirs = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
                missing = [d for d in dirs if d not in self.names]
                if missing:
                    raise SourceError(
                        f"{self.opts['class-names']}: no name for {len(missing)} of the {len(dirs)} class directories "
                        f"of {root} (e.g. {', '.join(missing[:3])})"
                    )

    def _items(self, root: str, keep: bool = False) -> list[tuple[str, str, str]]:
        """(relative path, path, label) of the root's images in the seeded order. ``keep``: cache the walk for the
        next call (a partitioned build sizes the files, then reads them); a read takes the cached walk and drops it."""
        cache = self.__dict__.setdefault("_walked", {})
        if not keep and root in cache:
            return cache.pop(root)
        if root not in cache:
            rootp = Path(root)
            items = []
            for cdir in sorted(d for d in rootp.iterdir() if d.is_dir()):
                label = self.names.get(cdir.name, cdir.name.replace("_", " "))
                for f in sorted(cdir.rglob("*")):
                    if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                        items.append((str(f.relative_to(rootp)), str(f), label))
            random.Random(self.seed).shuffle(items)
            if not keep:
                return items
            cache[root] = items
        return cache[root]

    def _sizes(self, root: str) -> list[int]:
        return [os.path.getsize(full) for _, full, _ in self._items(root, keep=True)]

    def input_bytes(self, path: str) -> int:
        return sum(self._sizes(path))

    def extents(self, path: str, target_bytes: int | None = None) -> list[Extent]:
        """Runs of positions in the shuffled file list of about ``target_bytes`` of image files."""
        if not target_bytes:
            return [Extent(path)]
        return cut_units(self._sizes(path), path, target_bytes)

    def __getstate__(self) -> dict:  # workers parse records; they never need the parent's walk
        return {k: v for k, v in self.__dict__.items() if k != "_walked"}

    def read(self, extent: Extent) -> Iterator[Record]:
        """Records ``start:stop`` of the root's shuffled file list (the extent unit is a position in that list)."""
        for rel, full, label in self._items(extent.path)[extent.start : extent.stop]:
            yield Record(f"{extent.path}:{rel}", self.index, (full, label))

    def parse(self, rec: Record) -> Document:
        path, label = rec.data
        return Document(self.render([Turn.of("user", Image(ImageRef(path, path))), Turn.of("assistant", label)]))
