"""``wds``: WebDataset / img2dataset tar shards.

Members are grouped by key (the name up to the first dot of its last path component, the WebDataset convention):
one ``jpg`` / ``jpeg`` / ``png`` / ``webp`` image + a ``txt`` caption or a ``json`` with ``caption`` (or ``text``);
``txt`` wins when both exist. Inputs: tar files (``.tar``, ``.tar.gz`` / ``.tgz``, ``.tar.zst``), directories of them,
and WebDataset's brace notation inside one ``--source`` (``/data/cc3m/{00000..00099}.tar``, expanded here, so it
works quoted or not). Record ids are ``TAR:key``. As a conversation the image is the user turn and the caption the
assistant turn (default ``template=plain loss-on=text``: image then caption, the caption is the target).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from megatron_solo.format.chat_template import Image, Turn
from megatron_solo.preprocess.sources.base import Document, Extent, ImageRef, Record, Skip, Source, register
from megatron_solo.preprocess.sources.conversation import decode_utf8, json_value
from megatron_solo.preprocess.sources.files import open_maybe_compressed

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


def _open_tar(path: str) -> tarfile.TarFile:
    if path.endswith(".zst"):
        return tarfile.open(fileobj=open_maybe_compressed(path), mode="r|")
    return tarfile.open(path, mode="r|*")


@register
class WebDatasetSource(Source):
    kind = "wds"
    summary = "WebDataset / img2dataset tars (jpg/jpeg/png/webp + txt and/or json); {00000..00099} expanded"
    defaults = {"template": "plain", "loss-on": "text"}
    dir_patterns = ("*.tar", "*.tar.gz", "*.tgz", "*.tar.zst")

    def read(self, extent: Extent) -> Iterator[Record]:
        """Consecutive members with the same key form one record."""
        path = extent.path
        key, group = None, {}
        with _open_tar(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = m.name
                base = name.rsplit("/", 1)[-1]
                k, dot, ext = base.partition(".")
                k = name[: len(name) - len(base)] + k
                if key is not None and k != key:
                    yield Record(f"{path}:{key}", self.index, group)
                    group = {}
                key = k
                f = tar.extractfile(m)
                group[ext.lower() if dot else ""] = f.read() if f is not None else b""
        if key is not None:
            yield Record(f"{path}:{key}", self.index, group)

    def parse(self, rec: Record) -> Document:
        group: dict[str, bytes] = rec.data
        img_key = next((k for k in IMAGE_MEMBERS if k in group), None)
        if img_key is None:
            raise Skip("bad_record", f"no image member (have {sorted(group)})")
        if "txt" in group:
            caption = decode_utf8(group["txt"])
        elif "json" in group:
            meta = json_value(group["json"])
            caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            if not isinstance(caption, str):
                raise Skip("bad_record", "json member without a 'caption'/'text' string")
        else:
            raise Skip("bad_record", f"no .txt/.json caption (have {sorted(group)})")
        if not caption.strip():
            raise Skip("empty_text", "empty caption")
        image = Image(ImageRef(group[img_key], f"member .{img_key}"))
        return Document(self.render([Turn.of("user", image), Turn.of("assistant", caption)]))
