"""Caption / prompt a SOLO model from a SOLO checkpoint dir or an exported HF dir, on CPU or GPU.

    python -m megatron_solo.generate --checkpoint DIR --image x.jpg --prompt "Describe the image." \\
        [--greedy | --temperature 0.7 --top-p 0.9 --seed 0] [--max-new-tokens 64] [--device cuda] [--dtype bf16]

One decoding path for both formats: HF ``generate()`` (KV cache) on the SOLO-HF model class that the export ships
(megatron_solo/convert/hf_remote). An exported HF dir is loaded as users load it (``trust_remote_code=True``); a
SOLO checkpoint (saved at any TP/DP) is converted in memory, one layer at a time, with the exporter's reader, so
the two give the same tokens for the same weights. Prompts are built by the shipped processor (the training token
layout); ``<image>`` in the prompt places the image(s), otherwise images come first. The vision special tokens are
never generated (suppressed in the generation config). Prints the generated text (``--json`` for ids too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    return config.exists() and json.loads(config.read_text()).get("model_type") == "solo"


def load(checkpoint: str | Path, device: str = "cpu", dtype: str = "auto"):
    """(model, processor) from an exported HF dir or a SOLO checkpoint dir."""
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
        processor = SoloProcessor(str(tok_path), model.config.vision_token_ids)
        model.generation_config = generation_config(processor.tokenizer)
    return model.to(device).eval(), processor


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
    """(text, new token ids) for one prompt."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in processor(text=prompt, images=list(images)).items()}
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_p": top_p}
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **sampling)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return processor.decode(new), new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_solo.generate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="SOLO checkpoint dir (or iter_* dir) or exported HF dir")
    p.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--prompt", default="", help="text after the image(s); '<image>' marks where images go")
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
    p.add_argument("--json", action="store_true", help="print {text, ids} as JSON")
    args = p.parse_args(argv)
    if args.top_p != 1.0 and args.temperature is None:
        p.error("--top-p needs --temperature (sampling)")
    try:
        model, processor = load(args.checkpoint, args.device, args.dtype)
        text, ids = generate(
            model, processor, args.prompt, args.image, args.max_new_tokens, greedy=args.temperature is None,
            temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"text": text, "ids": ids}) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
