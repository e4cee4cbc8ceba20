"""Everything a run decides before process groups exist: where it starts, tokenizer, data, model config, layout.

``plan_run(args)`` reads only flags and files, so every rank computes the same plan and a run that cannot start
stops here with ONE :class:`SetupError` (rank 0 prints it; errors.py) instead of a traceback from every rank deep
inside megatron-core. Checked here: the checkpoint the run starts from (``megatron_solo.checkpoint.resolve_start``),
flags vs its architecture and ``--model``, optimizer kind and schedule vs a resumed checkpoint, the data paths,
tokenizer vs shards, and the world layout (TP x PP x DP, batch sizes, layers over pipeline / virtual stages, the
interleaved schedule's micro-batch rule). The plan's config carries the virtual-stage count the process groups
are then built with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from megatron_solo import checkpoint
from megatron_solo.checkpoint import CheckpointError, CheckpointNotFound, RunStart
from megatron_solo.training.arguments import RunArgs, check_against_checkpoint, model_config
from megatron_solo.training.errors import SetupError


@dataclass
class RunPlan:
    start: RunStart
    tokenizer_path: str
    train_data: object  # data.blend.BlendedPacks
    valid_data: object | None
    seq_length: int
    config: object  # model.SoloConfig
    world_size: int
    data_parallel_size: int
    chat_template: str | None = None
    """The template the training shards were rendered with (None: plain only); recorded in every save."""
    eval_tasks: list = field(default_factory=list)
    """``--eval-tasks``, loaded (eval/tasks.py Task objects)."""

    def describe_samples(self, args: RunArgs) -> str:
        """How the run's samples relate to the blend's epoch (one epoch = ``--train-samples <samples/epoch>``)."""
        per_epoch = len(self.train_data)
        total = args.train.train_iters * args.train.global_batch_size
        return (
            f"{args.train.train_iters} iterations x GBS {args.train.global_batch_size} = {total:,} samples = "
            f"{total / per_epoch:.3f} epochs of the blend ({per_epoch:,} samples/epoch: one epoch is "
            f"--train-samples {per_epoch})"
        )


def _start(args: RunArgs) -> RunStart:
    c = args.ckpt
    try:
        return checkpoint.resolve_start(c.load, c.pretrained_checkpoint, c.finetune)
    except (CheckpointNotFound, CheckpointError) as e:
        raise SetupError(str(e)) from None


def resolve_tokenizer(args: RunArgs, start: RunStart) -> str:
    """--tokenizer-model, else the checkpoint's tokenizer.model, else the one the first data set was built with."""
    if args.data.tokenizer_model:
        return args.data.tokenizer_model
    if start.checkpoint is not None:
        try:
            return str(start.checkpoint.tokenizer_path)
        except CheckpointError:
            pass
    from megatron_solo.data.blend import parse_data_path
    from megatron_solo.data.shards import read_manifest

    try:
        path = (read_manifest(parse_data_path(args.data.data_path)[0][1]).get("tokenizer") or {}).get("path")
    except (OSError, ValueError) as e:
        raise SetupError(f"--data-path: {e}") from None
    if path and Path(path).exists():
        return path
    raise SetupError("no tokenizer: pass --tokenizer-model (the SOLO SentencePiece model the shards were built with)")


def _blends(args: RunArgs):
    from megatron_solo.data.blend import build_blend

    def build(flag: str, paths: list[str], **kw):
        try:
            return build_blend(paths, seed=args.train.seed, **kw)
        except (OSError, ValueError) as e:
            msg = str(e)
            raise SetupError(msg if msg.startswith(flag) else f"{flag}: {msg}") from None

    train = build("--data-path", args.data.data_path, vision_fraction=args.data.vision_fraction)
    valid = build("--valid-data-path", args.data.valid_data_path) if args.data.valid_data_path else None
    return train, valid


