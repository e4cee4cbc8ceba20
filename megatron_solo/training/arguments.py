"""Command line (Megatron-LM flag names) -> one dataclass per component, parsed once; no global ``get_args()``.

``parse_args(argv)`` returns ``RunArgs``: ``parallel``, ``data``, ``train``, ``optim`` (Megatron-Core's own
``OptimizerConfig``), ``sched``, ``ckpt``, ``log`` and the model fields (``model_recipe`` + overrides). The model's
``SoloConfig`` needs the tokenizer's vocab size and the world layout, so :func:`model_config` builds it once the
tokenizer is known. Contradictory flags raise :class:`SetupError` (printed once by rank 0, errors.py).

Samples-based schedules follow Megatron-LM: ``--train-samples N`` trains ``N // GBS`` iterations; the LR schedule
counts samples in both modes (``--lr-decay-samples`` / ``--lr-warmup-samples`` with ``--train-samples``,
``--lr-decay-iters`` / ``--lr-warmup-iters`` x GBS with ``--train-iters``; ``--lr-warmup-fraction`` of the decay).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import torch

from megatron_solo.training.errors import SetupError, is_rank0


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
    """Iterations of the run; with ``--train-samples`` derived as ``train_samples // global_batch_size``."""
    seed: int = 1234
    eval_interval: int = 0
    eval_iters: int = 1
    exit_interval: int | None = None
    """Stop at the first iteration that is a multiple of it (checkpointing at exit), as Megatron-LM."""
    train_samples: int | None = None
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False


@dataclass
class SchedulerArgs:
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: int | None = None
    lr_warmup_init: float = 0.0
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    lr_warmup_fraction: float | None = None
    lr_warmup_samples: int = 0
    lr_decay_samples: int | None = None


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
    log_throughput: bool = False
    wandb_project: str | None = None
    wandb_exp_name: str | None = None
    wandb_save_dir: str | None = None


@dataclass
class EvalTasksArgs:
    """Evaluation during training (training/eval_tasks.py): downstream tasks scored by the model in process."""

    specs: list[str] = field(default_factory=list)
    """``[name=]vqa:FILE.jsonl`` / ``[name=]caption:FILE.jsonl`` (megatron_solo/eval task files)."""
    interval: int = 0
    """Score at iterations 0, N, 2N, ... and the last one (a pure function of the iteration: survives resume)."""
    samples: int | None = None
    max_new_tokens: int = 16
    batch_size: int = 16


@dataclass
class ModelArgs:
    model_recipe: str | None = None
    """``--model``; None: the checkpoint's architecture when the run starts from one, else ``tiny``."""
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
    eval_tasks: EvalTasksArgs = field(default_factory=EvalTasksArgs)
    bf16: bool = False
    fp16: bool = False

    @property
    def params_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32


_MODEL_FLAGS = {
    "num_layers": (int, "transformer layers"),
    "hidden_size": (int, "hidden size"),
    "num_attention_heads": (int, "attention heads"),
    "num_query_groups": (int, "key/value head groups (GQA)"),
    "ffn_hidden_size": (int, "MLP hidden size"),
    "kv_channels": (int, "head dimension"),
    "max_position_embeddings": (int, "RoPE table length (at least the pack length)"),
    "init_method_std": (float, "std of the random init"),
}
_FROM_RECIPE = "the recipe's / the checkpoint's"


