"""Memory / FLOPs / MFU estimator for a SOLO model recipe and a parallel layout (docs/estimate.md).

    python -m tools.estimate --model solo-7b --tp 2 --dp 4 --seq-length 32768 --micro-batch-size 1 \\
        --global-batch-size 128 --use-distributed-optimizer --bf16 --recompute-granularity full \\
        --recompute-num-layers 4 --tokens-per-sec 20000 --num-gpus 8 --gpu a100 --doc-length 32768

Only the recipe's config is instantiated (no model, no process group). Accounting, per GPU (per pipeline stage with
``--pp``):

- weights + grads + optimizer: Megatron's bytes per parameter (docs "Distributed Optimizer"): bf16 params with fp32
  main grads (``grad_reduce_in_fp32``, Megatron-LM's default under bf16) 18 = 2 + 4 + 12, distributed 6 + 12/DP;
  bf16 grads 20 / 4 + 16/DP; fp32 16 / 8 + 8/DP. The 12 (or 16, 8) are fp32 master params and the two Adam moments
  (plus fp32 main grads for 16-bit grads), sharded over DP by the distributed optimizer.
- activations: Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"),
  re-derived for this block (RMSNorm, GQA, SwiGLU, no dropout) with flash / fused attention (no s^2 term) and
  sequence parallelism splitting the norm / residual-side tensors over TP (see ``layer_activation_bytes``).
- logits / loss: vocab-parallel logits ``[s, b, V/TP]`` in the compute dtype plus the fp32 copy the cross entropy
  keeps for backward (megatron.core.tensor_parallel.cross_entropy).
- FLOPs: 6 x (matmul params) per token + causal, window-aware attention (``flops_per_token``).
- pipeline (``--pp``, ``--vpp``): each stage holds L/PP layers (embedding + projector on the first, final norm +
  output layer + logits on the last) and the activations of the micro-batches in flight under Megatron's 1F1B
  schedule: ``min(PP - r, M)`` on stage r; interleaved, ``(PP - r - 1) * 2 + (V - 1) * PP + 1`` chunk-micro-batches
  of L/(PP V) layers (Megatron's warm-up count), i.e. ``1 + (PP - 1)/(PP V)`` times the layers' activations on
  stage 0. Bubble: ``(PP - 1) / (V M + PP - 1)`` of the step (``pipeline_bubble``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from megatron_solo.model.config import SoloConfig, padded_vocab_size, recipe
from megatron_solo.training.metrics import PEAK_TFLOPS, causal_pairs, training_flops

GIB = 1024**3
# dense bf16 tensor-core peak per GPU (SXM), from the trainer's table (one source for MFU)
PEAK_BF16_FLOPS = {name.lower(): PEAK_TFLOPS[name] * 1e12 for name in ("A100", "H100", "H200")}


@dataclass(frozen=True)
class Layout:
    """A parallel layout and the run's memory-relevant switches (Megatron-LM flag names, underscored)."""

    tensor_model_parallel_size: int = 1
    data_parallel_size: int = 1
    micro_batch_size: int = 1
    seq_length: int = 32768
    global_batch_size: int | None = None
    use_distributed_optimizer: bool = True
    bf16: bool = True
    grad_reduce_in_fp32: bool = True
    sequence_parallel: bool = True
    recompute_granularity: str | None = None  # None, "full" or "selective" (core attention)
    recompute_method: str = "uniform"  # "uniform" or "block" (as Megatron-LM)
    recompute_num_layers: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); None = one."""

    def __post_init__(self) -> None:
        if self.recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"recompute_granularity must be None, 'full' or 'selective': {self.recompute_granularity}")
        if self.recompute_method not in ("uniform", "block"):
            raise ValueError(f"recompute_method must be 'uniform' or 'block': {self.recompute_method}")
        for name in ("tensor_model_parallel_size", "data_parallel_size", "micro_batch_size", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.recompute_num_layers < 1:
            raise ValueError("recompute_num_layers must be >= 1")
        if self.pipeline_model_parallel_size < 1 or (self.virtual_pipeline_model_parallel_size or 1) < 1:
            raise ValueError("pipeline_model_parallel_size and virtual_pipeline_model_parallel_size must be >= 1")
        if self.vpp > 1 and self.pipeline_model_parallel_size < 2:
            raise ValueError("virtual pipeline stages need pipeline_model_parallel_size >= 2")

    @property
    def sp(self) -> int:
        """Divisor of the sequence-parallel (norm / residual side) activations."""
        return self.tensor_model_parallel_size if self.sequence_parallel else 1

    @property
    def pp(self) -> int:
        return self.pipeline_model_parallel_size

    @property
    def vpp(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    @property
    def num_microbatches(self) -> int | None:
        """Micro-batches per step and DP rank (``GBS / (MBS x DP)``), if the global batch size is known."""
        if self.global_batch_size is None:
            return None
        return max(self.global_batch_size // (self.micro_batch_size * self.data_parallel_size), 1)


# ---- parameters ---------------------------------------------------------------------------------------------
def param_counts(cfg: SoloConfig, tensor_model_parallel_size: int = 1) -> dict[str, int]:
    """Parameter counts of SoloModel (GPTModel with untied embeddings + the patch projector), vocab padded for TP.

    Keys: embedding, output_layer, per_layer, layers, final_norm, projector, total, and per_rank (what one TP rank
    holds: norms are replicated, everything else split by TP).
    """
    tp = tensor_model_parallel_size
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    a, g = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    vocab = padded_vocab_size(cfg.vocab_size, tp)
    norm = h if cfg.normalization == "RMSNorm" else 2 * h
    qkv = h * (a + 2 * g) * d + (int(cfg.add_qkv_bias or cfg.add_bias_linear) * (a + 2 * g) * d)
    proj = a * d * h + int(cfg.add_bias_linear) * h
    fc1_out = 2 * f if cfg.gated_linear_unit else f
    mlp = h * fc1_out + f * h + int(cfg.add_bias_linear) * (fc1_out + h)
    per_layer_split = qkv + proj + mlp
    per_layer = per_layer_split + 2 * norm
    out = dict(
        embedding=vocab * h,
        output_layer=vocab * h,
        per_layer=per_layer,
        layers=cfg.num_layers * per_layer,
        final_norm=norm,
        projector=cfg.patch_dim * h,
    )
    out["total"] = out["embedding"] + out["output_layer"] + out["layers"] + out["final_norm"] + out["projector"]
    split = out["embedding"] + out["output_layer"] + out["projector"] + cfg.num_layers * per_layer_split
    out["per_rank"] = split // tp + cfg.num_layers * 2 * norm + norm
    return out


def stage_param_count(cfg: SoloConfig, layout: Layout, stage: int = 0) -> int:
    """Parameters one GPU of pipeline rank ``stage`` holds: its L/PP layers (TP-split, norms replicated), plus the
    word embedding and projector on the first rank, the final norm and output layer on the last (untied)."""
    tp, pp = layout.tensor_model_parallel_size, layout.pp
    if cfg.num_layers % (pp * layout.vpp):
        raise ValueError(f"num_layers {cfg.num_layers} is not divisible by PP x VPP = {pp} x {layout.vpp}")
    if not 0 <= stage < pp:
        raise ValueError(f"stage {stage} outside 0..{pp - 1}")
    c = param_counts(cfg, tp)
    norm = c["final_norm"]
    out = (cfg.num_layers // pp) * ((c["per_layer"] - 2 * norm) // tp + 2 * norm)
    if stage == 0:
        out += (c["embedding"] + c["projector"]) // tp
    if stage == pp - 1:
        out += c["output_layer"] // tp + norm
    return out


def inflight_chunk_microbatches(layout: Layout, stage: int = 0) -> int:
    """Model-chunk micro-batches whose activations pipeline rank ``stage`` holds at its peak (Megatron's warm-up
    count + 1): ``PP - r`` under 1F1B, ``(PP - r - 1) * 2 + (V - 1) * PP + 1`` interleaved; at most all of them."""
    pp, v, m = layout.pp, layout.vpp, layout.num_microbatches
    n = (pp - stage - 1) * 2 + (v - 1) * pp + 1 if v > 1 else pp - stage
    return n if m is None else min(n, m * v)


def pipeline_bubble(layout: Layout) -> float:
    """Idle fraction of a step on a pipeline: ``(PP - 1) / (V M + PP - 1)`` (Narayanan et al. 2021; 0 at PP=1).
    Needs the number of micro-batches (global batch size)."""
    if layout.pp == 1:
        return 0.0
    m = layout.num_microbatches
    if m is None:
        raise ValueError("the pipeline bubble needs global_batch_size (the number of micro-batches)")
    return (layout.pp - 1) / (layout.vpp * m + layout.pp - 1)


def state_bytes_per_param(layout: Layout) -> dict[str, float]:
    """Bytes per (rank-local) parameter: params, grads, optimizer state (Megatron's distributed-optimizer table)."""
    d = layout.data_parallel_size if layout.use_distributed_optimizer else 1
    if not layout.bf16:
        return dict(params=4.0, grads=4.0, optimizer=8.0 / d)  # fp32 params: Adam moments only (no master copy)
    if layout.grad_reduce_in_fp32:
        return dict(params=2.0, grads=4.0, optimizer=12.0 / d)  # fp32 master + exp_avg + exp_avg_sq
    return dict(params=2.0, grads=2.0, optimizer=16.0 / d)  # + fp32 main grads inside the optimizer


# ---- activations --------------------------------------------------------------------------------------------
def layer_activation_bytes(cfg: SoloConfig, layout: Layout) -> dict[str, float]:
    """Bytes one transformer layer keeps for backward (per micro-batch, per GPU), by tensor.

    With e bytes per element, t = TP, p = TP under sequence parallelism (else 1), s*b tokens:
    attention norm input + QKV input (e*sbh/p each), q/k/v after RoPE (the flash inputs, e*sb(a+2g)d/t), the
    attention output (= out-projection input, e*sbad/t), the softmax log-sum-exp (fp32, 4*sba/t), MLP norm input +
    fc1 input (e*sbh/p each), fc1 output (e*sb*2f/t for SwiGLU) and fc2 input (e*sbf/t). Dropout is 0 in every
    recipe, so no masks. For solo-7b this is ~34*sbh/t, next to Megatron's 18 + 4f/h = 32 for a non-GQA block.
    """
    t, p = layout.tensor_model_parallel_size, layout.sp
    e = 2 if layout.bf16 else 4
    sb = layout.seq_length * layout.micro_batch_size
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    a, g = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    fc1_out = 2 * f if cfg.gated_linear_unit else f
    out = dict(
        norm_inputs=2 * e * sb * h / p,
        linear_inputs=2 * e * sb * h / p,  # QKV input and fc1 input (sequence-parallel shards, re-gathered in bwd)
        qkv=e * sb * (a + 2 * g) * d / t,
        attention_out=e * sb * a * d / t,
        softmax_lse=0.0 if layout.recompute_granularity == "selective" else 4 * sb * a / t,
        fc1_out=e * sb * fc1_out / t,
        fc2_in=e * sb * f / t,
    )
    if cfg.hidden_dropout > 0:
        out["dropout_masks"] = 2 * sb * h / p
    return out


def activation_bytes(cfg: SoloConfig, layout: Layout, stage: int = 0) -> dict[str, float]:
    """Peak activation bytes per GPU of pipeline rank ``stage`` (all of them at PP=1 with one micro-batch in flight):
    the in-flight chunk-micro-batches (:func:`inflight_chunk_microbatches`) x what a chunk of L/(PP V) layers keeps,
    one recompute group live in backward, the logits on the last rank (one micro-batch: the last stage runs each
    micro-batch's backward right after its forward; an approximation when interleaved)."""
    e = 2 if layout.bf16 else 4
    sb = layout.seq_length * layout.micro_batch_size
    h, n = cfg.hidden_size, cfg.num_layers // (layout.pp * layout.vpp)
    first, last = stage == 0, stage == layout.pp - 1
    chunks = inflight_chunk_microbatches(layout, stage)
    per_layer = sum(layer_activation_bytes(cfg, layout).values())
    layer_input = e * sb * h / layout.sp
    k = min(layout.recompute_num_layers, n)
    if layout.recompute_granularity == "full":
        if layout.recompute_method == "uniform":  # inputs of each group of k layers; one group live in backward
            stored, working = math.ceil(n / k) * layer_input, k * per_layer
        else:  # block: the first k layers keep only their inputs, the others everything; one layer recomputed
            stored, working = k * layer_input + (n - k) * per_layer, per_layer if k else 0.0
    else:
        stored, working = n * per_layer, 0.0
    vocab = padded_vocab_size(cfg.vocab_size, layout.tensor_model_parallel_size) / layout.tensor_model_parallel_size
    logits = sb * vocab * (e + 4 if e != 4 else 4)  # logits + fp32 copy kept by the CE (its grad reuses it)
    t = layout.tensor_model_parallel_size
    fc1_out = 2 * cfg.ffn_hidden_size if cfg.gated_linear_unit else cfg.ffn_hidden_size
    # largest backward temporaries of a layer: grads of fc1 out / fc2 in and the re-gathered (SP) linear input
    transient = e * sb * ((fc1_out + cfg.ffn_hidden_size) / t + (h if layout.sp > 1 else 0))
    return dict(
        layers_stored=chunks * stored,
        recompute_working=working,
        backward_transient=transient,
        embedding=8 * sb * chunks if first else 0.0,  # int64 token ids (the embedding output is layer 0's input)
        final_norm_and_output_input=2 * e * sb * h / layout.sp if last else 0.0,
        logits_and_loss=logits if last else 0.0,
    )


def estimate_memory(cfg: SoloConfig, layout: Layout, stage: int = 0) -> dict[str, float]:
    """Per-GPU memory in bytes of pipeline rank ``stage``: params, grads, optimizer, each activation part, and total
    (no allocator reserve)."""
    n = stage_param_count(cfg, layout, stage)
    per = state_bytes_per_param(layout)
    out = {name: n * b for name, b in per.items()}
    act = activation_bytes(cfg, layout, stage)
    out.update({f"act_{k}": v for k, v in act.items()})
    out["activations"] = sum(act.values())
    out["model_state"] = out["params"] + out["grads"] + out["optimizer"]
    out["total"] = out["model_state"] + out["activations"]
    out["params_per_rank"] = float(n)
    out["bytes_per_param"] = sum(per.values())
    return out


def estimate_stages(cfg: SoloConfig, layout: Layout) -> list[dict[str, float]]:
    """:func:`estimate_memory` of every pipeline rank (the largest decides whether the layout fits)."""
    return [estimate_memory(cfg, layout, r) for r in range(layout.pp)]


# ---- FLOPs --------------------------------------------------------------------------------------------------
def attention_pairs(doc_lengths: Iterable[int], window: int | None) -> int:
    """(query, key) pairs of causal attention within each document, a query seeing at most ``window`` keys
    (itself included): per document of length L, sum_{i=1..L} min(i, W) (the trainer's ``causal_pairs``)."""
    lengths = [int(x) for x in doc_lengths]
    if any(length < 0 for length in lengths):
        raise ValueError(f"negative document length in {lengths}")
    return sum(causal_pairs(length, window) for length in lengths)


def matmul_params(cfg: SoloConfig) -> int:
    """Weights that every token multiplies: all transformer linears + the output layer (padded vocab, as Megatron
    counts it). Not the embedding lookup, norms, or the patch projector (applied to <vpatch> tokens only; 3072 x h
    is < 0.2% of solo-7b's per-token matmuls)."""
    c = param_counts(cfg, cfg.tensor_model_parallel_size)
    norms = 2 * (cfg.hidden_size if cfg.normalization == "RMSNorm" else 2 * cfg.hidden_size)
    return c["layers"] - cfg.num_layers * norms + c["output_layer"]


def model_flops(cfg: SoloConfig, doc_lengths: Iterable[int], recompute: bool = False) -> float:
    """Training FLOPs (forward + backward) for a set of documents, by the trainer's formula (ONE formula for the
    logged MFU and this estimate: ``megatron_solo.training.metrics.training_flops``):
    ``6 * matmul_params * tokens + 12 * layers * heads * head_dim * attention_pairs``
    (QK^T and AV: 2 matmuls x 2 FLOPs per multiply-add per pair, x3 for forward + backward); the patch projector
    (3072 x h per patch, < 0.2% of solo-7b's per-token matmuls) is left out here.
    ``recompute=True`` adds one more forward of the transformer layers (hardware FLOPs under full recompute, for
    HFU; MFU uses the model FLOPs)."""
    lengths = [int(x) for x in doc_lengths]
    total = training_flops(cfg, lengths, n_patches=0)
    if recompute:
        output_layer_fwd = 2 * param_counts(cfg, cfg.tensor_model_parallel_size)["output_layer"] * sum(lengths)
        total += total / 3 - output_layer_fwd
    return float(total)


def flops_per_token(cfg: SoloConfig, doc_lengths: Iterable[int]) -> float:
    """Model FLOPs per token (forward + backward) for a mix of documents (``model_flops / tokens``)."""
    lengths = [int(x) for x in doc_lengths]
    tokens = sum(lengths)
    if tokens == 0:
        raise ValueError("no tokens")
    return model_flops(cfg, lengths) / tokens


def pack_doc_lengths(seq_length: int, doc_length: int) -> list[int]:
    """A full pack of ``seq_length`` tokens cut into documents of ``doc_length`` (the last one shorter)."""
    if doc_length < 1:
        raise ValueError("doc_length must be >= 1")
    full, rest = divmod(seq_length, doc_length)
    return [doc_length] * full + ([rest] if rest else [])


def mfu(tokens_per_sec: float, flops_per_token_: float, num_gpus: int, peak_flops_per_gpu: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the GPUs' peak."""
    return tokens_per_sec * flops_per_token_ / (num_gpus * peak_flops_per_gpu)


# ---- CLI ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.estimate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="solo-7b", help="model recipe (solo-7b, tiny, debug)")
    p.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1)
    p.add_argument("--dp", "--data-parallel-size", dest="dp", type=int, default=1)
    p.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--vpp", "--virtual-pipeline-model-parallel-size", dest="vpp", type=int, default=None)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, help="alternative to --vpp")
    p.add_argument("--seq-length", type=int, default=None, help="default: the recipe's")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None)
    p.add_argument("--use-distributed-optimizer", action="store_true")
    p.add_argument("--bf16", action="store_true", help="bf16 params/compute (else fp32)")
    p.add_argument("--grad-reduce-in-bf16", action="store_true", help="bf16 main grads instead of fp32")
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument(
        "--recompute-granularity", "--recompute", dest="recompute", choices=["none", "full", "selective"], default=None
    )
    p.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform")
    p.add_argument("--recompute-num-layers", type=int, default=1)
    p.add_argument("--tokens-per-sec", type=float, default=None, help="measured throughput (all GPUs) for MFU")
    p.add_argument("--num-gpus", type=int, default=None, help="default: tp * pp * dp")
    p.add_argument("--gpu", choices=sorted(PEAK_BF16_FLOPS), default="a100")
    p.add_argument("--doc-length", type=int, action="append", help="document length(s) of a pack (repeatable)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--reserve-gib", type=float, default=4.0, help="CUDA context, NCCL, allocator slack (assumed)")
    return p


