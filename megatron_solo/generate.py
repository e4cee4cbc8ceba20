"""Caption, prompt or chat with a SOLO model from a SOLO checkpoint dir or an exported HF dir, on CPU or GPU.

    python -m megatron_solo.generate --checkpoint DIR --image x.jpg --prompt "Describe the image." \\
        [--greedy | --temperature 0.7 --top-p 0.9 --seed 0] [--max-new-tokens 64] [--device cuda] [--dtype bf16]
    python -m megatron_solo.generate --checkpoint DIR --chat [--template mistral]      # interactive, stdin
    python -m megatron_solo.generate --checkpoint DIR --input prompts.jsonl --output answers.jsonl [--batch-size 8]

One decoding path for both formats: HF ``generate()`` (KV cache) on the SOLO-HF model class that the export ships
(megatron_solo/convert/hf_remote). An exported HF dir is loaded as users load it (``trust_remote_code=True``); a
SOLO checkpoint (saved at any TP/DP) is converted in memory, one layer at a time, with the exporter's reader, so
the two give the same tokens for the same weights. The vision special tokens are never generated (suppressed in the
generation config); generation stops at EOS.

Prompts: ``--prompt`` is one plain prompt (``<image>`` in it places the image(s), otherwise images come first).
``--chat`` and ``--input`` are conversations, rendered by the processor's ``apply_chat_template`` (THE chat
template module, megatron_solo/format/chat_template.py, that the shard builder renders through) with
``--template``: ``auto`` (default) is the template the checkpoint records (``solo_chat_template`` in an HF
config.json, ``chat_template`` in solo_config.json: set for instruction-tuned checkpoints), else ``plain`` (the
pre-training layout: roles not rendered). Batches are left-padded. The JSONL shapes are in
megatron_solo/eval/records.py and docs/evaluation.md; chat commands: ``/image PATH`` (attach an image to the next
message; ``<image>`` in the message places it, else images go first), ``/system TEXT``, ``/reset``, ``/exit``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "solo"


def recorded_template(checkpoint: str | Path) -> str | None:
    """The chat template a checkpoint says it was trained with: ``solo_chat_template`` in an exported config.json,
    ``chat_template`` in a SOLO checkpoint's solo_config.json; None when it records none (pre-training)."""
    from megatron_solo.convert.export_hf import HF_TEMPLATE_KEY, recorded_chat_template

    path = Path(checkpoint)
    if is_hf_dir(path):
        return json.loads((path / "config.json").read_text()).get(HF_TEMPLATE_KEY)
    return recorded_chat_template(path)


def load(checkpoint: str | Path, device: str = "cpu", dtype: str = "auto"):
    """(model, processor) from an exported HF dir or a SOLO checkpoint dir; ``processor.default_template`` is the
    template the checkpoint records (else ``plain``)."""
    path = Path(checkpoint)
    torch_dtype = None if dtype == "auto" else DTYPES[dtype]
    if is_hf_dir(path):
        from transformers import AutoModelForCausalLM, AutoProcessor

        kwargs = {} if torch_dtype is None else {"dtype": torch_dtype}
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True, **kwargs)
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=True)
    else:
        from megatron_solo.convert.export_hf import generation_config, hf_model_from_checkpoint
        from megatron_solo.convert.hf_remote.processing_solo import SoloProcessor

        model, tok_path = hf_model_from_checkpoint(path, device, torch_dtype)
        processor = SoloProcessor(str(tok_path), model.config.vision_token_ids, recorded_template(path))
        model.generation_config = generation_config(processor.tokenizer)
    return model.to(device).eval(), processor


@dataclass
class Sampling:
    """Decoding settings shared by every entry point (greedy unless a temperature is given)."""

    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def kwargs(self) -> dict:
        if self.greedy:
            return {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_new_tokens": self.max_new_tokens,
        }


@dataclass
class Generation:
    """What one ``model.generate`` call produced: per row the new ids (up to and including EOS) and their text."""

    texts: list[str]
    ids: list[list[int]]
    seconds: float
    prompt_tokens: int = 0

    @property
    def new_tokens(self) -> int:
        return sum(len(i) for i in self.ids)