class _Parser(argparse.ArgumentParser):
    """argparse that speaks once under torchrun: usage errors and ``--help`` only on rank 0, same exit code."""

    def print_help(self, file=None) -> None:
        if is_rank0():
            super().print_help(file)

    def error(self, message: str):
        if is_rank0():
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", dest="model_recipe", default=None, choices=["solo-7b", "tiny", "debug"],
        help="model recipe (ours); unset: the architecture of the checkpoint the run starts from, else tiny",
    )  # fmt: skip
    for name, (typ, what) in _MODEL_FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=f"{what} (unset: {_FROM_RECIPE})")
    g.add_argument(
        "--sliding-window", type=int, default=None,
        help=f"attention window: tokens a query sees, itself included; 0 = full causal (unset: {_FROM_RECIPE})",
    )  # fmt: skip
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None, help="activation recompute")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None, help="with full recompute")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="layers per recompute group (full)")
    g.add_argument(
        "--language-model-type", choices=["gpt", "hybrid", "auto"], default="gpt",
        help="megatron-core language model under the projector (ours): GPTModel, HybridModel (attention + MLP "
        "layers; megatron-core >= 0.19) or auto (hybrid where available); same math and checkpoints",
    )  # fmt: skip
    g.add_argument("--bf16", action="store_true", help="bf16 params/compute (the default on GPU)")
    g.add_argument("--fp16", action="store_true", help="fp16 params/compute with a loss scaler (GPU only)")
    g.add_argument("--fp32", action="store_true", help="force fp32, also on GPU (the default on CPU)")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16: static loss scale (unset: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32, help="fp16: initial dynamic loss scale")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16: minimum dynamic loss scale")
    g.add_argument("--loss-scale-window", type=float, default=1000, help="fp16: iterations between scale increases")
    g.add_argument("--hysteresis", type=int, default=2, help="fp16: overflows tolerated before the scale drops")


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP: ranks sharing each layer")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP: pipeline stages")
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage", type=int, default=None,
        help="interleaved (virtual) pipeline: layers per model chunk (needs PP > 1)",
    )  # fmt: skip
    g.add_argument("--sequence-parallel", action="store_true", help="shard norms/dropout activations over TP")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="shard optimizer state over DP (ZeRO-1)")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="overlap the DP grad reduction with backward")
    g.add_argument("--overlap-param-gather", action="store_true", help="overlap the param all-gather (dist-opt)")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=[], help='shard-set dirs: "p" or "w1 p1 w2 p2 ..." (required)')
    g.add_argument("--valid-data-path", nargs="+", default=[], help="held-out shard set(s) for validation")
    g.add_argument("--vision-fraction", type=float, default=None, help="target share of vision tokens (ours)")
    g.add_argument(
        "--tokenizer-model", default=None,
        help="SOLO SentencePiece model (unset: the checkpoint's, else the first shard set's manifest's)",
    )  # fmt: skip
    g.add_argument("--seq-length", type=int, default=None, help="pack length, checked against the shards")


def _add_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="packs per micro-batch per DP rank")
    g.add_argument("--global-batch-size", type=int, default=8, help="packs per optimizer step (all DP ranks)")
    g.add_argument("--train-iters", type=int, default=None, help="iterations to train (or --train-samples)")
    g.add_argument(
        "--train-samples", type=int, default=None,
        help="samples (packs) to train: train_samples // GBS iterations; one epoch of the blend is its "
        "samples/epoch, printed at start",
    )  # fmt: skip
    g.add_argument("--exit-interval", type=int, default=None, help="exit (saving) at iterations divisible by it")
    g.add_argument(
        "--exit-duration-in-mins", type=float, default=None,
        help="exit (saving) after this many minutes of training; all ranks agree on the step",
    )  # fmt: skip
    g.add_argument(
        "--exit-signal-handler", action="store_true",
        help="on SIGTERM (SLURM before preemption / the time limit): finish the step, save, exit 0",
    )  # fmt: skip
    g.add_argument("--seed", type=int, default=1234, help="init, data order and dropout seed")
    g.add_argument("--eval-interval", type=int, default=0, help="validate every N iterations (0: at the end only)")
    g.add_argument("--eval-iters", type=int, default=1, help="global batches per validation")


