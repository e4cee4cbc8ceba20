"""The bundled SFT demo's data: questions and answers about the demo's shape pictures (preprocess/demo.py).

``write`` generates, deterministically,

- ``train/llava.json``: LLaVA-665K-style conversations (``{"id", "image", "conversations": [{"from": "human",
  "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}``) of 1-3 turns about one picture's colour, shape,
  size and background, in several phrasings, answered with one word; built by the real builder
  (``--source llava:...,template=mistral,loss-on=assistant``, scripts/demo_sft.sh);
- ``eval/{colour,shape,size,background}.jsonl``: VQA task files (``{"id", "image", "question", "answer"}``) on
  pictures drawn with another seed and with phrasings that never occur in training, one file per attribute;
- ``eval/heldout.jsonl``: a small mixed task for evaluation during training (``--eval-tasks``).

``report`` prints the accuracy of ``megatron_solo.evaluate``'s scores.json files (before / after SFT) per attribute,
next to the chance level (one over the number of values an attribute takes).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from megatron_solo.preprocess.demo import BACKGROUNDS, COLOURS, SHAPES, SIZES, _shape_image

ATTRIBUTES = {
    "colour": sorted(COLOURS),
    "shape": list(SHAPES),
    "size": sorted(SIZES),
    "background": sorted(BACKGROUNDS),
}
# Phrasings: the first list is trained on, the second only asked at evaluation (held-out phrasings).
QUESTIONS = {
    "colour": (
        ["What colour is the shape?", "Which colour does the shape have?", "Tell me the colour of the shape.",
         "What is the colour of the object?", "The shape in the picture: what colour is it?"],
        ["What colour is the object in this image?", "Name the colour of the shape."],
    ),
    "shape": (
        ["What shape is this?", "Which shape is shown?", "Name the shape in the picture.",
         "What kind of shape do you see?", "Tell me the shape of the object."],
        ["What is the shape in this image?", "Which shape can you see?"],
    ),
    "size": (
        ["Is the shape big or small?", "How big is the shape?", "What size is the object?",
         "Is the object small or big?"],
        ["Tell me the size of the shape.", "Is the shape in this image big or small?"],
    ),
    "background": (
        ["What colour is the background?", "Which colour is the background?", "What is the background colour?",
         "Tell me the colour of the background."],
        ["Name the background colour.", "The background of the picture: what colour is it?"],
    ),
}  # fmt: skip


def chance(attribute: str) -> float:
    """Accuracy of a uniform guess among the attribute's values."""
    return 1.0 / len(ATTRIBUTES[attribute])


def _picture(rng: random.Random, folder: Path, name: str) -> tuple[str, dict]:
    im, a = _shape_image(rng, rng.choice((64, 96)))
    im.save(folder / name)
    return name, a


def write_train(out: Path, n: int, seed: int = 11) -> Path:
    """``n`` LLaVA records (1-3 turns each, attributes in random order; the image placeholder leads the first
    question, or follows it) -> ``out/llava.json`` with pictures in ``out/images``."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        name, a = _picture(rng, out / "images", f"{i:05d}.png")
        asked = rng.sample(sorted(ATTRIBUTES), rng.choice((1, 2, 3)))
        turns = []
        for k, attr in enumerate(asked):
            q = rng.choice(QUESTIONS[attr][0])
            if k == 0:
                q = f"<image>\n{q}" if rng.random() < 0.7 else f"{q}\n<image>"
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a[attr]}]
        records.append({"id": f"sft-{i:05d}", "image": f"images/{name}", "conversations": turns})
    path = out / "llava.json"
    path.write_text(json.dumps(records, indent=0) + "\n")
    return path


def write_eval(out: Path, n: int, seed: int = 12, heldout: int = 32) -> dict[str, Path]:
    """Per attribute a VQA file over the same ``n`` new pictures and held-out phrasings (+ ``heldout.jsonl``: the
    first ``heldout`` pictures, one random attribute each)."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pictures = [_picture(rng, out / "images", f"{i:05d}.png") for i in range(n)]
    paths = {}
    for attr in ATTRIBUTES:
        rows = [
            {"id": f"{attr}-{i:05d}", "image": f"images/{name}", "question": rng.choice(QUESTIONS[attr][1]),
             "answer": a[attr]}
            for i, (name, a) in enumerate(pictures)
        ]  # fmt: skip
        paths[attr] = out / f"{attr}.jsonl"
        paths[attr].write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixed = []
    for i, (name, a) in enumerate(pictures[:heldout]):
        attr = rng.choice(sorted(ATTRIBUTES))
        q = rng.choice(QUESTIONS[attr][1])
        mixed.append({"id": f"mixed-{i:05d}", "image": f"images/{name}", "question": q, "answer": a[attr]})
    paths["heldout"] = out / "heldout.jsonl"
    paths["heldout"].write_text("".join(json.dumps(r) + "\n" for r in mixed))
    return paths


def report(before: Path, after: Path) -> str:
    """The demo's table: per attribute, accuracy (normalised match) before and after SFT and the chance level."""
    b, a = json.loads(Path(before).read_text()), json.loads(Path(after).read_text())
    lines = [f"{'question':<12}{'before SFT':>12}{'after SFT':>12}{'chance':>9}{'items':>7}"]
    for attr in ATTRIBUTES:
        if attr in a:
            s_b, s_a = b[attr]["normalized_match"], a[attr]["normalized_match"]
            lines.append(f"{attr:<12}{s_b:>12.3f}{s_a:>12.3f}{chance(attr):>9.3f}{int(a[attr]['n']):>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_solo.preprocess.demo_sft", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write train/llava.json (+ images) and the eval task files under --out")
    w.add_argument("--out", required=True)
    w.add_argument("--train", type=int, default=2000, help="training conversations")
    w.add_argument("--eval", type=int, default=200, help="held-out pictures (each asked about every attribute)")
    r = sub.add_parser("report", help="print accuracy before / after SFT and chance from two scores.json files")
    r.add_argument("--before", required=True)
    r.add_argument("--after", required=True)
    args = p.parse_args(argv)
    if args.cmd == "write":
        out = Path(args.out)
        train = write_train(out / "train", args.train)
        tasks = write_eval(out / "eval", args.eval)
        print(f"[sft-demo] {args.train} conversations: {train}; eval tasks: {', '.join(map(str, tasks.values()))}")
        return 0
    print(report(Path(args.before), Path(args.after)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