@dataclass
class Throughput:
    """Running totals over several generations, for the tokens/s line."""

    new_tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    rows: int = 0

    def add(self, g: Generation) -> None:
        self.new_tokens += g.new_tokens
        self.seconds += g.seconds
        self.calls += 1
        self.rows += len(g.ids)

    def line(self) -> str:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        return (
            f"generated {self.new_tokens} tokens for {self.rows} prompt(s) in {self.seconds:.2f} s of decoding "
            f"({self.calls} batch(es)): {rate:.1f} tokens/s"
        )


def decode(model, processor, inputs: dict, sampling: Sampling) -> Generation:
    """``model.generate`` on a processor batch (left-padded); each row cut after its first EOS."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask", "patches")}
    width = inputs["input_ids"].shape[1]
    torch.manual_seed(sampling.seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, **sampling.kwargs())
    seconds = time.perf_counter() - start
    eos = processor.tokenizer.eos_id
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    texts = [processor.decode(r) for r in rows]
    return Generation(texts, rows, seconds, int(inputs["attention_mask"].sum()))


def generate(
    model,
    processor,
    prompt: str,
    images=(),
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> tuple[str, list[int]]:
    """(text, new token ids) for one plain prompt (the captioning interface)."""
    sampling = Sampling(max_new_tokens, greedy, temperature, top_p, seed)
    g = decode(model, processor, processor(text=prompt, images=list(images)), sampling)
    return g.texts[0], g.ids[0]


def chat(
    model,
    processor,
    conversations: Sequence,
    template: str | None = None,
    sampling: Sampling | None = None,
    images: Sequence | None = None,
) -> Generation:
    """The next assistant turn of each conversation (HF messages, LLaVA turns or ``Turn`` lists, each ending with a
    user turn), in one left-padded batch -> Generation. ``images``: per conversation, the images its
    ``{"type": "image"}`` parts / ``<image>`` placeholders take. ``template`` None: the processor's default."""
    inputs = processor.apply_chat_template(
        list(conversations),
        images=None if images is None else [list(i) for i in images],
        template=template,
        add_generation_prompt=True,
    )
    return decode(model, processor, inputs, sampling or Sampling())