def run_chat_template(train_data, start: RunStart) -> str | None:
    """The chat template of the run: the one non-``plain`` template the training sets' conversational sources were
    rendered with (their manifests), else the starting checkpoint's; SetupError when the sets disagree. ``plain``
    (captions, text) mixes with any template: it is the absence of one."""
    found: dict[str, list[str]] = {}
    for name, s in zip(train_data.names, train_data.sets):
        for src in s.manifest.get("sources") or []:
            template = (src.get("options") or {}).get("template")
            if template and template != "plain":
                found.setdefault(template, []).append(f"{name} ({src.get('spec', src.get('kind'))})")
    if len(found) > 1:
        rows = "; ".join(f"{t}: {', '.join(where)}" for t, where in found.items())
        raise SetupError(
            f"--data-path: the shard sets were rendered with different chat templates ({rows}); a model is trained "
            "with one: rebuild one side with the other's template=..."
        )
    if found:
        return next(iter(found))
    return start.checkpoint.chat_template if start.checkpoint is not None else None


def _eval_tasks(args: RunArgs) -> list:
    """``--eval-tasks`` read and validated now (once, before any process group); PP > 1 is refused here."""
    if not args.eval_tasks.specs:
        return []
    if args.parallel.pipeline_model_parallel_size > 1:
        raise SetupError(
            "--eval-tasks needs the whole model on every rank: not supported with --pipeline-model-parallel-size > 1 "
            "(evaluate saved checkpoints with `python -m megatron_solo.evaluate` instead)"
        )
    import contextlib
    import io

    from megatron_solo.training.errors import is_rank0
    from megatron_solo.training.eval_tasks import load_eval_tasks

    quiet = contextlib.nullcontext() if is_rank0() else contextlib.redirect_stderr(io.StringIO())
    with quiet:  # a skipped-record warning once, from rank 0
        return load_eval_tasks(args.eval_tasks.specs, args.eval_tasks.samples)


def _tokenizer_matches(path: str, train_data) -> object:
    from megatron_solo.format.tokens import SoloTokenizer, TokenizerError

    try:
        tokenizer = SoloTokenizer(path)
    except TokenizerError as e:
        raise SetupError(f"--tokenizer-model: {e}") from None
    ids = train_data.token_ids
    if ids.vpatch != tokenizer.vpatch_id or ids.first_special != tokenizer.first_special_id:
        raise SetupError(
            f"tokenizer {path} (<vpatch>={tokenizer.vpatch_id}) does not match the shards (<vpatch>={ids.vpatch}): "
            "pass the --tokenizer-model the shards were built with"
        )
    return tokenizer


def _layout(args: RunArgs, num_layers: int) -> tuple[int, int, int | None]:
    """(world size, DP size, virtual stages per pipeline rank or None) from torchrun's WORLD_SIZE and the flags;
    Megatron-LM's divisibility rules, checked before any process group exists."""
    p, t = args.parallel, args.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world % (tp * pp):
        raise SetupError(
            f"world size {world} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}: launch a multiple of {tp * pp} processes"
        )
    dp = world // (tp * pp)
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise SetupError(
            f"--global-batch-size {t.global_batch_size} is not divisible by --micro-batch-size {t.micro_batch_size}"
            f" x data-parallel size {dp} (= world {world} / (TP {tp} x PP {pp}))"
        )
    chunk = p.num_layers_per_virtual_pipeline_stage
    if num_layers % (pp * (chunk or 1)):
        what = f"PP {pp} x --num-layers-per-virtual-pipeline-stage {chunk}" if chunk else f"PP {pp}"
        raise SetupError(f"{num_layers} layers do not split evenly over {what}: choose sizes that divide them")
    vpp = num_layers // (pp * chunk) if chunk else None
    if vpp is None or vpp == 1:  # one chunk per rank: the plain 1F1B schedule
        return world, dp, None
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    if micro % pp:  # megatron-core's interleaved schedule runs the micro-batches in groups of PP
        raise SetupError(
            f"the interleaved pipeline schedule ({vpp} virtual stages per rank) needs the micro-batches per step "
            f"({micro} = GBS {t.global_batch_size} / (MBS {t.micro_batch_size} x DP {dp})) to be a multiple of "
            f"PP {pp}: change --global-batch-size, or drop --num-layers-per-virtual-pipeline-stage"
        )
    return world, dp, vpp


