"""Command line (Megatron-LM flag names) -> one dataclass per component, parsed once; no global ``get_args()``.

``parse_args(argv)`` returns ``RunArgs``: ``parallel``, ``data``, ``train``, ``optim`` (Megatron-Core's own
``OptimizerConfig``), ``sched``, ``ckpt``, ``log`` and the model fields (``model_recipe`` + overrides). The model's
``SoloConfig`` needs the tokenizer's vocab size and the world layout, so :func:`model_config` builds it once the
tokenizer is known.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch


@dataclass
class ParallelArgs:
    tensor_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Interleaved 1F1B: each pipeline rank holds num_layers / (PP x this) model chunks (Megatron-LM)."""


@dataclass
class DataArgs:
    data_path: list[str] = field(default_factory=list)
    valid_data_path: list[str] = field(default_factory=list)
    vision_fraction: float | None = None
    tokenizer_model: str | None = None
    seq_length: int | None = None


@dataclass
class TrainArgs:
    micro_batch_size: int = 1
    global_batch_size: int = 8
    train_iters: int = 100
    seed: int = 1234
    eval_interval: int = 0
    eval_iters: int = 1
    exit_interval: int | None = None
    """Stop after this iteration (checkpointing at exit) without finishing --train-iters (Megatron-LM)."""


@dataclass
class SchedulerArgs:
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    lr_warmup_init: float = 0.0
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False


@dataclass
class CheckpointArgs:
    save: str | None = None
    load: str | None = None
    save_interval: int | None = None
    pretrained_checkpoint: str | None = None
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    save_at_exit: bool = True


@dataclass
class LogArgs:
    log_interval: int = 1
    tensorboard_dir: str | None = None
    metrics_log: str | None = None
    """JSON-lines file of per-step metrics (rank 0), e.g. for tests and plots."""
    peak_tflops: float | None = None
    """Per-GPU peak for MFU (default: by device name; the CPU has none)."""
    progress_bar: bool = False


@dataclass
class ModelArgs:
    model_recipe: str = "tiny"
    overrides: dict = field(default_factory=dict)
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    language_model_type: str = "gpt"
    """gpt | hybrid | auto: megatron-core's GPTModel or HybridModel under the projector (model/hybrid.py)."""


@dataclass
class RunArgs:
    parallel: ParallelArgs
    data: DataArgs
    train: TrainArgs
    optim: object  # megatron.core.optimizer.OptimizerConfig
    sched: SchedulerArgs
    ckpt: CheckpointArgs
    log: LogArgs
    model: ModelArgs
    bf16: bool = False


_MODEL_FLAGS = {
    "num_layers": int,
    "hidden_size": int,
    "num_attention_heads": int,
    "num_query_groups": int,
    "ffn_hidden_size": int,
    "kv_channels": int,
    "max_position_embeddings": int,
    "init_method_std": float,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain_solo.py", description="SOLO pre-training on Megatron-Core")
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="model_recipe", default="tiny", help="recipe: solo-7b | tiny | debug")
    for name, typ in _MODEL_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    g.add_argument("--sliding-window", type=int, default=None, help="attention window (tokens seen, incl. self)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument(
        "--language-model-type",
        choices=["gpt", "hybrid", "auto"],
        default="gpt",
        help="megatron-core model: GPTModel, HybridModel (attention + MLP layers; megatron-core >= 0.19) or auto "
        "(hybrid where available); same math and checkpoints (default: gpt)",
    )
    g.add_argument("--bf16", action="store_true", help="bf16 params/compute (GPU); fp32 otherwise")
    g.add_argument("--fp32", action="store_true", help="force fp32 even on GPU")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument(
        "--pipeline-model-parallel-size", type=int, default=1, help="pipeline stages (default 1: no pipeline)"
    )
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="layers per virtual stage: interleaved 1F1B schedule (default: none, one chunk per rank)",
    )

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[], help='"p" or "w1 p1 w2 p2 ..." (shard-set dirs)')
    g.add_argument("--valid-data-path", nargs="+", default=[])
    g.add_argument("--vision-fraction", type=float, default=None, help="target share of vision tokens in the blend")
    g.add_argument("--tokenizer-model", default=None, help="SOLO SentencePiece model (default: from the checkpoint)")
    g.add_argument("--seq-length", type=int, default=None)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--eval-interval", type=int, default=0)
    g.add_argument("--eval-iters", type=int, default=1)

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", choices=["adam"], default="adam")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument(
        "--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"], default="cosine"
    )
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--override-opt-param-scheduler", action="store_true")
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler", dest="use_checkpoint_opt_param_scheduler", action="store_true"
    )

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--pretrained-checkpoint", default=None, help="weights only; fresh optimizer + schedule")
    g.add_argument("--finetune", action="store_true", help="with --load: weights only, iteration 0")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-at-exit", dest="save_at_exit", action="store_false")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist")

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-log", default=None, help="JSON-lines per-step metrics file (rank 0)")
    g.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak TFLOP/s for MFU")
    g.add_argument("--progress-bar", action="store_true", help="tqdm bar instead of one console line per step")
    return p