def generate_jsonl(
    model,
    processor,
    input_path,
    output_path,
    template=None,
    sampling=None,
    batch_size=8,
    image_root=None,
    progress: bool = True,
) -> Throughput:
    """``--input`` -> ``--output``: one ``{"id", "answer", "num_tokens"[, "reference"]}`` line per record, in input
    order. Every record is checked before the first batch runs (a bad line fails at once, naming file:line)."""
    from tqdm import tqdm

    from megatron_solo.eval.records import read_conversations

    records = read_conversations(input_path, image_root)
    stats = Throughput()
    out_path = Path(output_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f, tqdm(total=len(records), disable=not progress, unit="conv") as bar:
            for start in range(0, len(records), batch_size):
                batch = records[start : start + batch_size]
                try:
                    g = chat(model, processor, [r.turns for r in batch], template, sampling)
                except ValueError as e:  # an image that does not decode, a template error: name the records
                    raise ValueError(f"{batch[0].where} .. {batch[-1].where}: {e}") from e
                stats.add(g)
                for r, text, ids in zip(batch, g.texts, g.ids):
                    row = {"id": r.id, "answer": text, "num_tokens": len(ids)}
                    if r.reference is not None:
                        row["reference"] = r.reference
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
                bar.update(len(batch))
        tmp.replace(out_path)  # never a half-written answers file under the final name
    finally:
        tmp.unlink(missing_ok=True)
    return stats


CHAT_HELP = "commands: /image PATH (attach to the next message), /system TEXT, /reset, /exit"


def chat_loop(
    model,
    processor,
    template=None,
    sampling=None,
    read: Callable[[], str] = input,
    write: Callable[[str], None] = print,
    status: Callable[[str], None] | None = None,
    images: Sequence[str] = (),
) -> list:
    """Interactive chat: each message is a user turn; the history (turns and answers) is kept and re-rendered
    whole every turn; ``images`` attach to the first message. Returns the final conversation (``Turn`` list)."""
    from megatron_solo.format.chat_template import TemplateError, Turn
    from megatron_solo.format.messages import to_turns

    status = status or (lambda s: print(s, file=sys.stderr))
    history: list = []
    system: list = []
    images = list(images)
    while True:
        try:
            line = read().strip()
        except EOFError:
            break
        if not line:
            continue
        cmd, _, arg = line.partition(" ")
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            history, images = [], []
            status("[history cleared]")
        elif cmd == "/system":
            system = [Turn.of("system", arg)] if arg else []
        elif cmd == "/image":
            if not Path(arg).is_file():
                status(f"error: {arg!r}: no such image file")
                continue
            images.append(arg)
        elif cmd == "/help" or (cmd.startswith("/") and cmd != "/"):
            status(CHAT_HELP)
        else:
            try:
                user = to_turns([{"role": "user", "content": line}], images)
                turns = [*system, *history, *user]
                g = chat(model, processor, [turns], template, sampling)
            except (TemplateError, ValueError, FileNotFoundError) as e:
                status(f"error: {e}")
                continue
            images = []
            write(g.texts[0])
            status(f"[{g.new_tokens} tokens, {g.new_tokens / max(g.seconds, 1e-9):.1f} tokens/s]")
            history = [*history, *user, Turn.of("assistant", g.texts[0])]
    return [*system, *history]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_solo.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="SOLO checkpoint dir (or iter_* dir) or exported HF dir")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", default="", help="text after the image(s); '<image>' marks where images go")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin (" + CHAT_HELP + ")")
    p.add_argument("--input", help="JSONL of conversations (docs/evaluation.md) to answer in batches")
    p.add_argument("--output", help="JSONL of answers (with --input)")
    p.add_argument("--image-root", help="folder for relative image paths in --input (default: the file's folder)")
    p.add_argument("--batch-size", type=int, default=8, help="conversations per generate() call (--input)")
    p.add_argument(
        "--template",
        default="auto",
        choices=["auto", "plain", "mistral"],
        help="chat template for --chat / --input; auto: the checkpoint's recorded one, else plain",
    )
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (stops earlier at EOS)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--temperature", type=float, default=None, help="sample with this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda, cuda:1 (default: cuda if any)",
    )
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: the checkpoint's dtype")
    p.add_argument("--json", action="store_true", help="print {text, ids} as JSON (--prompt mode)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.top_p != 1.0 and args.temperature is None:
        p.error("--top-p needs --temperature (sampling)")
    if bool(args.input) != bool(args.output):
        p.error("--input and --output go together")
    if args.chat and args.input:
        p.error("--chat and --input are different modes: choose one")
    if args.input and (args.image or args.prompt):
        p.error("--image / --prompt are for one prompt (or --chat); --input records carry their own")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    sampling = Sampling(args.max_new_tokens, args.temperature is None, args.temperature or 1.0, args.top_p, args.seed)
    template = None if args.template == "auto" else args.template
    try:
        model, processor = load(args.checkpoint, args.device, args.dtype)
        if args.input:
            stats = generate_jsonl(
                model, processor, args.input, args.output, template, sampling, args.batch_size, args.image_root
            )
            print(f"wrote {args.output}; {stats.line()}", file=sys.stderr)
            return 0
        if args.chat:
            interactive = sys.stdin.isatty()
            read = lambda: input("user> " if interactive else "")
            chat_loop(model, processor, template, sampling, read=read, images=args.image)
            return 0
        g = decode(model, processor, processor(text=args.prompt, images=list(args.image)), sampling)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"text": g.texts[0], "ids": g.ids[0]}) if args.json else g.texts[0])
    print(_rate(g), file=sys.stderr)
    return 0


def _rate(g: Generation) -> str:
    return f"[{g.new_tokens} tokens in {g.seconds:.2f} s: {g.new_tokens / max(g.seconds, 1e-9):.1f} tokens/s]"


if __name__ == "__main__":
    sys.exit(main())
