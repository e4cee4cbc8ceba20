"""Trainer data loading (``megatron_solo.data.batch.BatchLoader``) on 32K-token packs with ~50% vision tokens.

Two measurements, each against a baseline in the same run (see benchmarks/README.md):

1. **Throughput**: packs/s and tokens/s of one reader (read + collate + to-tensor, ``BatchLoader`` with the
   trainer's blend) against the 2,500 tokens/s per GPU that SOLO's training consumed (SOLO_SPEC.md: 20K tokens/s
   on 8 A100s): the ratio is how many GPUs one reader process could feed.
2. **Data wait per step** with and without the overlap (``prefetch=True`` / ``False``): a step is ``--micro-batches``
   micro-batches of one pack; the compute is emulated by sleeping ``--compute-ratio`` x the measured read time of
   a step (the GPU computes while the host is idle, which a sleep models; a CPU matmul would model contention
   instead). Reported: the median time ``BatchLoader.step`` keeps the trainer waiting, steady state (after the
   first step of a round, which has nothing prefetched), rounds of the two alternating.

The shard set is built by the real builder (``megatron_solo.preprocess.build``, seq 32768) from synthetic pictures
(coloured shapes and gradients, 1024 px: 1,057 image tokens each) and text documents cut from the bundled corpus,
mixed to ~50% vision tokens. Reads hit the page cache (the set was just written).

    PYTHONPATH=. python benchmarks/bench_loader.py [--packs 24] [--steps 8] [--micro-batches 4] [--compute-ratio 2]
        [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SOLO_TOKENS_PER_S_PER_GPU = 2500.0
SEQ = 32768
IMAGE_TOKENS = 32 * 32 + 31 + 2  # a 1024 x 1024 picture: 32 x 32 patches, 31 row separators, <vision> </vision>


def _picture(rng: random.Random, side: int = 1024) -> Image.Image:
    """A synthetic photo-sized picture: a colour gradient with a few shapes (compresses like a real JPEG)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    c = [rng.random() for _ in range(6)]
    rgb = np.stack([(c[0] * x + c[1] * y), (c[2] * (1 - x) + c[3] * y), (c[4] * x * y + c[5] * 0.5)], axis=-1)
    im = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.randrange(side), rng.randrange(side)
        r = rng.randrange(40, 300)
        fill = tuple(rng.randrange(256) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0 - r, y0 - r, x0 + r, y0 + r), fill=fill)
    return im


