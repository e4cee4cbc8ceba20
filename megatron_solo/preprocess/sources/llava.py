"""``llava``: LLaVA / ShareGPT4V conversation files (LLaVA-Pretrain's ``blip_laion_cc_sbu_558k.json``, LLaVA-665K).

Record: ``{"id": str, "image": "rel/path.jpg" | [paths] | absent, "conversations": [{"from": "human" | "gpt" |
"system", "value": str}, ...]}``. A file is a JSON array (streamed element by element, never loaded whole) or JSON
lines; which one is told by its first byte. ``<image>`` in a value marks where the next image goes (LLaVA writes
``"<image>\\n..."``); a record with images and no placeholder gets them before the first user turn's text. Image paths
resolve against ``image-root=DIR`` (or ``--image-root``; default the file's directory). A record without ``image`` is
a text-only conversation. Record ids are ``FILE:LINE`` of the element's first byte; skip messages add the record's
``id``.

Default ``template=plain loss-on=assistant``: for LLaVA-Pretrain the target is the caption only (the prompt "Write a
brief caption" and the image are context), for instruction data every assistant turn. SOLO's instruction-tuning
format is ``template=mistral`` (``[INST] ... [/INST] answer</s>``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from megatron_solo.preprocess.sources.base import Document, Extent, ImageRef, Record, Skip, register
from megatron_solo.preprocess.sources.conversation import json_object, turns
from megatron_solo.preprocess.sources.files import first_byte, is_compressed, read_json_array
from megatron_solo.preprocess.sources.jsonl import JsonLinesSource, image_dir, local_image


@register
class LlavaSource(JsonLinesSource):
    kind = "llava"
    summary = "LLaVA / ShareGPT4V conversations: a JSON array (streamed) or JSON lines; <image> placeholders"
    options = {"image-root": "directory the records' image paths are relative to (default: the file's)"}
    defaults = {"template": "plain", "loss-on": "assistant"}
    dir_patterns = ("*.json", "*.jsonl", "*.json.gz", "*.jsonl.gz", "*.json.zst", "*.jsonl.zst")

    def setup(self) -> None:
        self._arrays = {p: first_byte(p) == b"[" for p in self.files()}

    def extents(self, path: str, target_bytes: int | None = None) -> list[Extent]:
        if not self._arrays.get(path):
            return super().extents(path, target_bytes)
        size = os.path.getsize(path)
        if not target_bytes or is_compressed(path) or size <= target_bytes:
            return [Extent(path, nbytes=size)]
        # Element boundaries are known only by scanning: one streaming pass, cut at the first element at or past each
        # multiple of target_bytes (a range must start at an element's offset).
        cuts, nxt = [0], target_bytes
        for offset, _, _ in read_json_array(path):
            if offset >= nxt:
                cuts.append(offset)
                nxt = offset + target_bytes
        ends = [*cuts[1:], None]
        return [Extent(path, a, b, nbytes=(size if b is None else b) - a) for a, b in zip(cuts, ends)]

    def read(self, extent: Extent) -> Iterator[Record]:
        if not self._arrays.get(extent.path):
            yield from super().read(extent)
            return
        for _, line, data in read_json_array(extent.path, extent.start, extent.stop):
            yield Record(f"{extent.path}:{line}", self.index, data)

    def parse(self, rec: Record) -> Document:
        obj = json_object(rec.data)
        try:
            return Document(self.render(self._turns(obj, rec)))
        except Skip as s:
            if "id" in obj:
                s.detail = f"id {obj['id']!r}: {s.detail}"
            raise

    def _turns(self, obj: dict, rec: Record) -> list:
        image = obj.get("image", obj.get("images"))
        paths = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
            raise Skip("bad_record", f"'image' is {type(image).__name__}, not a path or a list of paths")
        base = image_dir(self, rec)
        refs = []
        for k, p in enumerate(paths):
            full = local_image(p, base, f"image {k + 1}")
            refs.append(ImageRef(full, f"image {k + 1} ({full})"))
        conv = obj.get("conversations")
        if conv is None:
            raise Skip("bad_record", "no 'conversations' list")
        return turns(conv, refs)
