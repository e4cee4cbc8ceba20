"""Model FLOPs (attention over the real document lengths, window-aware), MFU, memory, the console line, TensorBoard
and a JSON-lines metrics log.

FLOPs convention (model FLOPs, not hardware FLOPs: recompute is not counted; one multiply-add = 2 FLOPs):
forward = 2 x (matmul weights touched per token) x tokens + 4 x heads x head_dim x (causal query-key pairs per
document, each query seeing at most ``window`` keys) per layer; training = 3 x forward (backward = 2 x forward).
Padding tokens are not counted (they are computed, but are not model work).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

# Dense bf16 peak TFLOP/s per GPU by device-name fragment (for MFU).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def causal_pairs(length: int, window: int | None) -> int:
    """Query-key pairs of causal attention over one document: sum_i min(i + 1, window)."""
    if window is None or window >= length:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def dense_flops_per_token(config) -> tuple[float, float]:
    """(forward FLOPs per text/vision token excluding attention scores, extra forward FLOPs per patch)."""
    h, d = config.hidden_size, config.kv_channels or config.hidden_size // config.num_attention_heads
    nq, g = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
    ffn = config.ffn_hidden_size
    ffn_in = 2 * ffn if config.gated_linear_unit else ffn
    per_layer = h * (nq + 2 * g) * d + nq * d * h + h * ffn_in + ffn * h
    logits = h * config.padded_vocab_size
    return 2.0 * (config.num_layers * per_layer + logits), 2.0 * config.patch_dim * h


def training_flops(config, doc_lengths: list[int], n_patches: int) -> float:
    """Model FLOPs of forward + backward over documents of the given lengths (real tokens only)."""
    per_token, per_patch = dense_flops_per_token(config)
    window = config.sliding_window
    nq = config.num_attention_heads
    d = config.kv_channels or config.hidden_size // nq
    pairs = sum(causal_pairs(n, window) for n in doc_lengths)
    forward = per_token * sum(doc_lengths) + per_patch * n_patches + 4.0 * nq * d * pairs * config.num_layers
    return 3.0 * forward


def peak_tflops(override: float | None = None) -> float | None:
    """Per-device peak for MFU: the flag, else by CUDA device name, else None (CPU)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def memory_gb() -> float:
    """Peak allocated GPU memory of this rank, or this process's resident memory on CPU (GB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def console_line(m: dict, train_iters: int, throughput: bool = True) -> str:
    """``iter i/N | loss | vision-lm | text-lm | lr | grad-norm [| tokens/s | TFLOP/s/GPU | MFU] | mem`` (the
    bracketed part with ``--log-throughput``, as Megatron-LM; ``loss-scale`` with fp16)."""
    line = (
        f"iter {m['iteration']:>6d}/{train_iters} | loss {_fmt(m['loss'], '.4f')} | "
        f"vision-lm {_fmt(m['vision_lm'], '.4f')} | text-lm {_fmt(m['text_lm'], '.4f')} | lr {m['lr']:.3e} | "
        f"grad-norm {_fmt(m['grad_norm'], '.3f')}"
    )
    if "loss_scale" in m:
        line += f" | loss-scale {m['loss_scale']:.1f}"
    if throughput:
        line += (
            f" | tokens/s {m['tokens_per_s']:,.0f} | TFLOP/s/GPU {m['tflops_per_gpu']:.3f} | "
            f"MFU {_fmt(m['mfu'], '.1%')}"
        )
    return line + f" | mem {m['mem_gb']:.2f} GB"


class MetricsWriter:
    """The logging rank's sinks: TensorBoard (``--tensorboard-dir``), JSON lines (``--metrics-log``), Weights &
    Biases (``--wandb-project``; the optional ``wandb`` extra; ``WANDB_MODE=offline`` writes a local run dir)."""

    def __init__(self, tensorboard_dir: str | None, metrics_log: str | None, enabled: bool, wandb: dict | None = None):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        self.wandb = None
        if not enabled:
            return
        if wandb is not None:
            self.wandb = _start_wandb(**wandb)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if metrics_log:
            Path(metrics_log).parent.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(metrics_log, "a", buffering=1)  # noqa: SIM115 - lives as long as the run

    def write(self, kind: str, metrics: dict) -> None:
        if not self.enabled:
            return
        step = metrics["iteration"]
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "iteration" and isinstance(v, int | float) and not math.isnan(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.jsonl is not None:
            clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
            self.jsonl.write(json.dumps({"kind": kind, "time": time.time(), **clean}) + "\n")
        if self.wandb is not None:
            values = {
                f"{kind}/{k}": v
                for k, v in metrics.items()
                if k != "iteration" and isinstance(v, int | float) and math.isfinite(v)
            }
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def wandb_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


def _start_wandb(project: str, name: str | None, save_dir: str, config: dict):
    """``wandb.init`` of the run (online, or offline with ``WANDB_MODE=offline``); the caller checked the import."""
    import wandb

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=project, name=name, dir=save_dir, config=config)