def _add_eval_tasks(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation during training (ours)")
    g.add_argument(
        "--eval-tasks", nargs="+", action="extend", default=[], metavar="SPEC",
        help="downstream tasks the model answers in process, e.g. vqa=vqa:val.jsonl cap=caption:coco.jsonl "
        "(megatron_solo/eval task files; greedy, rendered with the run's chat template); needs --eval-tasks-interval",
    )  # fmt: skip
    g.add_argument(
        "--eval-tasks-interval", type=int, default=0,
        help="score the tasks at iterations 0, N, 2N, ... and the last; logged next to the losses",
    )  # fmt: skip
    g.add_argument("--eval-tasks-samples", type=int, default=None, help="items per task (unset: all)")
    g.add_argument("--eval-tasks-max-new-tokens", type=int, default=16, help="answer length limit")
    g.add_argument("--eval-tasks-batch-size", type=int, default=16, help="prompts per forward per DP replica")


def _add_optimizer(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--optimizer", choices=["adam"], default="adam", help="optimizer (AdamW, decoupled decay)")
    g.add_argument("--lr", type=float, required=True, help="peak learning rate (required)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--weight-decay", type=float, default=0.01, help="weight decay (constant)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global grad-norm clip")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument(
        "--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"], default="cosine",
        help="decay after the warm-up",
    )  # fmt: skip
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="warm-up iterations (with --train-iters)")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="warm-up samples (with --train-samples)")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warm-up as a fraction of the decay")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="decay iterations (unset: --train-iters)")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="decay samples (unset: --train-samples)")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate at the start of the warm-up")
    g.add_argument(
        "--override-opt-param-scheduler", action="store_true",
        help="on resume: use the flags' schedule, not the checkpoint's (the step count continues)",
    )  # fmt: skip
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler", dest="use_checkpoint_opt_param_scheduler", action="store_true",
        help="on resume: keep the checkpoint's schedule, whatever the flags say",
    )  # fmt: skip


def _add_checkpointing(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint dir to write")
    g.add_argument("--load", default=None, help="checkpoint dir to resume from (may be empty: then a new run)")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations")
    g.add_argument(
        "--pretrained-checkpoint", default=None,
        help="start from these weights only (fresh optimizer + schedule), unless --load holds a trainer checkpoint",
    )  # fmt: skip
    g.add_argument("--finetune", action="store_true", help="with --load: weights only, iteration 0")
    g.add_argument("--no-load-optim", action="store_true", help="resume without the optimizer state and schedule")
    g.add_argument("--no-load-rng", action="store_true", help="resume without the RNG states")
    g.add_argument("--no-save-optim", action="store_true", help="save weights and trainer state, no optimizer")
    g.add_argument("--no-save-at-exit", dest="save_at_exit", action="store_false", help="no checkpoint at exit")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist", help="checkpoint format")


def _add_logging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1, help="console line every N iterations")
    g.add_argument(
        "--log-throughput", action="store_true", help="console: tokens/s, TFLOP/s per GPU and MFU (always logged)"
    )
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard event dir")
    g.add_argument("--wandb-project", default=None, help="Weights & Biases project (pip install wandb)")
    g.add_argument("--wandb-exp-name", default=None, help="W&B run name")
    g.add_argument("--wandb-save-dir", default=None, help="W&B local dir (unset: <save>/wandb, else ./wandb)")
    g.add_argument("--metrics-log", default=None, help="JSON-lines per-step metrics file (ours, rank 0)")
    g.add_argument("--peak-tflops", type=float, default=None, help="per-GPU peak TFLOP/s for MFU (ours)")
    g.add_argument("--progress-bar", action="store_true", help="tqdm bar instead of one console line per step (ours)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pretrain_solo.py",
        description="SOLO pre-training on Megatron-Core (Megatron-LM flag names; 'ours' marks the others)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    adders = (
        _add_model, _add_parallel, _add_data, _add_training, _add_eval_tasks, _add_optimizer, _add_checkpointing,
        _add_logging,
    )  # fmt: skip
    for add in adders:
        add(p)
    return p


def _precision(a: argparse.Namespace) -> tuple[bool, bool]:
    """(bf16, fp16): --bf16 / --fp16 / --fp32, default bf16 on GPU and fp32 on CPU."""
    if sum(map(bool, (a.bf16, a.fp16, a.fp32))) > 1:
        raise SetupError("--bf16, --fp16 and --fp32 exclude each other: pass one")
    if a.fp16 and not torch.cuda.is_available():
        raise SetupError(
            "--fp16 needs a GPU (half-precision compute and megatron's loss scaler); on CPU train in fp32 (the "
            "default): drop --fp16"
        )
    bf16 = (a.bf16 or torch.cuda.is_available()) and not (a.fp32 or a.fp16)
    return bf16, bool(a.fp16)


