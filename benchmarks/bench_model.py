"""SoloModel forward+backward time on a packed batch (~50% vision tokens) relative to plain GPTModel, same run, CPU.

    python benchmarks/bench_model.py [--hidden 256 --layers 4 --seq 1024 --batch 1 --reps 9 --threads 1]

Three models of the same shape and the same weights-shape, timed interleaved (median of ``--reps``):
* ``solo``       : SoloModel, packed documents (THD, per-document attention), patches projected and merged,
* ``gpt_plain``  : megatron.core GPTModel with its stock local spec, the same number of tokens as one causal
                   sequence (the baseline the issue asks for),
* ``gpt_packed`` : the same GPTModel fed the same packed params through SoloModel's decoder spec (isolates the
                   cost of the projector + embedding merge from the attention pattern).
Ratios ``solo / gpt_plain`` (target <= 1.05) and ``solo / gpt_packed`` are printed.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_solo import parallel  # noqa: E402
from megatron_solo.format.schema import PATCH_DIM  # noqa: E402
from megatron_solo.model.config import (  # noqa: E402
    ROW_SEP_ID,
    VISION_END_ID,
    VISION_ID,
    VPATCH_ID,
    tiny,
)

BOS, EOS, PAD = 1, 2, 0


def packed_batch(b: int, s: int, vision_fraction: float, seed: int = 0) -> dict:
    """Pack random documents (images 4..12 x 4..12 patches + caption, or text 30..200 tokens) into b x s, choosing
    an image whenever vision tokens are below ``vision_fraction``; each row ends with a text document that fills it."""
    rnd = random.Random(seed)
    tokens, cu, vision_doc = [], [0], []
    n_patches = n_vision_tokens = 0
    for _row in range(b):
        row: list[int] = []
        misses = 0
        while True:
            want_image = n_vision_tokens < vision_fraction * (len(tokens) + len(row) + 1)
            if want_image:
                n_h, n_w = rnd.randint(4, 12), rnd.randint(4, 12)
                layout = [VISION_ID]
                for i in range(n_h):
                    layout += ([ROW_SEP_ID] if i else []) + [VPATCH_ID] * n_w
                layout.append(VISION_END_ID)
                doc = [BOS] + layout + [rnd.randint(3, 31999) for _ in range(rnd.randint(8, 24))] + [EOS]
            else:
                doc = [BOS] + [rnd.randint(3, 31999) for _ in range(rnd.randint(30, 200))] + [EOS]
            if len(row) + len(doc) > s and misses < 50:  # try another (smaller) document of the wanted kind
                misses += 1
                continue
            if len(row) + len(doc) > s:  # close the row with a text document of exactly the remaining length
                rest = s - len(row)
                if rest >= 2:
                    row += [BOS] + [rnd.randint(3, 31999) for _ in range(rest - 2)] + [EOS]
                    cu.append(len(tokens) + len(row))
                    vision_doc += [False] * rest
                break
            row += doc
            cu.append(len(tokens) + len(row))
            vision_doc += [want_image] * len(doc)
            if want_image:
                n_patches += n_h * n_w
                n_vision_tokens += len(layout)
        pad = s - len(row)
        if pad:
            row += [PAD] * pad
            vision_doc += [False] * pad
            cu.append(len(tokens) + s)
        tokens += row
    t = torch.tensor(tokens).reshape(b, s)
    flat = t.reshape(-1)
    labels = torch.cat([flat[1:], flat.new_zeros(1)])
    cu_t = torch.tensor(cu, dtype=torch.int32)
    lengths = (cu_t[1:] - cu_t[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    same = torch.cat([doc[1:] == doc[:-1], torch.tensor([False])])
    loss_mask = (same & (labels >= 2) & (labels < VISION_ID) & (flat != PAD)).float()
    return dict(
        tokens=t,
        labels=labels.reshape(b, s),
        loss_mask=loss_mask.reshape(b, s),
        position_ids=(torch.arange(b * s) - torch.repeat_interleave(cu_t[:-1].long(), lengths)).reshape(b, s),
        patches=torch.randint(0, 256, (n_patches, PATCH_DIM), dtype=torch.uint8),
        cu_seqlens=cu_t,
        max_seqlen=int(lengths.max()),
        vision_doc_mask=torch.tensor(vision_doc).reshape(b, s),
        vision_token_fraction=n_vision_tokens / (b * s),
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--vision-fraction", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    parallel.initialize(tensor_model_parallel_size=1)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_solo.model import SoloModel, build_packed_seq_params, solo_losses, training_loss
    from megatron_solo.model.specs import decoder_block_spec

    cfg = tiny(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        num_query_groups=max(1, args.heads // 2),
        ffn_hidden_size=args.hidden * 3,
        seq_length=args.seq,
        max_position_embeddings=args.seq * args.batch,
        vocab_size=32005,
    )
    torch.manual_seed(0)
    solo = SoloModel(cfg)
    gpt_kwargs = dict(
        config=cfg,
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
    )
    gpt_plain = GPTModel(transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"), **gpt_kwargs)
    gpt_packed = GPTModel(transformer_layer_spec=decoder_block_spec(cfg), **gpt_kwargs)

    batch = packed_batch(args.batch, args.seq, args.vision_fraction)
    psp = build_packed_seq_params(batch["cu_seqlens"], batch["max_seqlen"])
    n = args.batch * args.seq
    flat = {k: batch[k].reshape(1, n) for k in ("tokens", "position_ids", "labels")}

    def step_solo():
        loss = solo(batch["tokens"], batch["position_ids"], batch["patches"], batch["labels"], packed_seq_params=psp)
        training_loss(solo_losses(loss, batch["loss_mask"], batch["vision_doc_mask"])).backward()

    def step_gpt(model, packed):
        loss = model(
            flat["tokens"], flat["position_ids"], None, labels=flat["labels"], packed_seq_params=psp if packed else None
        )
        lm = batch["loss_mask"].reshape(1, n)
        ((loss * lm).sum() / lm.sum()).backward()

    steps = {
        "solo": (solo, step_solo),
        "gpt_plain": (gpt_plain, lambda: step_gpt(gpt_plain, False)),
        "gpt_packed": (gpt_packed, lambda: step_gpt(gpt_packed, True)),
    }
    times: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(args.reps + 1):  # rep 0 = warm-up
        for name, (model, fn) in steps.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"shape: hidden={args.hidden} layers={args.layers} heads={args.heads} tokens={n} (b={args.batch} s={args.seq}) "
        f"vocab={cfg.padded_vocab_size}; vision tokens {batch['vision_token_fraction']:.0%}, "
        f"{batch['patches'].shape[0]} patches, {len(batch['cu_seqlens']) - 1} segments; "
        f"torch threads={torch.get_num_threads()}; reps={args.reps}"
    )
    for k, v in med.items():
        print(f"{k:>10}: fwd+bwd median {v * 1e3:8.1f} ms  (min {min(times[k]) * 1e3:.1f} ms)")
    best = {k: min(v) for k, v in times.items()}  # least disturbed by other load on a shared machine
    for base, what in (("gpt_plain", "target <= 1.05"), ("gpt_packed", "projector + embedding merge overhead")):
        print(
            f"ratio solo/{base:<10} median {med['solo'] / med[base]:.3f}   min {best['solo'] / best[base]:.3f}"
            f"   ({what})"
        )


if __name__ == "__main__":
    main()