def parse_args(argv: list[str] | None = None) -> RunArgs:
    """Parse once; each component gets its own dataclass."""
    from megatron.core.optimizer import OptimizerConfig

    a = build_parser().parse_args(argv)
    if not a.data_path:
        raise SystemExit("pretrain_solo.py: --data-path is required")
    bf16 = (a.bf16 or torch.cuda.is_available()) and not a.fp32
    overrides = {k: getattr(a, k) for k in _MODEL_FLAGS if getattr(a, k) is not None}
    if a.sliding_window is not None:
        overrides["window_size"] = (a.sliding_window - 1, 0) if a.sliding_window > 0 else None
    if a.seq_length is not None:
        overrides["seq_length"] = a.seq_length
    optim = OptimizerConfig(
        optimizer=a.optimizer,
        lr=a.lr,
        min_lr=a.min_lr,
        weight_decay=a.weight_decay,
        adam_beta1=a.adam_beta1,
        adam_beta2=a.adam_beta2,
        adam_eps=a.adam_eps,
        clip_grad=a.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=a.use_distributed_optimizer,
    )
    return RunArgs(
        parallel=ParallelArgs(
            a.tensor_model_parallel_size,
            a.sequence_parallel,
            a.use_distributed_optimizer,
            a.overlap_grad_reduce,
            a.overlap_param_gather,
            a.pipeline_model_parallel_size,
            a.num_layers_per_virtual_pipeline_stage,
        ),
        data=DataArgs(a.data_path, a.valid_data_path, a.vision_fraction, a.tokenizer_model, a.seq_length),
        train=TrainArgs(
            a.micro_batch_size,
            a.global_batch_size,
            a.train_iters,
            a.seed,
            a.eval_interval,
            a.eval_iters,
            a.exit_interval,
        ),  # fmt: skip
        optim=optim,
        sched=SchedulerArgs(
            a.lr_decay_style,
            a.lr_warmup_iters,
            a.lr_decay_iters,
            a.lr_warmup_init,
            a.override_opt_param_scheduler,
            a.use_checkpoint_opt_param_scheduler,
        ),
        ckpt=CheckpointArgs(
            a.save,
            a.load,
            a.save_interval,
            a.pretrained_checkpoint,
            a.finetune,
            a.no_load_optim,
            a.no_load_rng,
            a.no_save_optim,
            a.save_at_exit,
        ),  # fmt: skip
        log=LogArgs(a.log_interval, a.tensorboard_dir, a.metrics_log, a.peak_tflops, a.progress_bar),
        model=ModelArgs(
            a.model_recipe,
            overrides,
            a.recompute_granularity,
            a.recompute_method,
            a.recompute_num_layers,
            a.language_model_type,
        ),
        bf16=bf16,
    )


