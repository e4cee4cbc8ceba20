"""Model, DDP, optimizer and LR/WD schedule from Megatron-Core building blocks."""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_solo.model import SoloConfig
from megatron_solo.model.pipeline import build_model_chunks
from megatron_solo.training.arguments import ParallelArgs, SchedulerArgs


@dataclass
class TrainState:
    """What the loop mutates and checkpoints besides weights / optimizer / scheduler."""

    iteration: int = 0
    consumed_samples: int = 0


def build_model_and_optimizer(
    config: SoloConfig, parallel: ParallelArgs, optim: OptimizerConfig
) -> tuple[list[DistributedDataParallel], object]:
    """This rank's SoloModel chunks (one per virtual pipeline stage, megatron_solo/model/pipeline.py), each wrapped
    in Megatron DDP (grads reduced in fp32), + ``get_megatron_optimizer`` over all of them.

    Sets the config hooks ``get_forward_backward_func`` calls: ``finalize_model_grads_func`` (DP all-reduce /
    reduce-scatter, SP norm grads, division by the global token count) and ``no_sync_func`` (accumulate micro-batch
    grads locally); per chunk with virtual stages, as Megatron-LM does.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather and parallel.use_distributed_optimizer,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None,
    )
    chunks = [
        # Megatron-LM: only the first chunk's grads are bucketed for overlap; later chunks reduce as one bucket.
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m, disable_bucketing=k > 0)
        for k, m in enumerate(build_model_chunks(config))
    ]
    optimizer = get_megatron_optimizer(optim, chunks)
    config.finalize_model_grads_func = finalize_model_grads
    one = len(chunks) == 1
    config.no_sync_func = chunks[0].no_sync if one else [c.no_sync for c in chunks]
    if parallel.overlap_grad_reduce:
        config.grad_sync_func = chunks[0].start_grad_sync if one else [c.start_grad_sync for c in chunks]
    if parallel.overlap_param_gather and parallel.use_distributed_optimizer:
        config.param_sync_func = chunks[0].start_param_sync if one else [c.start_param_sync for c in chunks]
    return chunks, optimizer


def build_scheduler(
    optimizer, optim: OptimizerConfig, sched: SchedulerArgs, train_iters: int
) -> OptimizerParamScheduler:
    """Warm-up then ``lr_decay_style`` decay to ``min_lr`` over ``--lr-decay-iters`` (default ``--train-iters``).

    Steps are iterations (``scheduler.step(1)`` per optimizer step). Weight decay is constant.
    """
    decay = sched.lr_decay_iters or train_iters
    if sched.lr_warmup_iters >= decay:
        raise ValueError(f"--lr-warmup-iters ({sched.lr_warmup_iters}) must be < the decay length ({decay})")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=sched.lr_warmup_init,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=sched.lr_warmup_iters,
        lr_decay_steps=decay,
        lr_decay_style=sched.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=sched.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=sched.override_opt_param_scheduler,
    )