def report(args: argparse.Namespace) -> str:
    cfg = recipe(args.model, tensor_model_parallel_size=args.tp, use_cpu_initialization=True)
    seq = args.seq_length or cfg.seq_length
    vpp = args.vpp
    if args.num_layers_per_virtual_pipeline_stage:
        vpp = cfg.num_layers // (args.pp * args.num_layers_per_virtual_pipeline_stage)
    layout = Layout(
        pipeline_model_parallel_size=args.pp,
        virtual_pipeline_model_parallel_size=vpp if vpp and vpp > 1 else None,
        tensor_model_parallel_size=args.tp,
        data_parallel_size=args.dp,
        micro_batch_size=args.micro_batch_size,
        seq_length=seq,
        global_batch_size=args.global_batch_size,
        use_distributed_optimizer=args.use_distributed_optimizer,
        bf16=args.bf16,
        grad_reduce_in_fp32=not args.grad_reduce_in_bf16,
        sequence_parallel=args.tp > 1 and not args.no_sequence_parallel,
        recompute_granularity=None if args.recompute in (None, "none") else args.recompute,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )
    counts = param_counts(cfg, args.tp)
    stages = estimate_stages(cfg, layout)
    worst = max(range(layout.pp), key=lambda r: stages[r]["total"])
    mem = stages[worst]
    lines = [
        f"model {args.model}: {counts['total']:,} parameters ({counts['per_rank']:,} per TP rank), vocab padded to "
        f"{padded_vocab_size(cfg.vocab_size, args.tp)}",
        f"layout TP={args.tp} x PP={args.pp}{f' (x{layout.vpp} virtual)' if layout.vpp > 1 else ''} x DP={args.dp}, "
        f"seq {seq}, micro-batch {args.micro_batch_size}, "
        f"{'bf16' if layout.bf16 else 'fp32'}, dist-opt {layout.use_distributed_optimizer}, "
        f"SP {layout.sequence_parallel}, recompute {layout.recompute_granularity or 'none'}"
        + (
            f" ({layout.recompute_method}, {layout.recompute_num_layers} layer(s))"
            if layout.recompute_granularity == "full"
            else ""
        ),
        "",
        f"{'per-GPU memory' + (f', pipeline stage {worst} (the largest)' if layout.pp > 1 else ''):<38} GiB",
        f"  params                            {mem['params'] / GIB:7.2f}",
        f"  grads (DDP buffer)                {mem['grads'] / GIB:7.2f}",
        f"  optimizer (master + Adam)         {mem['optimizer'] / GIB:7.2f}   ({mem['bytes_per_param']:.2f} B/param)",
        f"  activations: layers stored        {mem['act_layers_stored'] / GIB:7.2f}",
        f"  activations: recompute working    {mem['act_recompute_working'] / GIB:7.2f}",
        f"  activations: logits + loss        {mem['act_logits_and_loss'] / GIB:7.2f}",
        f"  activations: backward temporaries {mem['act_backward_transient'] / GIB:7.2f}",
        f"  activations: other                "
        f"{(mem['act_embedding'] + mem['act_final_norm_and_output_input']) / GIB:7.2f}",
        f"  total                             {mem['total'] / GIB:7.2f}",
        f"  + reserve (assumed)               {args.reserve_gib:7.2f}",
        f"  => {(mem['total'] / GIB + args.reserve_gib):.1f} GiB of {args.gpu_memory_gib:.0f} GiB: "
        + ("fits" if mem["total"] / GIB + args.reserve_gib <= args.gpu_memory_gib else "DOES NOT FIT"),
    ]
    if layout.pp > 1:
        lines += _pipeline_lines(cfg, layout, stages)
    docs = pack_doc_lengths(seq, args.doc_length[0]) if args.doc_length and len(args.doc_length) == 1 else None
    if args.doc_length and docs is None:
        docs = list(args.doc_length)
    docs = docs or [seq]
    fpt = flops_per_token(cfg, docs)
    dense = 6 * matmul_params(cfg)
    lines += [
        "",
        f"FLOPs per token (fwd+bwd) for documents of {sorted(set(docs))} tokens: {fpt / 1e9:.2f} GFLOP "
        f"(6N = {dense / 1e9:.2f}, attention {(fpt - dense) / 1e9:.2f}, window {cfg.sliding_window})",
    ]
    if args.global_batch_size:
        tokens = args.global_batch_size * seq
        lines.append(f"FLOPs per step (GBS {args.global_batch_size} x {seq} tokens): {fpt * tokens:.3e}")
    if args.tokens_per_sec:
        gpus = args.num_gpus or args.tp * args.pp * args.dp
        peak = PEAK_BF16_FLOPS[args.gpu]
        m = mfu(args.tokens_per_sec, fpt, gpus, peak)
        m6 = mfu(args.tokens_per_sec, dense, gpus, peak)
        lines.append(
            f"{args.tokens_per_sec:,.0f} tokens/s on {gpus} x {args.gpu} ({peak / 1e12:.0f} TFLOP/s bf16): "
            f"{args.tokens_per_sec * fpt / gpus / 1e12:.1f} TFLOP/s per GPU, MFU {m:.1%} (6N only: {m6:.1%})"
        )
    return "\n".join(lines)


