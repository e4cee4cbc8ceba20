"""``parquet`` and ``arrow``: Hugging Face datasets (``to_parquet`` files, hub parquet snapshots, ``save_to_disk``
directories, ``.arrow`` files), one row -> one document, through a column mapping.

Columns (options ``KEY=COLUMN``; unset ones are found by name, in this order):

- ``image``: an ``Image`` feature (``{"bytes", "path"}`` struct), a list of them, bytes or a path; found as
  ``images`` or ``image``. Paths resolve against ``image-root`` (default: the file's directory).
- exactly one text mapping, the first found of:
  ``conversations`` (``conversations`` or ``messages``: LLaVA ``from``/``value`` turns with ``<image>``
  placeholders, or HF ``role``/``content`` with ``{"type": "image"}`` parts; LLaVA-OneVision-Data),
  ``texts`` (``texts``: a list of ``{"user", "assistant"}`` exchanges; The Cauldron),
  ``caption`` (``caption``: the image(s), then the caption),
  ``text`` (``text``: a document, the image(s) (if any) then the text; no turns).

Images without a placeholder go before the first user turn's text. Defaults: conversations / texts ``template=plain
loss-on=assistant`` (the answers are the targets), caption ``loss-on=text`` (the caption is the target), text: a
document (``template`` / ``loss-on`` do not apply). A file whose columns fit no mapping is an error naming them.
"""

from __future__ import annotations

from megatron_solo.format.chat_template import Image, Rendered, Segment, Turn
from megatron_solo.preprocess.sources.base import Document, Record, Skip, SourceError, register
from megatron_solo.preprocess.sources.conversation import turns
from megatron_solo.preprocess.sources.jsonl import image_dir
from megatron_solo.preprocess.sources.tables import TableSource, image_ref, schema_of

TEXT_MAPPINGS = {  # option -> column names looked for, in order
    "conversations": ("conversations", "messages"),
    "texts": ("texts",),
    "caption": ("caption",),
    "text": ("text",),
}
IMAGE_COLUMNS = ("images", "image")
MODE_DEFAULTS = {"conversations": "assistant", "texts": "assistant", "caption": "text", "text": "text"}


class HFDatasetSource(TableSource):
    summary = "Hugging Face datasets rows (Image features); column mapping for conversations / texts / caption / text"
    options = {
        "image": "image column (default: images or image)",
        **{k: f"{k} column (default: {' or '.join(v)})" for k, v in TEXT_MAPPINGS.items()},
        "image-root": "directory relative image paths resolve against (default: the file's)",
    }
    defaults = {"template": "plain"}

    def setup(self) -> None:
        schema = schema_of(self.files()[0])
        names = list(schema.names)
        given = [k for k in TEXT_MAPPINGS if k in self.opts]
        if len(given) > 1:
            raise SourceError(f"{self.spec()}: one text mapping at most, got {', '.join(given)}")
        if given:
            self.mode, self.text_col = given[0], self.opts[given[0]]
        else:
            found = [(k, c) for k, cols in TEXT_MAPPINGS.items() for c in cols if c in names]
            if not found:
                hint = " (OBELICS-style images/texts lists: --source obelics:...)" if "texts" in names else ""
                raise SourceError(
                    f"{self.files()[0]}: no text column found (columns: {', '.join(names)}); map one with "
                    f"conversations=, texts=, caption= or text= (docs/preprocess.md){hint}"
                )
            self.mode, self.text_col = found[0]
        if self.mode == "texts" and self.text_col in names and _is_string_list(schema.field(self.text_col).type):
            raise SourceError(
                f"{self.files()[0]}: column {self.text_col!r} is a list of strings (OBELICS' interleaved layout): use "
                f"--source obelics:..., or texts= for The Cauldron's list of {{user, assistant}}"
            )
        self.image_col = self.opts.get("image") or next((c for c in IMAGE_COLUMNS if c in names), None)
        if self.mode == "text":
            set_here = {k for k in ("template", "loss-on") if k in self.opts and k not in self.build_wide}
            if set_here:
                raise SourceError(f"{self.spec()}: text= rows are documents without turns ({', '.join(set_here)} "
                                  "apply to conversations=, texts= and caption=)")  # fmt: skip
            for k in ("template", "loss-on"):
                self.opts.pop(k, None)
        self.defaults = {"template": "plain", "loss-on": MODE_DEFAULTS[self.mode]}

    def columns(self, schema) -> list[str]:
        cols = [self.text_col] + ([self.image_col] if self.image_col else [])
        return cols + (["id"] if "id" in schema.names and "id" not in cols else [])

    def identity(self) -> dict:
        out = super().identity()
        out["mapping"] = {"mode": self.mode, "text": self.text_col, "image": self.image_col}
        return out

    def parse(self, rec: Record) -> Document:
        row: dict = rec.data
        try:
            return self._parse(row, rec)
        except Skip as s:
            if row.get("id") is not None:
                s.detail = f"id {row['id']!r}: {s.detail}"
            raise

    @staticmethod
    def _inline(ref: object, base: str, rec: Record, name: str):
        image = image_ref(ref, base, name)
        if image is None:
            raise Skip("bad_record", f"{name} has neither bytes nor a path")
        return image

    def _parse(self, row: dict, rec: Record) -> Document:
        raw = row.get(self.image_col) if self.image_col else None
        values = raw if isinstance(raw, list) else [] if raw is None else [raw]
        base = image_dir(self, rec)
        images = [image_ref(v, base, f"image {k + 1}") for k, v in enumerate(values)]
        if any(im is None for im in images):
            raise Skip("bad_record", "an image has neither bytes nor a path")
        value = row.get(self.text_col)
        if self.mode == "conversations":
            return Document(self.render(turns(value, images, lambda ref, name: self._inline(ref, base, rec, name))))
        if self.mode == "texts":
            if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
                raise Skip("bad_record", f"{self.text_col!r} is not a list of {{user, assistant}}")
            msgs = [{"from": r, "value": x.get(r)} for x in value for r in ("user", "assistant")]
            return Document(self.render(turns(msgs, images)))
        if not isinstance(value, str):
            raise Skip("bad_record", f"{self.text_col!r} is {type(value).__name__}, not a string")
        if not value.strip():
            raise Skip("empty_text", f"empty {self.text_col!r}")
        if self.mode == "caption":
            return Document(self.render([Turn.of("user", *map(Image, images)), Turn.of("assistant", value)]))
        segments = [Segment("image", False, image=im) for im in images] + [Segment("text", True, text=value)]
        return Document(Rendered(segments))


def _is_string_list(t) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_string(t.value_type)


@register
class ParquetSource(HFDatasetSource):
    kind = "parquet"
    summary = "parquet files / directories of Hugging Face datasets (" + HFDatasetSource.summary + ")"
    dir_patterns = ("*.parquet",)


@register
class ArrowSource(HFDatasetSource):
    kind = "arrow"
    summary = "Arrow files / datasets.save_to_disk directories (" + HFDatasetSource.summary + ")"
    dir_patterns = ("*.arrow",)
