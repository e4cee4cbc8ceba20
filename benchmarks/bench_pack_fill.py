"""Pack fill: our bounded best-fit-decreasing packer vs the released greedy streaming packer, same docs, same run.

A SOLO-like length mix (token counts as the ShardBuilder lays documents out: [BOS] + text + image layout + [EOS]):
  - captions: one image (long side 12..32 patches, aspect 0.6..1) + a short caption, ~100..1100 tokens;
  - ImageNet-like: one image (long side 17..32 patches, aspect 0.75..1) + a class name, ~300..1060 tokens;
  - text: log-normal around 2K tokens with a long tail past 32K (split into seq-length pieces by both packers);
  - (--mix interleaved+sft) interleaved web documents: 1 + Poisson(1.5) images of any size + ~600 text tokens;
    multi-turn conversations: a COCO-sized image in 90%, 1..10 question/answer turns in the mistral template.
Fill = real tokens / (packs * seq_length). Our packer runs through `_C.plan_packs`, the lengths-only entry into the
very BestFitPlanner that `_C.ShardBuilder` uses. Greedy = documents appended in arrival order, a new pack whenever
the next one does not fit (the released approach, minus its silent truncation of over-long packs).

    PYTHONPATH=. python benchmarks/bench_pack_fill.py [--docs 150000] [--seq-length 32768]
        [--buffer-docs 1024 4096 16384] [--mix solo|imagenet+text|text-only|interleaved+sft] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from megatron_solo import _C


def image_tokens(n_h: np.ndarray, n_w: np.ndarray) -> np.ndarray:
    return n_h * n_w + n_h - 1 + 2  # same rule as _C.image_token_count (checked below on a sample)


MIXES = {  # fraction of documents per kind (the rest is text)
    "solo": {"captions": 0.65, "imagenet": 0.20},
    "imagenet+text": {"imagenet": 0.85},
    "text-only": {},
    # SOLO stage 2-3 style: captions, interleaved web documents (OBELICS / MMC4) and multi-turn instruction
    # conversations (LLaVA-665K style, mistral template) beside text
    "interleaved+sft": {"captions": 0.30, "imagenet": 0.05, "interleaved": 0.15, "conversations": 0.35},
}


def solo_like_lengths(n_docs: int, seed: int, mix: str = "solo") -> tuple[np.ndarray, dict[str, int]]:
    rng = np.random.default_rng(seed)
    fracs = MIXES[mix]
    n = {k: int(n_docs * fracs.get(k, 0.0)) for k in ("captions", "imagenet", "interleaved", "conversations")}
    n["text"] = n_docs - sum(n.values())

    def images(k, long_lo, aspect_lo):
        n_long = rng.integers(long_lo, 33, k)
        n_short = np.maximum(1, np.ceil(n_long * rng.uniform(aspect_lo, 1.0, k)).astype(np.int64))
        return image_tokens(n_short, n_long)

    def one_image_docs(k, long_lo, aspect_lo, text_tokens):
        return 2 + text_tokens + images(k, long_lo, aspect_lo)

    caption_text = np.clip(rng.lognormal(np.log(20), 0.6, n["captions"]), 3, 40).astype(np.int64)
    captions = one_image_docs(n["captions"], 12, 0.6, caption_text)
    imagenet = one_image_docs(n["imagenet"], 17, 0.75, rng.integers(2, 9, n["imagenet"]))
    # OBELICS-like: 1 + Poisson(1.5) images of any size (long side 4..32 patches), ~600 text tokens (log-normal)
    n_img = 1 + rng.poisson(1.5, n["interleaved"])
    per_doc = np.split(images(int(n_img.sum()), 4, 0.5), np.cumsum(n_img)[:-1])
    inter_text = np.maximum(20, rng.lognormal(np.log(600), 0.8, n["interleaved"]).astype(np.int64))
    interleaved = 2 + inter_text + np.array([int(x.sum()) for x in per_doc], dtype=np.int64)
    # LLaVA-665K-like: a COCO-sized image (20x15 patches: 316 tokens) in 90%, 1-10 turns of ~25-token questions and
    # ~60-token answers (log-normal) + the mistral template's ~10 tokens per turn
    n_turns = rng.integers(1, 11, n["conversations"])
    turn_tokens = np.array([int((rng.lognormal(np.log(25), 0.5, t) + rng.lognormal(np.log(60), 0.9, t)).sum()) + 10 * t
                            for t in n_turns], dtype=np.int64)  # fmt: skip
    has_image = rng.random(n["conversations"]) < 0.9
    conversations = 2 + turn_tokens + np.where(has_image, image_tokens(np.int64(15), np.int64(20)), 0)
    text = np.maximum(8, rng.lognormal(np.log(2000), 1.1, n["text"]).astype(np.int64))
    parts = [captions, imagenet, interleaved, conversations, text]
    lengths = np.concatenate(parts)
    order = rng.permutation(n_docs)  # a shuffled stream, as a preprocessing job sees interleaved sources
    lengths = lengths[order]
    info = dict(n) | {"text_over_seq": 0}
    for name, arr in zip(("captions", "imagenet", "interleaved", "conversations"), parts):
        if len(arr):
            info[f"{name}_range"] = (int(arr.min()), int(np.median(arr)), int(arr.max()))
    if len(text):
        info |= {"text_median": int(np.median(text)), "text_max": int(text.max())}
    return lengths, info


def greedy_streaming(lengths: np.ndarray, seq_length: int) -> tuple[int, int]:
    """(packs, real tokens) of the released greedy streaming packer (over-long docs cut into seq_length pieces)."""
    packs, used, real = 0, seq_length, 0
    for n in lengths.tolist():
        while n > 0:
            piece = min(n, seq_length)
            if used + piece > seq_length:
                packs, used = packs + 1, 0
            used += piece
            real += piece
            n -= piece
    return packs, real


def sharded_fill(lengths: np.ndarray, seq_length: int, shard_size_packs: int, buffer_docs: int = 4096) -> float:
    """Fill over shard groups as ``build`` cuts the stream (a group closes once its documents hold
    shard_size_packs * seq_length tokens), each group planned alone (its last packs part-filled)."""
    target, packs, start, acc = shard_size_packs * seq_length, 0, 0, 0
    for i, n in enumerate(lengths.tolist()):
        acc += n
        if acc >= target or i == len(lengths) - 1:
            plan = _C.plan_packs(lengths[start : i + 1], seq_length, buffer_docs=buffer_docs)
            packs += len(plan["pack_offsets"]) - 1
            start, acc = i + 1, 0
    return float(lengths.sum()) / (packs * seq_length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=150_000)
    ap.add_argument("--seq-length", type=int, default=32768)
    ap.add_argument("--buffer-docs", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", choices=sorted(MIXES), default="solo")
    ap.add_argument(
        "--shard-size-packs",
        type=int,
        nargs="*",
        default=[128],
        help="also the fill of a build's shard groups (cut as build.py cuts them, each planned alone: buffer 4096)",
    )
    args = ap.parse_args()
    S = args.seq_length

    for n_h, n_w in ((1, 1), (7, 32), (32, 32)):
        assert image_tokens(np.int64(n_h), np.int64(n_w)) == _C.image_token_count(n_h, n_w)
    lengths, info = solo_like_lengths(args.docs, args.seed, args.mix)
    info["text_over_seq"] = int((lengths > S).sum())
    print(f"mix {args.mix}: docs: {len(lengths)} ({info}), tokens: {int(lengths.sum()):,}, seq_length {S}")

    t0 = time.perf_counter()
    g_packs, g_real = greedy_streaming(lengths, S)
    t_greedy = time.perf_counter() - t0
    g_fill = g_real / (g_packs * S)
    print(f"greedy streaming (released): packs {g_packs:,}  fill {g_fill:.4f}  ({t_greedy:.2f} s, Python)")

    results = {}
    for buf in args.buffer_docs:
        t0 = time.perf_counter()
        plan = _C.plan_packs(lengths, S, buffer_docs=buf)
        dt = time.perf_counter() - t0
        off, plen = plan["pack_offsets"], plan["piece_length"]
        fills = np.add.reduceat(plen, off[:-1])
        assert fills.max() <= S, "over-long pack"
        assert int(plen.sum()) == int(lengths.sum()) == g_real, "tokens lost"
        packs = len(off) - 1
        fill = float(fills.sum()) / (packs * S)
        results[buf] = fill
        print(
            f"best-fit-decreasing, buffer_docs={buf:>6}: packs {packs:,}  fill {fill:.4f}  "
            f"(packs saved vs greedy {1 - packs / g_packs:.1%}; {dt:.2f} s, {len(lengths) / dt / 1e6:.2f} M docs/s)"
        )
    for k in args.shard_size_packs:
        fill = sharded_fill(lengths, S, k)
        print(f"shard groups of {k} packs (build --shard-size-packs {k}), buffer 4096: fill {fill:.4f}")
    default = results.get(4096, next(iter(results.values())))
    target = 0.995 if args.mix == "interleaved+sft" else 0.99
    print(
        f"RESULT mix {args.mix}: fill(ours, buffer 4096) = {default:.4f}  vs greedy {g_fill:.4f}  (target >= {target})"
    )


if __name__ == "__main__":
    main()