def _config_and_layout(args: RunArgs, tokenizer, seq_length: int, arch: dict | None) -> tuple[object, int, int]:
    """(SoloConfig, world size, DP size). The virtual-stage count follows from the layer count, so the config is
    built once without virtual stages, the layout checked against its layers, then built with them."""
    special = (tokenizer.vpatch_id, tokenizer.first_special_id)

    def build(virtual_stages: int | None):
        try:
            return model_config(args, tokenizer.vocab_size, seq_length, special, arch, virtual_stages)
        except (TypeError, ValueError) as e:
            raise SetupError(f"invalid model / parallel configuration: {e}") from None

    config = build(None)
    world, dp, vpp = _layout(args, config.num_layers)
    return (config if vpp is None else build(vpp)), world, dp


def _check_resume(args: RunArgs, ckpt: checkpoint.Checkpoint) -> None:
    """A resumed trainer checkpoint: optimizer kind and schedule must match the flags, or say what to pass."""
    from megatron_solo.training.checkpointing import saved_with_distributed_optimizer
    from megatron_solo.training.optimizer import schedule

    if args.ckpt.no_load_optim:
        return
    saved = saved_with_distributed_optimizer(ckpt)
    if saved is None:
        return
    if saved != args.parallel.use_distributed_optimizer:
        how = "with" if saved else "without"
        fix = "pass --use-distributed-optimizer" if saved else "drop --use-distributed-optimizer"
        raise SetupError(
            f"{ckpt.it_dir} was saved {how} the distributed optimizer: {fix} to resume it, or pass --no-load-optim "
            "to continue from its weights with a fresh optimizer state and schedule"
        )
    s = args.sched
    if s.override_opt_param_scheduler or s.use_checkpoint_opt_param_scheduler:
        return
    saved_sched = ckpt.common_state.get("opt_param_scheduler") or {}
    want = schedule(args.optim, s, args.train)
    diff = {
        k: (v, saved_sched[k])
        for k, v in want.items()
        if k in saved_sched
        and (
            v != saved_sched[k] if isinstance(v, str) else abs(v - saved_sched[k]) > 1e-12 * max(1.0, abs(v))
        )  # fmt: skip  # noqa: E501
    }
    if diff:
        rows = ", ".join(f"{k} {v:g} vs {c:g}" if not isinstance(v, str) else f"{k} {v} vs {c}" for k, (v, c) in diff.items())  # fmt: skip  # noqa: E501
        raise SetupError(
            f"the flags' LR / weight-decay schedule differs from the one saved in {ckpt.it_dir} (flags vs checkpoint, "
            f"steps in samples: {rows}): pass --override-opt-param-scheduler to continue with the flags' schedule "
            "from the checkpoint's step, or --use-checkpoint-opt_param-scheduler to keep the checkpoint's"
        )


def plan_run(args: RunArgs) -> RunPlan:
    """The run's plan, or SetupError (see the module docstring). No process group needed."""
    from megatron_solo.training.metrics import wandb_available

    if args.log.wandb_project and not wandb_available():
        raise SetupError("--wandb-project needs the wandb package: pip install wandb (or megatron-solo[wandb])")
    start = _start(args)
    train_data, valid_data = _blends(args)
    tokenizer_path = resolve_tokenizer(args, start)
    tokenizer = _tokenizer_matches(tokenizer_path, train_data)
    seq_length = train_data.seq_length
    if args.data.seq_length is not None and args.data.seq_length != seq_length:
        raise SetupError(f"--seq-length {args.data.seq_length} != the shards' pack length {seq_length}: drop it")
    if valid_data is not None and valid_data.seq_length != seq_length:
        raise SetupError(f"--valid-data-path packs are {valid_data.seq_length} long, the training packs {seq_length}")
    arch = start.architecture
    if arch is not None:
        check_against_checkpoint(args, arch, str(start.checkpoint.it_dir))
    config, world, dp = _config_and_layout(args, tokenizer, seq_length, arch)
    from megatron_solo.training.optimizer import checked_schedule

    checked_schedule(args.optim, args.sched, args.train)
    if start.kind == "resume":
        _check_resume(args, start.checkpoint)
    template = run_chat_template(train_data, start)
    tasks = _eval_tasks(args)
    return RunPlan(start, tokenizer_path, train_data, valid_data, seq_length, config, world, dp, template, tasks)