def _check_schedule_flags(a: argparse.Namespace) -> None:
    """Megatron-LM's rules: iterations-based and samples-based flags do not mix; one warm-up spelling."""
    if (a.train_iters is None) == (a.train_samples is None):
        raise SetupError("pass exactly one of --train-iters and --train-samples")
    if a.train_samples is not None:
        pairs = (("--lr-decay-iters", a.lr_decay_iters), ("--lr-warmup-iters", a.lr_warmup_iters))
        given = [f for f, v in pairs if v]
        if given:
            raise SetupError(
                f"--train-samples counts samples: use --lr-decay-samples / --lr-warmup-samples, not {given}"
            )  # noqa: E501
        if a.train_samples < a.global_batch_size:
            raise SetupError(f"--train-samples {a.train_samples} < --global-batch-size {a.global_batch_size}: no step")
    else:
        pairs = (("--lr-decay-samples", a.lr_decay_samples), ("--lr-warmup-samples", a.lr_warmup_samples))
        given = [f for f, v in pairs if v]
        if given:
            raise SetupError(f"--train-iters counts iterations: use --lr-decay-iters / --lr-warmup-iters, not {given}")
    if a.lr_warmup_fraction is not None and (a.lr_warmup_iters or a.lr_warmup_samples):
        raise SetupError("--lr-warmup-fraction replaces --lr-warmup-iters / --lr-warmup-samples: pass one of them")
    if a.lr_warmup_fraction is not None and not 0.0 <= a.lr_warmup_fraction < 1.0:
        raise SetupError(f"--lr-warmup-fraction {a.lr_warmup_fraction} must be in [0, 1)")


def _check_layout_flags(a: argparse.Namespace) -> None:
    for flag, value in (
        ("--tensor-model-parallel-size", a.tensor_model_parallel_size),
        ("--pipeline-model-parallel-size", a.pipeline_model_parallel_size),
        ("--micro-batch-size", a.micro_batch_size),
        ("--global-batch-size", a.global_batch_size),
    ):
        if value < 1:
            raise SetupError(f"{flag} {value} must be >= 1")
    if a.global_batch_size % a.micro_batch_size:
        raise SetupError(f"--global-batch-size {a.global_batch_size} is not a multiple of --micro-batch-size {a.micro_batch_size}")  # fmt: skip  # noqa: E501
    if a.num_layers_per_virtual_pipeline_stage is not None:
        if a.pipeline_model_parallel_size < 2:
            raise SetupError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2")
        if a.num_layers_per_virtual_pipeline_stage < 1:
            raise SetupError("--num-layers-per-virtual-pipeline-stage must be >= 1")
    if a.sequence_parallel and a.tensor_model_parallel_size == 1:
        a.sequence_parallel = False  # as Megatron-LM: nothing to shard over


def _eval_tasks_args(a: argparse.Namespace) -> EvalTasksArgs:
    if a.eval_tasks and a.eval_tasks_interval < 1:
        raise SetupError("--eval-tasks needs --eval-tasks-interval N >= 1 (score every N iterations)")
    if a.eval_tasks_interval and not a.eval_tasks:
        raise SetupError("--eval-tasks-interval without --eval-tasks: name the tasks to score")
    for flag, v in (("--eval-tasks-samples", a.eval_tasks_samples), ("--eval-tasks-max-new-tokens",
                    a.eval_tasks_max_new_tokens), ("--eval-tasks-batch-size", a.eval_tasks_batch_size)):  # fmt: skip
        if v is not None and v < 1:
            raise SetupError(f"{flag} {v} must be >= 1")
    return EvalTasksArgs(
        list(a.eval_tasks), a.eval_tasks_interval, a.eval_tasks_samples, a.eval_tasks_max_new_tokens,
        a.eval_tasks_batch_size,
    )  # fmt: skip


def _optimizer_config(a: argparse.Namespace, bf16: bool, fp16: bool):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer=a.optimizer,
        lr=a.lr,
        min_lr=a.min_lr,
        weight_decay=a.weight_decay,
        adam_beta1=a.adam_beta1,
        adam_beta2=a.adam_beta2,
        adam_eps=a.adam_eps,
        clip_grad=a.clip_grad,
        bf16=bf16,
        fp16=fp16,
        params_dtype=torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32,
        loss_scale=a.loss_scale,
        initial_loss_scale=a.initial_loss_scale,
        min_loss_scale=a.min_loss_scale,
        loss_scale_window=a.loss_scale_window,
        hysteresis=a.hysteresis,
        use_distributed_optimizer=a.use_distributed_optimizer,
    )


