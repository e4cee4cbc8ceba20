"""Chat templates: a conversation -> the segments of ONE document, and which of its tokens are loss targets.

The one owner of how turns become tokens. The shard builder (pre-training and SFT shards), the HF processor and
``generate`` all render through :func:`render`, so the ids a shard holds for a conversation are the ids the
processor produces for it and the ids ``generate`` feeds the model.

A document is ``[BOS] + segments + [EOS]``. :func:`render` returns the segments between BOS and the final EOS, each
a text run, an image, or an end-of-turn EOS inside the document (``mistral`` closes every assistant turn with EOS;
the last one is the document's own EOS), and whether that final EOS is a target. Text runs are encoded one segment
at a time (SentencePiece adds its dummy prefix to each), so a run never spans an image or a change of target.

Templates:

- ``plain``: every text part its own run, images in place, roles not rendered and nothing inserted between parts:
  the released SOLO pre-training pipeline (and this project's ``chat`` shards before templates existed).
- ``mistral``: ``[INST] user [/INST] answer</s>[INST] user [/INST] answer</s>``, SOLO's instruction-tuning format
  (Mistral-Instruct); a system turn is prepended to the first user turn (``system\\n\\nuser``), as Mistral has no
  system role. Images stay inside the user turn where they were.

Loss policies (``loss_on``): ``text`` (every text token and the final EOS: the pre-training rule), ``assistant``
(assistant turns and the EOS closing each: instruction tuning), ``last`` (the final turn and the final EOS, e.g. a
class name or a caption after a prompt). Images, BOS and the tokens of vision layouts are never targets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")
TEMPLATES = ("plain", "mistral")
LOSS_POLICIES = ("text", "assistant", "last")
IMAGE_PLACEHOLDER = "<image>"  # LLaVA's marker of where an image goes inside a text


class TemplateError(ValueError):
    """A conversation cannot be rendered (unknown role / template / policy, a misplaced image, no content)."""


@dataclass(frozen=True)
class Image:
    """An image part; ``ref`` is whatever the caller loads (a path, bytes, a decoded array): never touched here."""

    ref: object


Part = str | Image


@dataclass(frozen=True)
class Turn:
    role: str  # one of ROLES
    content: tuple[Part, ...]

    @classmethod
    def of(cls, role: str, *content: Part) -> Turn:
        return cls(role, tuple(content))


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered document: ``kind`` is ``text`` (``text`` set), ``image`` (``image`` set) or ``eos``
    (an end-of-turn EOS token inside the document)."""

    kind: str
    target: bool
    text: str = ""
    image: object = None


@dataclass
class Rendered:
    segments: list[Segment] = field(default_factory=list)
    eos_target: bool = True  # whether the document's closing EOS is a loss target (no EOS when generating)

    @property
    def images(self) -> list[object]:
        return [s.image for s in self.segments if s.kind == "image"]