def model_config(
    args: RunArgs, vocab_size: int, seq_length: int, special_ids: tuple[int, int], arch: dict | None = None
):
    """The run's SoloConfig: recipe (or a checkpoint's architecture ``arch``) + flag overrides + the run's layout.

    ``seq_length`` is the data's pack length (RoPE tables cover at least it); ``special_ids`` the tokenizer's
    ``(vpatch_id, first_special_id)``.

    ``calculate_per_token_loss`` is on: the loss is the token-weighted mean over the whole global batch.
    """
    from megatron_solo.model import config_from_dict, recipe

    fields = dict(args.model.overrides)
    fields.update(
        vocab_size=vocab_size,
        tensor_model_parallel_size=args.parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.parallel.pipeline_model_parallel_size,
        sequence_parallel=args.parallel.sequence_parallel,
        calculate_per_token_loss=True,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        language_model_type=args.model.language_model_type,
    )
    if args.model.recompute_granularity is not None:
        fields["recompute_granularity"] = args.model.recompute_granularity
        if args.model.recompute_granularity == "full":
            fields["recompute_method"] = args.model.recompute_method or "uniform"
            fields["recompute_num_layers"] = args.model.recompute_num_layers or 1
    fields["seq_length"] = seq_length
    if arch is not None:  # architecture of the checkpoint the run starts from; flags may not change it

        def norm(v):
            return list(v) if isinstance(v, tuple | list) else v

        clash = {
            k: (v, arch.get(k))
            for k, v in args.model.overrides.items()
            if k not in ("seq_length", "max_position_embeddings") and norm(v) != norm(arch.get(k))
        }
        if clash:
            raise SystemExit(
                f"model flags contradict the checkpoint's solo_config.json (flag, checkpoint): {clash}; "
                "a checkpoint fixes the architecture"
            )
        fields["max_position_embeddings"] = max(arch.get("max_position_embeddings", 0), seq_length)
        if (arch.get("vpatch_id"), arch.get("first_special_id"), arch.get("vocab_size")) != (*special_ids, vocab_size):
            raise SystemExit(
                f"the checkpoint's vocab ({arch.get('vocab_size')}, <vpatch>={arch.get('vpatch_id')}) does not match "
                f"the tokenizer ({vocab_size}, <vpatch>={special_ids[0]})"
            )
        return _with_virtual_stages(lambda **extra: config_from_dict(arch, **fields, **extra), args.parallel)
    fields["vpatch_id"], fields["first_special_id"] = special_ids
    if "max_position_embeddings" not in args.model.overrides:
        fields["max_position_embeddings"] = seq_length
    return _with_virtual_stages(lambda **extra: recipe(args.model.model_recipe, **fields, **extra), args.parallel)


def _with_virtual_stages(build, parallel: ParallelArgs):
    """``build()``, then again with ``virtual_pipeline_model_parallel_size`` = layers / (PP x
    ``--num-layers-per-virtual-pipeline-stage``) once the layer count is known (Megatron-LM's rule)."""
    config = build()
    per_stage = parallel.num_layers_per_virtual_pipeline_stage
    if per_stage is None:
        return config
    pp = parallel.pipeline_model_parallel_size
    if pp < 2 or per_stage < 1 or config.num_layers % (pp * per_stage):
        raise SystemExit(
            f"--num-layers-per-virtual-pipeline-stage {per_stage} needs --pipeline-model-parallel-size > 1 and "
            f"num_layers ({config.num_layers}) divisible by PP x it ({pp} x {per_stage})"
        )
    vpp = config.num_layers // (pp * per_stage)
    if vpp == 1:
        return config
    # Megatron-LM's interleaved defaults: overlapped, unbatched P2P. The batched path (batch_isend_irecv) posts
    # send-to-prev before send-to-next; at PP=2 both peers are the same rank, and a backend that matches one peer's
    # messages in posting order (gloo) then swaps activations and gradients of equal shape: silently wrong losses.
    return build(virtual_pipeline_model_parallel_size=vpp, overlap_p2p_comm=True, batch_p2p_comm=False)
