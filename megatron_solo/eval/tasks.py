"""Evaluation tasks: a JSONL file of items -> prompts for a model -> per-item predictions and scores.

The task code is model-agnostic: ``Task.run(model_fn)`` hands batches of conversations (``Turn`` lists ending with
a user turn, images as paths) to ``model_fn`` and scores the answers it returns. ``megatron_solo.evaluate`` passes a
function over HF ``generate``; the trainer can pass one over its own model, every N steps, on held-out data::

    task = load_task("vqa:heldout.jsonl")            # or VQATask.load(path) / CaptionTask.load(path)
    result = task.run(model_fn, batch_size=8)        # model_fn(list[list[Turn]]) -> list[str]
    result.scores  # {"vqa_accuracy": ..., "normalized_match": ..., "exact_match": ..., "n": ...}
    result.predictions  # one dict per item: id, prediction, references, the item's metric values

Record shapes (one JSON object per line; images relative to the file's folder; ``id`` optional, unique):

- VQA: ``{"id", "image" | "images", "question", "answers": [str | {"answer": str}, ...]}`` (or ``"answer": str``);
  ``<image>`` in the question places the image(s), otherwise they come first.
- caption: ``{"id", "image" | "images", "captions": [str, ...]}`` (or ``"caption": str``), optional ``"prompt"``.

A record whose image file is missing is skipped, counted (``skipped`` in the scores) and named in a warning; any
other malformed record is an error naming file:line. Metrics are the pure functions of eval/metrics.py.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from megatron_solo.eval import metrics
from megatron_solo.eval.records import RecordError, images_of, read_jsonl, record_id
from megatron_solo.format.chat_template import TemplateError, Turn
from megatron_solo.format.messages import to_turns

ModelFn = Callable[[list[list[Turn]]], list[str]]


@dataclass
class Item:
    id: str
    turns: list[Turn]  # the prompt: ends with the user turn the model answers
    references: list[str]  # VQA: the answers; caption: the reference captions


@dataclass
class TaskResult:
    task: str
    scores: dict[str, float]
    predictions: list[dict] = field(default_factory=list)

    def write_predictions(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in self.predictions:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(path)
        return path


class Task:
    """Items + how to score answers to them. Subclasses set ``kind``, ``primary`` and implement ``_item`` and
    ``score_items``."""

    kind: ClassVar[str] = ""
    default_prompt: ClassVar[str] = ""

    def __init__(self, name: str, items: list[Item], skipped: int = 0, source: str = ""):
        if not items:
            raise RecordError(f"{source or name}: no usable items ({skipped} skipped)")
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
            raise RecordError(f"{source or name}: duplicate item ids {dup}")
        self.name, self.items, self.skipped, self.source = name, items, skipped, source

    @property
    def primary(self) -> str:
        raise NotImplementedError

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        prompt: str | None = None,
        image_root=None,
        limit: int | None = None,
        name: str | None = None,
    ) -> Task:
        """Read a task file; ``prompt`` overrides the task's prompt format (``{question}`` is replaced by the
        question for VQA); ``limit`` keeps the first N items."""
        path = Path(path)
        root = Path(image_root) if image_root is not None else path.resolve().parent
        items, missing = [], []
        for k, (where, obj) in enumerate(read_jsonl(path)):
            if limit is not None and len(items) >= limit:
                break
            images = [os.path.join(root, i) for i in images_of(obj, where)]
            absent = [i for i in images if not os.path.isfile(i)]
            if absent:
                missing.append(f"{where}: {absent[0]}")
                continue
            items.append(cls._item(obj, where, record_id(obj, where, str(k)), images, prompt))
        if missing:
            print(
                f"warning: {path}: skipped {len(missing)} record(s) whose image is missing, e.g. "
                + "; ".join(missing[:3]),
                file=sys.stderr,
            )
        return cls(name or path.stem, items, len(missing), str(path))

    @classmethod
    def _item(cls, obj: dict, where: str, item_id: str, images: list[str], prompt: str | None) -> Item:
        raise NotImplementedError

    @staticmethod
    def _user_turn(text: str, images: list[str], where: str) -> list[Turn]:
        try:
            return to_turns([{"role": "user", "content": text}], images)
        except TemplateError as e:
            raise RecordError(f"{where}: {e}") from None

    def run(self, model_fn: ModelFn, batch_size: int = 8, progress: bool = True) -> TaskResult:
        """Answer every item with ``model_fn`` (batches of ``batch_size``) and score the answers."""
        from tqdm import tqdm

        answers: list[str] = []
        with tqdm(total=len(self.items), desc=self.name, unit="item", disable=not progress) as bar:
            for start in range(0, len(self.items), batch_size):
                batch = self.items[start : start + batch_size]
                try:
                    got = list(model_fn([it.turns for it in batch]))
                except ValueError as e:  # e.g. an image that does not decode: name the items
                    raise ValueError(f"{self.source or self.name}: items {batch[0].id} .. {batch[-1].id}: {e}") from e
                if len(got) != len(batch):
                    raise RuntimeError(f"model_fn returned {len(got)} answers for {len(batch)} prompts")
                answers += [str(a) for a in got]
                bar.update(len(batch))
        return self.score(answers)

    def score(self, predictions: Sequence[str]) -> TaskResult:
        """Score one prediction per item (in item order) -> TaskResult with scores and per-item rows."""
        if len(predictions) != len(self.items):
            raise ValueError(f"{self.name}: {len(predictions)} predictions for {len(self.items)} items")
        scores, per_item = self.score_items(list(predictions))
        scores = {**scores, "n": len(self.items), "skipped": self.skipped}
        rows = [
            {"id": it.id, "prediction": p, "references": it.references, **extra}
            for it, p, extra in zip(self.items, predictions, per_item)
        ]
        return TaskResult(self.name, scores, rows)

    def score_file(self, path: str | os.PathLike) -> TaskResult:
        """Score a predictions JSONL (``{"id", "prediction"}`` per line, ``answer`` also accepted) against this
        task: every item needs exactly one prediction."""
        by_id: dict[str, str] = {}
        for where, obj in read_jsonl(path):
            text = obj.get("prediction", obj.get("answer"))
            if "id" not in obj or not isinstance(text, str):
                raise RecordError(f"{where}: a prediction needs 'id' and a 'prediction' string")
            if str(obj["id"]) in by_id:
                raise RecordError(f"{where}: a second prediction for id {obj['id']!r}")
            by_id[str(obj["id"])] = text
        missing = [it.id for it in self.items if it.id not in by_id]
        extra = sorted(set(by_id) - {it.id for it in self.items})
        if missing or extra:
            raise RecordError(
                f"{path}: predictions do not match {self.source}: missing ids {missing[:5]}, unknown ids {extra[:5]}"
            )
        return self.score([by_id[it.id] for it in self.items])

    def score_items(self, predictions: list[str]) -> tuple[dict[str, float], list[dict]]:
        raise NotImplementedError


class VQATask(Task):
    """Short answers to questions: exact match, normalised match and VQA accuracy (eval/metrics.py).
    ``primary``: ``vqa_accuracy`` when every item has the 10 human answers of VQA-style data, else
    ``normalized_match`` (VQA accuracy caps a single reference answer at 1/3)."""

    kind = "vqa"
    default_prompt = "{question}"

    @property
    def primary(self) -> str:
        return "vqa_accuracy" if all(len(it.references) == 10 for it in self.items) else "normalized_match"

    @classmethod
    def _item(cls, obj, where, item_id, images, prompt) -> Item:
        question = obj.get("question")
        if not isinstance(question, str):
            raise RecordError(f"{where}: a VQA record needs a 'question' string")
        raw = obj.get("answers", [obj["answer"]] if "answer" in obj else None)
        answers = [a.get("answer") if isinstance(a, dict) else a for a in raw] if isinstance(raw, list) else None
        if not answers or not all(isinstance(a, str) for a in answers):
            raise RecordError(f"{where}: a VQA record needs 'answers' (strings or {{'answer': str}}) or 'answer'")
        text = (prompt or cls.default_prompt).replace("{question}", question)
        return Item(item_id, cls._user_turn(text, images, where), answers)

    def score_items(self, predictions):
        fns = {
            "exact_match": metrics.exact_match,
            "normalized_match": metrics.normalized_match,
            "vqa_accuracy": metrics.vqa_accuracy,
        }
        rows = [{k: fn(p, it.references) for k, fn in fns.items()} for it, p in zip(self.items, predictions)]
        scores = {k: metrics.mean([r[k] for r in rows]) for k in fns}
        return scores, rows


class CaptionTask(Task):
    """Captions: CIDEr(-D) from pycocoevalcap against the reference captions (eval/metrics.py)."""

    kind = "caption"
    default_prompt = ""
    primary = "cider"

    @classmethod
    def _item(cls, obj, where, item_id, images, prompt) -> Item:
        raw = obj.get("captions", [obj["caption"]] if "caption" in obj else None)
        if not isinstance(raw, list) or not raw or not all(isinstance(c, str) and c.strip() for c in raw):
            raise RecordError(f"{where}: a caption record needs 'captions' (non-empty strings) or 'caption'")
        if not images:
            raise RecordError(f"{where}: a caption record needs an 'image'")
        text = obj.get("prompt", prompt if prompt is not None else cls.default_prompt)
        return Item(item_id, cls._user_turn(text, images, where), list(raw))

    def score_items(self, predictions):
        corpus, per_item = metrics.cider(
            {it.id: p for it, p in zip(self.items, predictions)}, {it.id: it.references for it in self.items}
        )
        return {"cider": corpus}, [{"cider": per_item[it.id]} for it in self.items]


TASKS: dict[str, type[Task]] = {"vqa": VQATask, "caption": CaptionTask}


def detect_kind(path: str | os.PathLike) -> str:
    """``vqa`` when the first record has a question, ``caption`` when it has captions."""
    for where, obj in read_jsonl(path):
        if "question" in obj:
            return "vqa"
        if "captions" in obj or "caption" in obj:
            return "caption"
        raise RecordError(f"{where}: cannot tell the task: no 'question' (vqa) or 'captions' (caption) field")
    raise RecordError(f"{path}: no records")


def load_task(spec: str, prompt: str | None = None, image_root=None, limit: int | None = None) -> Task:
    """``"vqa:path.jsonl"``, ``"caption:path.jsonl"`` or a bare path (kind from its first record); a
    ``name=`` prefix names the task (``"heldout=vqa:path"``)."""
    name, sep, rest = spec.partition("=")
    if not sep or os.sep in name:
        name, rest = None, spec
    kind, sep, path = rest.partition(":")
    if not sep or kind not in TASKS:
        kind, path = detect_kind(rest), rest
    return TASKS[kind].load(path, prompt=prompt, image_root=image_root, limit=limit, name=name)
