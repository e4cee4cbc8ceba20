"""Trainer overhead: one full training step (data from the shards, collation, get_forward_backward_func, DDP +
distributed optimizer step, metrics all-reduce) vs the bare model forward + backward of the same micro-batches.

    python benchmarks/bench_trainer.py            # 1 process, tiny model, seq 512, GBS 4, 1 torch thread

Both are timed in the same process, interleaved, on the same data; the ratio is what the loop adds around the model.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def main() -> None:
    import torch

    torch.set_num_threads(1)
    from megatron_solo.model import build_packed_seq_params, solo_losses
    from megatron_solo.preprocess.demo import build_demo_shards
    from megatron_solo.training.arguments import parse_args
    from megatron_solo.training.loop import Trainer

    reps = int(os.environ.get("REPS", "9"))
    with tempfile.TemporaryDirectory() as tmp:
        data = build_demo_shards(Path(tmp) / "demo", seq_length=512)
        args = parse_args(
            f"--model tiny --data-path {data['train']} --micro-batch-size 1 --global-batch-size 4 "
            f"--train-iters {2 * reps + 2} --lr 1e-3 --use-distributed-optimizer".split()
        )
        trainer = Trainer(args)
        model = trainer.model[0]  # the one model chunk (no pipeline)
        step_times, bare_times = [], []
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            trainer.train_step()
            step_t = time.perf_counter() - t0
            batches = trainer.loader.step(trainer.state.consumed_samples)  # the next step's data, pre-loaded
            t0 = time.perf_counter()
            model.zero_grad_buffer()
            for b in batches:
                psp = build_packed_seq_params(b.cu_seqlens, b.max_seqlen)
                loss = model(b.tokens, b.position_ids, b.patches, labels=b.labels, packed_seq_params=psp)
                solo_losses(loss, b.loss_mask, b.vision_doc_mask)["overall"][0].backward()
            bare_t = time.perf_counter() - t0
            if rep:  # the first of each is warm-up
                step_times.append(step_t)
                bare_times.append(bare_t)
        s, b = statistics.median(step_times), statistics.median(bare_times)
        print(f"tiny model, seq 512, GBS 4 (4 micro-batches), 1 process, torch threads 1, reps {reps}")
        print(f"trainer step   median {s * 1e3:8.1f} ms  (min {min(step_times) * 1e3:.1f})")
        print(f"bare fwd+bwd   median {b * 1e3:8.1f} ms  (min {min(bare_times) * 1e3:.1f})")
        print(f"ratio step/bare median {s / b:.3f}  min {min(step_times) / min(bare_times):.3f}")


if __name__ == "__main__":
    main()