def _check(turns: Sequence[Turn], template: str, loss_on: str) -> None:
    if template not in TEMPLATES:
        raise TemplateError(f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if loss_on not in LOSS_POLICIES:
        raise TemplateError(f"unknown loss policy {loss_on!r}; choose one of {', '.join(LOSS_POLICIES)}")
    if not turns:
        raise TemplateError("empty conversation")
    for t in turns:
        if t.role not in ROLES:
            raise TemplateError(f"unknown role {t.role!r}; roles are {', '.join(ROLES)}")
        if template == "mistral" and t.role != "user" and any(isinstance(p, Image) for p in t.content):
            raise TemplateError(f"mistral template: images belong to user turns, found one in a {t.role} turn")


def _is_target(turns: Sequence[Turn], k: int, loss_on: str) -> bool:
    if loss_on == "text":
        return True
    if loss_on == "assistant":
        return turns[k].role == "assistant"
    return k == len(turns) - 1  # last


class _Builder:
    """Appends segments, merging adjacent text of the same target flag into one run."""

    def __init__(self):
        self.segments: list[Segment] = []
        self._text: list[str] = []
        self._target = False

    def text(self, s: str, target: bool) -> None:
        if not s:
            return
        if self._text and target != self._target:
            self._flush()
        self._text.append(s)
        self._target = target

    def image(self, ref: object) -> None:
        self._flush()
        self.segments.append(Segment("image", False, image=ref))

    def eos(self, target: bool) -> None:
        self._flush()
        self.segments.append(Segment("eos", target))

    def _flush(self) -> None:
        if self._text:
            self.segments.append(Segment("text", self._target, text="".join(self._text)))
            self._text = []


def _render_plain(turns: Sequence[Turn], loss_on: str) -> Rendered:
    segments = []
    for k, t in enumerate(turns):
        target = _is_target(turns, k, loss_on)
        for p in t.content:
            if isinstance(p, Image):
                segments.append(Segment("image", False, image=p.ref))
            elif p.strip():  # a blank part adds nothing (as the released pipeline skipped it)
                segments.append(Segment("text", target, text=p))
    return Rendered(segments, eos_target=_is_target(turns, len(turns) - 1, loss_on))


def _render_mistral(turns: Sequence[Turn], loss_on: str, add_generation_prompt: bool) -> Rendered:
    b = _Builder()
    system: list[Part] = []
    last = len(turns) - 1
    for k, t in enumerate(turns):
        target = _is_target(turns, k, loss_on)
        if t.role == "system":
            system += [*t.content, "\n\n"]
            continue
        if t.role == "user":
            b.text("[INST] ", target)
            for p in [*system, *t.content]:
                if isinstance(p, Image):
                    b.image(p.ref)
                else:
                    b.text(p, target)
            system = []
            b.text(" [/INST]", target)
            continue
        b.text(" " + "".join(p for p in t.content if isinstance(p, str)).strip(), target)
        if k != last:
            b.eos(target)
    if system:
        raise TemplateError("mistral template: a system turn must be followed by a user turn")
    b._flush()
    closing = turns[-1].role == "assistant" or not add_generation_prompt
    return Rendered(b.segments, eos_target=closing and _is_target(turns, last, loss_on))


def render(
    turns: Sequence[Turn], template: str = "plain", loss_on: str = "text", add_generation_prompt: bool = False
) -> Rendered:
    """The document of ``turns`` under ``template``, with targets chosen by ``loss_on``. ``add_generation_prompt``:
    a prompt for generation (the conversation ends with a user turn; the model writes the next assistant turn), so
    no closing EOS follows: callers then emit ``[BOS] + segments`` only."""
    _check(turns, template, loss_on)
    if add_generation_prompt and turns[-1].role == "assistant":
        raise TemplateError("add_generation_prompt: the conversation already ends with an assistant turn")
    if template == "plain":
        return _render_plain(turns, loss_on)
    return _render_mistral(turns, loss_on, add_generation_prompt)


def place_images(text: str, images: Sequence[object], placeholder: str = IMAGE_PLACEHOLDER) -> list[Part]:
    """One text with ``placeholder`` marks -> parts with the images in their places (LLaVA's ``<image>``). The
    caller decides where images go when a conversation has no placeholder at all (LLaVA: before the first text)."""
    pieces = text.split(placeholder)
    if len(pieces) - 1 != len(images):
        raise TemplateError(f"text has {len(pieces) - 1} {placeholder} placeholder(s) but {len(images)} image(s)")
    parts: list[Part] = []
    for k, piece in enumerate(pieces):
        if piece:
            parts.append(piece)
        if k < len(images):
            parts.append(Image(images[k]))
    return parts


def token_ids(
    rendered: Rendered,
    encode: Callable[[str], list[int]],
    image_ids: Callable[[object], list[int]],
    bos_id: int,
    eos_id: int,
    add_eos: bool = True,
) -> tuple[list[int], list[int]]:
    """(ids, targets) of the whole document: ``[BOS] + segments (+ [EOS])``; ``targets[t]`` = 1 where token t is a
    loss target. The builder's C++ packer lays out the same ids from the same segments (``image_ids`` gives an
    image's ``<vision>`` layout); the HF processor and ``generate`` use this function."""
    ids, targets = [bos_id], [0]
    for s in rendered.segments:
        if s.kind == "text":
            run = list(encode(s.text))
        elif s.kind == "eos":
            run = [eos_id]
        else:
            ids += list(image_ids(s.image))
            targets += [0] * (len(ids) - len(targets))
            continue
        ids += run
        targets += [int(s.target)] * len(run)
    if add_eos:
        ids.append(eos_id)
        targets.append(int(rendered.eos_target))
    return ids, targets