def _pipeline_lines(cfg: SoloConfig, layout: Layout, stages: list[dict[str, float]]) -> list[str]:
    """The per-stage table and the bubble (with and without virtual stages) for a pipeline layout."""
    lines = ["", "stage  layers   params/GPU  model state  activations   total GiB"]
    for r, m in enumerate(stages):
        lines.append(
            f"  {r:>3}  {cfg.num_layers // layout.pp:>6}  {m['params_per_rank'] / 1e9:>9.2f} B  "
            f"{m['model_state'] / GIB:>11.2f}  {m['activations'] / GIB:>11.2f}  {m['total'] / GIB:>10.2f}"
        )
    m = layout.num_microbatches
    if m is None:
        return lines + ["pipeline bubble: pass --global-batch-size (the number of micro-batches decides it)"]
    plain = dataclasses.replace(layout, virtual_pipeline_model_parallel_size=None)
    line = f"pipeline bubble ({m} micro-batches per step): {pipeline_bubble(plain):.1%} of the step with 1F1B"
    if layout.vpp > 1:
        line += f", {pipeline_bubble(layout):.1%} interleaved over {layout.vpp} virtual stages"
    return lines + [line]


def main(argv: list[str] | None = None) -> None:
    print(report(_parser().parse_args(argv)))


if __name__ == "__main__":
    main()
