"""Pack fill: our bounded best-fit-decreasing packer vs the released greedy streaming packer, same docs, same run.

A SOLO-like length mix (token counts as the ShardBuilder lays documents out: [BOS] + text + image layout + [EOS]):
  - captions: one image (long side 12..32 patches, aspect 0.6..1) + a short caption, ~100..1100 tokens;
  - ImageNet-like: one image (long side 17..32 patches, aspect 0.75..1) + a class name, ~300..1060 tokens;
  - text: log-normal around 2K tokens with a long tail past 32K (split into seq-length pieces by both packers).
Fill = real tokens / (packs * seq_length). Our packer runs through `_C.plan_packs`, the lengths-only entry into the
very BestFitPlanner that `_C.ShardBuilder` uses. Greedy = documents appended in arrival order, a new pack whenever
the next one does not fit (the released approach, minus its silent truncation of over-long packs).

    PYTHONPATH=. python benchmarks/bench_pack_fill.py [--docs 150000] [--seq-length 32768]
        [--buffer-docs 1024 4096 16384] [--mix solo|imagenet+text|text-only] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from megatron_solo import _C


def image_tokens(n_h: np.ndarray, n_w: np.ndarray) -> np.ndarray:
    return n_h * n_w + n_h - 1 + 2  # same rule as _C.image_token_count (checked below on a sample)


MIXES = {  # fraction of documents: captions, ImageNet-like, text
    "solo": (0.65, 0.20),
    "imagenet+text": (0.0, 0.85),
    "text-only": (0.0, 0.0),
}


def solo_like_lengths(n_docs: int, seed: int, mix: str = "solo") -> tuple[np.ndarray, dict[str, int]]:
    rng = np.random.default_rng(seed)
    f_cap, f_inet = MIXES[mix]
    n_cap, n_inet = int(n_docs * f_cap), int(n_docs * f_inet)
    n_text = n_docs - n_cap - n_inet

    def one_image_docs(n, long_lo, aspect_lo, text_tokens):
        n_long = rng.integers(long_lo, 33, n)
        n_short = np.maximum(1, np.ceil(n_long * rng.uniform(aspect_lo, 1.0, n)).astype(np.int64))
        return 2 + text_tokens + image_tokens(n_short, n_long)

    captions = one_image_docs(n_cap, 12, 0.6, np.clip(rng.lognormal(np.log(20), 0.6, n_cap), 3, 40).astype(np.int64))
    imagenet = one_image_docs(n_inet, 17, 0.75, rng.integers(2, 9, n_inet))
    text = np.maximum(8, rng.lognormal(np.log(2000), 1.1, n_text).astype(np.int64))
    kinds = np.concatenate([np.zeros(n_cap, np.int8), np.ones(n_inet, np.int8), np.full(n_text, 2, np.int8)])
    lengths = np.concatenate([captions, imagenet, text])
    order = rng.permutation(n_docs)  # a shuffled stream, as a preprocessing job sees interleaved sources
    lengths, kinds = lengths[order], kinds[order]
    info = {
        "captions": n_cap,
        "imagenet": n_inet,
        "text": n_text,
        "text_over_seq": 0,
        "caption_range": (int(captions.min()), int(captions.max())) if n_cap else None,
        "imagenet_range": (int(imagenet.min()), int(imagenet.max())) if n_inet else None,
        "text_median": int(np.median(text)),
        "text_max": int(text.max()),
    }
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=150_000)
    ap.add_argument("--seq-length", type=int, default=32768)
    ap.add_argument("--buffer-docs", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mix", choices=sorted(MIXES), default="solo")
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
    default = results.get(4096, next(iter(results.values())))
    print(f"RESULT fill(ours, buffer 4096) = {default:.4f}  vs greedy {g_fill:.4f}  (target >= 0.99)")


if __name__ == "__main__":
    main()