def build_shards(out: Path, n_packs: int, workers: int) -> tuple[str, dict]:
    """A seq-32768 shard set of ~``n_packs`` packs, about half of the tokens vision; returns (path, counts)."""
    from megatron_solo.format.tokens import SoloTokenizer, train_sentencepiece
    from megatron_solo.preprocess.build import BuildConfig, build
    from megatron_solo.preprocess.demo import CORPUS

    rng = random.Random(0)
    raw = out / "raw"
    (raw / "pics").mkdir(parents=True, exist_ok=True)
    tok_path = out / "tokenizer.model"
    train_sentencepiece([CORPUS], tok_path, 1000, extend=True)
    tok = SoloTokenizer(tok_path)
    lines = [ln.strip() for ln in CORPUS.read_text(encoding="utf-8").splitlines() if ln.strip()]
    n_images = n_packs * SEQ // (2 * IMAGE_TOKENS)
    records = []
    for i in range(n_images):
        name = f"pics/{i:05d}.jpg"
        _picture(rng).save(raw / name, quality=90)
        caption = " ".join(rng.sample(lines, 2))
        content = [{"type": "image_url", "image_url": {"url": name}}, {"type": "text", "text": caption}]
        records.append({"messages": [{"role": "user", "content": content}]})
    (raw / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text_tokens = n_packs * SEQ // 2 - n_images * len(tok.encode(caption))
    texts, total = [], 0
    while total < text_tokens:  # documents of ~1-4K tokens
        doc = " ".join(rng.choice(lines) for _ in range(rng.randrange(40, 160)))
        texts.append(doc)
        total += len(tok.encode(doc))
    (raw / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = BuildConfig(
        sources=[f"chat:{raw / 'captions.jsonl'}", f"text:{raw / 'text.jsonl'}"],
        tokenizer=str(tok_path),
        out=str(out / "shards"),
        seq_length=SEQ,
        workers=workers,
        shard_size_packs=64,
        quiet=True,
    )
    return str(out / "shards"), build(cfg)["counts"]


def throughput(loader, steps: int) -> dict:
    """Read + collate + to-tensor of ``steps`` steps, synchronously: packs/s, tokens/s."""
    from megatron_solo.data.batch import to_solo_batch

    t0 = time.perf_counter()
    packs = tokens = 0
    for k in range(steps):
        for wire in loader.collate_step(k * loader.gbs):
            batch = to_solo_batch(wire)
            packs += batch.shape[0]
            tokens += batch.num_tokens
    dt = time.perf_counter() - t0
    return {"packs_per_s": packs / dt, "tokens_per_s": tokens / dt, "step_read_s": dt / steps}


def data_wait(loader, steps: int, compute_s: float) -> list[float]:
    """``loader.step`` wait per step while a step's compute (a sleep) runs between the calls."""
    waits = []
    for k in range(steps):
        loader.step(k * loader.gbs)
        waits.append(loader.last_wait_s)
        time.sleep(compute_s)
    return waits


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--packs", type=int, default=24, help="packs of 32768 tokens to build")
    p.add_argument("--steps", type=int, default=8, help="steps per measurement round")
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches (one pack each) per step")
    p.add_argument("--compute-ratio", type=float, default=2.0, help="emulated compute per step / read time")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of without / with overlap")
    p.add_argument("--workers", type=int, default=2, help="builder workers")
    args = p.parse_args(argv)

    from megatron_solo import parallel
    from megatron_solo.data.batch import BatchLoader
    from megatron_solo.data.blend import build_blend

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        t0 = time.perf_counter()
        path, counts = build_shards(Path(tmp), args.packs, args.workers)
        built = time.perf_counter() - t0
        vision = counts["tokens_vision"] / max(counts["tokens_total"], 1)
        print(f"built {counts['packs']} packs of {SEQ} tokens in {built:.0f} s: {vision:.1%} vision tokens, "
              f"{counts['patches']:,} patches", flush=True)  # fmt: skip
        parallel.initialize(tensor_model_parallel_size=1)
        blend = build_blend([path], seed=1)
        gbs = args.micro_batches
        sync = BatchLoader(blend, gbs, 1, prefetch=False)
        throughput(sync, 1)  # warm-up (permutations, page cache)
        tp = throughput(sync, args.steps)
        compute = args.compute_ratio * tp["step_read_s"]
        without, with_overlap = [], []
        for _ in range(args.repeats):  # alternate the two, so a shared machine's load hits both alike
            without += data_wait(sync, args.steps, compute)[1:]
            ahead = BatchLoader(blend, gbs, 1, prefetch=True)
            with_overlap += data_wait(ahead, args.steps, compute)[1:]
            ahead.close()
        parallel.destroy()
    res = {
        "packs_built": counts["packs"],
        "vision_token_fraction": round(vision, 4),
        **{k: round(v, 4) for k, v in tp.items()},
        "gpus_fed_per_reader": round(tp["tokens_per_s"] / SOLO_TOKENS_PER_S_PER_GPU, 1),
        "compute_s_per_step": round(compute, 4),
        "wait_s_without_overlap": round(statistics.median(without), 4),
        "wait_s_with_overlap": round(statistics.median(with_overlap), 4),
    }
    res["wait_ratio"] = round(res["wait_s_with_overlap"] / max(res["wait_s_without_overlap"], 1e-9), 4)
    print(
        f"reader: {tp['packs_per_s']:.1f} packs/s, {tp['tokens_per_s']:,.0f} tokens/s = "
        f"{res['gpus_fed_per_reader']}x SOLO's {SOLO_TOKENS_PER_S_PER_GPU:,.0f} tokens/s/GPU\n"
        f"data wait per step ({gbs} x {SEQ} tokens, compute {compute:.3f} s): "
        f"{res['wait_s_without_overlap'] * 1e3:.1f} ms without overlap, {res['wait_s_with_overlap'] * 1e3:.1f} ms "
        f"with (x{res['wait_ratio']:.3f})"
    )
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
