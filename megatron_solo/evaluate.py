"""Score a SOLO model on VQA-style and caption tasks: accuracy (exact, normalised, VQA) and CIDEr.

    python -m megatron_solo.evaluate --checkpoint DIR --task vqa:val.jsonl --task caption:caps.jsonl \\
        --out-dir eval/ [--batch-size 8] [--max-new-tokens 16] [--template auto] [--device cuda] [--limit 100]
    python -m megatron_solo.evaluate --task vqa:val.jsonl --predictions preds.jsonl     # score a file, no model

``--checkpoint`` is a SOLO checkpoint dir or an exported HF dir (opened by ``megatron_solo.generate.load``), on CPU
or GPU. Items are answered in batches (left padding, KV cache, greedy by default) through the processor's
``apply_chat_template`` with ``--template`` (auto: the checkpoint's recorded template, else plain). Writes
``<out-dir>/<task>.predictions.jsonl`` (one row per item: id, prediction, references, its metric values) and
``<out-dir>/scores.json``, and prints the scores. Task files, metrics and the task API the trainer calls:
megatron_solo/eval/ and docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from megatron_solo.eval.records import RecordError
from megatron_solo.eval.tasks import ModelFn, Task, load_task


class HFModelFn:
    """``model_fn`` over HF generate for the tasks: a batch of conversations -> answer strings; keeps the decoding
    throughput."""

    def __init__(self, model, processor, template: str | None = None, sampling=None):
        from megatron_solo.generate import Sampling, Throughput

        self.model, self.processor, self.template = model, processor, template
        self.sampling = sampling or Sampling(max_new_tokens=16)
        self.throughput = Throughput()

    def __call__(self, conversations) -> list[str]:
        from megatron_solo.generate import chat

        g = chat(self.model, self.processor, conversations, self.template, self.sampling)
        self.throughput.add(g)
        return [t.strip() for t in g.texts]


def evaluate(
    tasks: list[Task], model_fn: ModelFn, out_dir: str | Path | None = None, batch_size: int = 8, progress: bool = True
) -> dict[str, dict]:
    """Run every task; write predictions + scores.json under ``out_dir`` (when given). -> {task: scores}."""
    results = {}
    for task in tasks:
        result = task.run(model_fn, batch_size=batch_size, progress=progress)
        results[task.name] = {**result.scores, "primary": task.primary}
        if out_dir is not None:
            result.write_predictions(Path(out_dir) / f"{task.name}.predictions.jsonl")
    if out_dir is not None:
        (Path(out_dir) / "scores.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_solo.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help="SOLO checkpoint dir or exported HF dir (not needed with --predictions)")
    p.add_argument(
        "--task",
        action="append",
        required=True,
        help="[name=]vqa:FILE.jsonl | [name=]caption:FILE.jsonl | FILE.jsonl (kind from its records)",
    )
    p.add_argument("--predictions", help="score this predictions JSONL ({id, prediction}) instead of running a model")
    p.add_argument("--out-dir", help="write <task>.predictions.jsonl and scores.json here")
    p.add_argument("--image-root", help="folder for relative image paths (default: each task file's folder)")
    p.add_argument(
        "--prompt",
        help="prompt format overriding the task's ({question} for VQA; e.g. "
        "'{question}\\nAnswer the question using a single word or phrase.')",
    )
    p.add_argument("--limit", type=int, help="first N items of each task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument(
        "--template",
        default="auto",
        choices=["auto", "plain", "mistral"],
        help="chat template; auto: the checkpoint's recorded one, else plain",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.predictions and len(args.task) != 1:
        p.error("--predictions scores one task: give exactly one --task")
    if not args.predictions and not args.checkpoint:
        p.error("--checkpoint is needed to run a model (or give --predictions to score a file)")
    try:
        tasks = [load_task(spec, args.prompt, args.image_root, args.limit) for spec in args.task]
        if args.predictions:
            result = tasks[0].score_file(args.predictions)
            results = {tasks[0].name: {**result.scores, "primary": tasks[0].primary}}
            if args.out_dir:
                result.write_predictions(Path(args.out_dir) / f"{tasks[0].name}.predictions.jsonl")
                (Path(args.out_dir) / "scores.json").write_text(json.dumps(results, indent=2) + "\n")
        else:
            from megatron_solo.generate import Sampling, load

            model, processor = load(args.checkpoint, args.device, args.dtype)
            template = None if args.template == "auto" else args.template
            model_fn = HFModelFn(model, processor, template, Sampling(max_new_tokens=args.max_new_tokens))
            results = evaluate(tasks, model_fn, args.out_dir, args.batch_size, progress=not args.no_progress)
            print(model_fn.throughput.line(), file=sys.stderr)
    except (FileNotFoundError, RecordError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