def parse_args(argv: list[str] | None = None) -> RunArgs:
    """Parse once; each component gets its own dataclass. Raises SetupError for contradictory flags."""
    a = build_parser().parse_args(argv)
    if not a.data_path:
        raise SetupError("--data-path is required (one shard-set dir, or 'w1 p1 w2 p2 ...')")
    bf16, fp16 = _precision(a)
    _check_schedule_flags(a)
    _check_layout_flags(a)
    overrides = {k: getattr(a, k) for k in _MODEL_FLAGS if getattr(a, k) is not None}
    if a.sliding_window is not None:
        overrides["window_size"] = (a.sliding_window - 1, 0) if a.sliding_window > 0 else None
    if a.seq_length is not None:
        overrides["seq_length"] = a.seq_length
    train_iters = a.train_iters if a.train_iters is not None else a.train_samples // a.global_batch_size
    return RunArgs(
        parallel=ParallelArgs(
            tensor_model_parallel_size=a.tensor_model_parallel_size,
            sequence_parallel=a.sequence_parallel,
            use_distributed_optimizer=a.use_distributed_optimizer,
            overlap_grad_reduce=a.overlap_grad_reduce,
            overlap_param_gather=a.overlap_param_gather,
            pipeline_model_parallel_size=a.pipeline_model_parallel_size,
            num_layers_per_virtual_pipeline_stage=a.num_layers_per_virtual_pipeline_stage,
        ),
        data=DataArgs(a.data_path, a.valid_data_path, a.vision_fraction, a.tokenizer_model, a.seq_length),
        train=TrainArgs(
            micro_batch_size=a.micro_batch_size,
            global_batch_size=a.global_batch_size,
            train_iters=train_iters,
            seed=a.seed,
            eval_interval=a.eval_interval,
            eval_iters=a.eval_iters,
            exit_interval=a.exit_interval,
            train_samples=a.train_samples,
            exit_duration_in_mins=a.exit_duration_in_mins,
            exit_signal_handler=a.exit_signal_handler,
        ),
        optim=_optimizer_config(a, bf16, fp16),
        sched=SchedulerArgs(
            lr_decay_style=a.lr_decay_style,
            lr_warmup_iters=a.lr_warmup_iters,
            lr_decay_iters=a.lr_decay_iters,
            lr_warmup_init=a.lr_warmup_init,
            override_opt_param_scheduler=a.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=a.use_checkpoint_opt_param_scheduler,
            lr_warmup_fraction=a.lr_warmup_fraction,
            lr_warmup_samples=a.lr_warmup_samples,
            lr_decay_samples=a.lr_decay_samples,
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
        log=LogArgs(
            log_interval=a.log_interval,
            tensorboard_dir=a.tensorboard_dir,
            metrics_log=a.metrics_log,
            peak_tflops=a.peak_tflops,
            progress_bar=a.progress_bar,
            log_throughput=a.log_throughput,
            wandb_project=a.wandb_project,
            wandb_exp_name=a.wandb_exp_name,
            wandb_save_dir=a.wandb_save_dir,
        ),
        model=ModelArgs(
            model_recipe=a.model_recipe,
            overrides=overrides,
            recompute_granularity=a.recompute_granularity,
            recompute_method=a.recompute_method,
            recompute_num_layers=a.recompute_num_layers,
            language_model_type=a.language_model_type,
        ),
        eval_tasks=_eval_tasks_args(a),
        bf16=bf16,
        fp16=fp16,
    )


# Fields that fix the shapes of the weights (a recipe named with --model must agree with the checkpoint on them).
SHAPE_FIELDS = (
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "kv_channels", "ffn_hidden_size",
    "gated_linear_unit", "add_bias_linear", "add_qkv_bias", "patch_dim",
)  # fmt: skip


def _norm(v):
    return list(v) if isinstance(v, tuple | list) else v


def check_against_checkpoint(args: RunArgs, arch: dict, where: str) -> None:
    """Flags may not contradict the architecture of the checkpoint the run starts from (``where`` names it)."""
    clash = {
        k: (v, arch.get(k))
        for k, v in args.model.overrides.items()
        if k not in ("seq_length", "max_position_embeddings") and _norm(v) != _norm(arch.get(k))
    }
    if clash:
        rows = ", ".join(f"{k}: flag {_norm(f)} vs checkpoint {_norm(c)}" for k, (f, c) in clash.items())
        raise SetupError(
            f"model flags contradict {where}/solo_config.json ({rows}); a checkpoint fixes the architecture: drop "
            "these flags (or start a new run from scratch with another --save)"
        )
    if args.model.model_recipe is not None:
        from megatron_solo.model import config_to_dict, recipe

        ids = {k: arch[k] for k in ("vocab_size", "vpatch_id", "first_special_id") if k in arch}
        # the recipe as the flags modify it (`--model debug --num-layers 4` names a 4-layer checkpoint's shapes)
        want = config_to_dict(recipe(args.model.model_recipe, **ids, **args.model.overrides))
        diff = {k: (want.get(k), arch.get(k)) for k in SHAPE_FIELDS if _norm(want.get(k)) != _norm(arch.get(k))}
        if diff:
            rows = ", ".join(f"{k} {r} vs {c}" for k, (r, c) in diff.items())
            raise SetupError(
                f"--model {args.model.model_recipe} does not match {where} (recipe vs checkpoint: {rows}); drop "
                "--model to continue with the checkpoint's architecture, or start a new run without that checkpoint"
            )


def model_config(
    args: RunArgs,
    vocab_size: int,
    seq_length: int,
    special_ids: tuple[int, int],
    arch: dict | None = None,
    virtual_stages: int | None = None,
):
    """The run's SoloConfig: recipe (or a checkpoint's architecture ``arch``) + flag overrides + the run's layout.

    ``seq_length`` is the data's pack length (RoPE tables cover at least it); ``special_ids`` the tokenizer's
    ``(vpatch_id, first_special_id)``. Call :func:`check_against_checkpoint` first when ``arch`` is given.
    ``virtual_stages``: model chunks per pipeline rank (> 1: the interleaved schedule); the layer count it is
    derived from is the config's own, so training/plan.py builds once without, validates the layout, and again.

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
        fp16=args.fp16,
        params_dtype=args.params_dtype,
        pipeline_dtype=args.params_dtype,
        language_model_type=args.model.language_model_type,
    )
    if virtual_stages is not None and virtual_stages > 1:
        # Megatron-LM's interleaved defaults: overlapped, unbatched P2P. The batched path (batch_isend_irecv) posts
        # send-to-prev before send-to-next; at PP=2 both peers are the same rank, and a backend that matches one
        # peer's messages in posting order (gloo) then swaps activations and gradients of equal shape: silently
        # wrong losses.
        fields.update(virtual_pipeline_model_parallel_size=virtual_stages, overlap_p2p_comm=True, batch_p2p_comm=False)
    if args.model.recompute_granularity is not None:
        fields["recompute_granularity"] = args.model.recompute_granularity
        if args.model.recompute_granularity == "full":
            fields["recompute_method"] = args.model.recompute_method or "uniform"
            fields["recompute_num_layers"] = args.model.recompute_num_layers or 1
    fields["seq_length"] = seq_length
    if arch is not None:  # architecture of the checkpoint the run starts from
        fields["max_position_embeddings"] = max(arch.get("max_position_embeddings", 0), seq_length)
        if (arch.get("vpatch_id"), arch.get("first_special_id"), arch.get("vocab_size")) != (*special_ids, vocab_size):
            raise SetupError(
                f"the checkpoint's vocab ({arch.get('vocab_size')}, <vpatch>={arch.get('vpatch_id')}) does not match "
                f"the tokenizer ({vocab_size}, <vpatch>={special_ids[0]}): pass the checkpoint's tokenizer.model as "
                "--tokenizer-model (and shards built with it)"
            )
        return config_from_dict(arch, **fields)
    fields["vpatch_id"], fields["first_special_id"] = special_ids
    if "max_position_embeddings" not in args.model.overrides:
        fields["max_position_embeddings"] = seq_length
    return recipe(args.model.model_recipe or "tiny", **fields)
