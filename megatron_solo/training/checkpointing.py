"""What the trainer puts into a SOLO checkpoint besides the weights: optimizer, schedule, trainer counters, RNG.

The layout, the atomic commit, the one save and where a run starts belong to ``megatron_solo.checkpoint``; this
module builds the trainer's sharded state dict and restores it::

    {"model": model.sharded_state_dict(),      same keys as an HF import (export_hf / generate read them);
                                               "model0", "model1", .. per virtual pipeline chunk (global keys)
     "optimizer": ...,                         distributed optimizer: 'fully_reshardable' (any TP/PP/DP on load)
     "opt_param_scheduler": ..., "trainer": {"iteration", "consumed_samples"}}
    + trainer_state.json (iteration, samples, world layout, optimizer kind) + rng/rank_XXXXX.pt per global rank

RNG states are restored only when the world layout (world size, TP, PP, virtual stages) is unchanged.

megatron-core 0.16 (torch Adam, no Apex/TE): the distributed optimizer's default 'fully_sharded_model_space' format
fails to save, so 'fully_reshardable' is used; loading needs a primed optimizer state (``step`` present) and a
state copy that skips ``step`` and runs under no_grad (``platform.patch_distopt_state_copy``).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_solo import checkpoint, platform
from megatron_solo.checkpoint import Checkpoint
from megatron_solo.training.optimizer import TrainState

DISTOPT_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _optimizers(optimizer))


def saved_with_distributed_optimizer(ckpt: Checkpoint) -> bool | None:
    """Whether a trainer checkpoint holds distributed-optimizer state (None: no optimizer state in it)."""
    meta = ckpt.trainer_state or {}
    if not meta.get("has_optimizer", False):
        return None
    if "use_distributed_optimizer" in meta:
        return bool(meta["use_distributed_optimizer"])
    # checkpoints written before trainer_state.json recorded it: megatron's DistributedOptimizer marks its format
    return "param_state_sharding_type" in (ckpt.common_state.get("optimizer") or {})


def prime_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam a zero state (incl. ``step``) so its sharded state dict can be built for loading."""
    for o in _optimizers(optimizer):
        inner = o.optimizer
        if not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            init = getattr(o, "init_state_fn", None)
            if init is not None:
                init(inner, getattr(o, "config", None))
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state[p]
                if "step" not in st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st.setdefault("exp_avg", torch.zeros_like(p, memory_format=torch.preserve_format))
                    st.setdefault("exp_avg_sq", torch.zeros_like(p, memory_format=torch.preserve_format))


def unshare_adam_steps(optimizer) -> None:
    """After ``DistributedOptimizer.load_state_dict`` with torch Adam (no Apex/TE), every param's ``step`` is ONE
    shared tensor (megatron-core <= 0.19), so the next ``optimizer.step()`` would add 1 per param to it and break the
    bias correction: a resumed run would diverge from the uninterrupted one at its second step. Give each its own."""
    for o in _optimizers(optimizer):
        for st in o.optimizer.state.values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].detach().clone()


def _modules(model) -> list:
    """The unwrapped SoloModel chunks of a DDP module or a list of them (one per virtual pipeline stage)."""
    return [getattr(c, "module", c) for c in (model if isinstance(model, list | tuple) else [model])]


def _sharded_state(model, optimizer, scheduler, state: TrainState | None, with_optim: bool, loading: bool) -> dict:
    sd: dict = checkpoint.sharded_model_state(_modules(model))
    if with_optim:
        if loading:
            prime_optimizer_state(optimizer)
        meta = DISTOPT_FORMAT if is_distributed(optimizer) else None
        sd["optimizer"] = optimizer.sharded_state_dict(dict(sd), is_loading=loading, metadata=meta)
        sd["opt_param_scheduler"] = scheduler.state_dict()
    if state is not None:
        sd["trainer"] = {"iteration": state.iteration, "consumed_samples": state.consumed_samples}
    return sd


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    out = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(rng: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])


def save_checkpoint(
    save_dir, state: TrainState, ddp, optimizer, scheduler, config, tokenizer_model=None, layout: dict | None = None,
    save_optim: bool = True, chat_template: str | None = None,
) -> Path:  # fmt: skip
    """Collective: the trainer's checkpoint of iteration ``state.iteration`` through ``checkpoint.save``. ``ddp``:
    the DDP model, or the list of its pipeline chunks; ``chat_template``: the template of the run's shards."""
    meta = {
        "iteration": state.iteration,
        "consumed_samples": state.consumed_samples,
        "world_size": dist.get_world_size(),
        "has_optimizer": save_optim,
        "use_distributed_optimizer": is_distributed(optimizer),
        **(layout or {}),
    }
    sharded = _sharded_state(ddp, optimizer, scheduler, state, save_optim, loading=False)
    return checkpoint.save(
        save_dir, state.iteration, sharded, config, tokenizer_model, meta, _rng_state(), chat_template=chat_template
    )


def load_weights(ddp, optimizer, ckpt: Checkpoint) -> None:
    """Collective: model weights only (any TP/PP/DP of the saved run; an HF import or a trainer checkpoint), copied
    into the optimizer's main params too; the optimizer state and schedule stay fresh."""
    checkpoint.load_model_weights(_modules(ddp), ckpt)
    optimizer.reload_model_params()


def _load_model_state(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")


def load_checkpoint(
    ckpt: Checkpoint, ddp, optimizer, scheduler, load_optim: bool = True, load_rng: bool = True
) -> TrainState:
    """Collective: resume a trainer checkpoint (weights, optimizer, schedule, iteration, consumed samples, RNG).

    Works at another TP / PP / DP than the save (model and 'fully_reshardable' optimizer state are resharded:
    every key is global, layer indices included).
    """
    from megatron.core import parallel_state as ps

    meta = ckpt.trainer_state
    with_optim = load_optim and meta.get("has_optimizer", False)
    if with_optim and is_distributed(optimizer):
        platform.patch_distopt_state_copy()
    request = _sharded_state(ddp, optimizer, scheduler, None, with_optim, loading=True)
    loaded = checkpoint.load(ckpt, request)
    modules = _modules(ddp)
    for module, name in zip(modules, checkpoint.model_part_names(len(modules)), strict=True):
        _load_model_state(module, loaded[name])
    if with_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])  # (fp32 main params came with the optimizer)
    else:
        optimizer.reload_model_params()  # main params were copied from the initial weights at build time
    trainer = loaded.get("trainer") or meta
    rng_file = ckpt.rng_file(dist.get_rank())
    same_layout = (
        meta.get("world_size") == dist.get_world_size()
        and meta.get("tensor_model_parallel_size") == ps.get_tensor_model_parallel_world_size()
        and meta.get("pipeline_model_parallel_size", 1) == ps.get_pipeline_model_parallel_world_size()
        and meta.get("virtual_pipeline_model_parallel_size") == ps.get_virtual_pipeline_model_parallel_world_size()
    )
    if load_rng and same_layout and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(iteration=int(trainer["iteration"]), consumed_samples=int(trainer["consumed_samples"]))
