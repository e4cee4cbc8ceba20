"""Trainer checkpoints: the SOLO checkpoint layout (convert/checkpoint_io.py) + optimizer, schedule, trainer state.

Layout (model part identical to an HF import, so ``export_hf`` / ``generate`` read trainer checkpoints)::

    <save>/latest_checkpointed_iteration.txt      written LAST (atomically): names the last complete checkpoint
    <save>/tokenizer.model
    <save>/iter_0000100/                          dist_checkpointing (torch_dist) of
        {"model": model.sharded_state_dict(),     same keys as an import
         "optimizer": ...,                        distributed optimizer: 'fully_reshardable' (any TP/DP on load)
         "opt_param_scheduler": ..., "trainer": {"iteration", "consumed_samples"}}
    <save>/iter_0000100/solo_config.json, tokenizer.model, trainer_state.json, rng/rank_00000.pt ...

Atomic: everything is written into ``iter_0000100.tmp`` and renamed once complete; the tracker is replaced
afterwards. A crash mid-save leaves the previous checkpoint and tracker untouched (a stale ``.tmp`` is removed by
the next save). RNG states are per global rank and restored only when the world layout is unchanged.

megatron-core 0.16 (torch Adam, no Apex/TE): the distributed optimizer's default 'fully_sharded_model_space' format
fails to save, so 'fully_reshardable' is used; loading needs a primed optimizer state (``step`` present) and a
state copy that skips ``step`` and runs under no_grad (see ``_fix_distopt_state_copy``).
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_solo.convert.checkpoint_io import (
    begin_iteration_dir,
    commit_iteration_dir,
    iteration_dirs,
    load_model_weights,
    resolve_iteration_dir,
    writer_queue_dies_with_rank,
)
from megatron_solo.training.optimizer import TrainState

TRAINER_STATE = "trainer_state.json"
KILL_IN_SAVE_ITER = "SOLO_TEST_KILL_IN_SAVE_ITER"
"""Test hook (fault injection): SIGKILL rank 0 once the temp dir of this iteration's save is written."""
DISTOPT_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _optimizers(optimizer))


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


_FIXED = False


def _fix_distopt_state_copy() -> None:
    """megatron-core <= 0.19 with torch Adam: ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies
    every key of the live state, including ``step`` (absent from the loaded tensors: KeyError), and writes into
    fp32 main params that are views of leaf params outside no_grad. Copy the loaded keys only, under no_grad."""
    global _FIXED
    if _FIXED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_states(self, model_param, tensors):
        if getattr(self.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False):
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, value in tensors.items():
                if key in dst and isinstance(value, torch.Tensor):
                    dst[key].copy_(value)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states
    _FIXED = True


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
    from megatron_solo.model.pipeline import sharded_model_state

    sd: dict = sharded_model_state(_modules(model))
    if with_optim:
        if loading:
            prime_optimizer_state(optimizer)
        meta = DISTOPT_FORMAT if _is_distributed(optimizer) else None
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
    save_dir: str | os.PathLike,
    state: TrainState,
    ddp,
    optimizer,
    scheduler,
    config,
    tokenizer_model: str | os.PathLike | None = None,
    layout: dict | None = None,
    save_optim: bool = True,
) -> Path:
    """Collective. Writes ``iter_{state.iteration}`` atomically, then points the tracker at it. ``ddp``: the DDP
    model, or the list of its pipeline chunks."""
    from megatron.core import dist_checkpointing

    root = Path(save_dir)
    rank = dist.get_rank()
    final, tmp = iteration_dirs(root, state.iteration)
    if rank == 0:
        begin_iteration_dir(root, state.iteration)
    dist.barrier()
    writer_queue_dies_with_rank()
    dist_checkpointing.save(_sharded_state(ddp, optimizer, scheduler, state, save_optim, loading=False), str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    dist.barrier()
    if os.environ.get(KILL_IN_SAVE_ITER) == str(state.iteration):
        if rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier()
    if rank == 0:
        trainer = {
            "iteration": state.iteration,
            "consumed_samples": state.consumed_samples,
            "world_size": dist.get_world_size(),
            "has_optimizer": save_optim,
            **(layout or {}),
        }
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer, indent=2) + "\n")
        commit_iteration_dir(root, final, tmp, state.iteration, config, tokenizer_model)
    dist.barrier()
    return final


def checkpoint_has_trainer_state(load_dir: str | os.PathLike) -> bool:
    """True when ``load_dir`` holds a trainer checkpoint (trainer state, usually the optimizer too), not an import."""
    try:
        it_dir = resolve_iteration_dir(load_dir)
    except FileNotFoundError:
        return False
    path = it_dir / TRAINER_STATE
    return path.exists()


def load_weights(ddp, optimizer, load_dir: str | os.PathLike) -> Path:
    """Collective: model weights only (any TP/PP/DP of the saved run; an HF import or a trainer checkpoint), copied
    into the optimizer's main params too; the optimizer state and schedule stay fresh."""
    it_dir = resolve_iteration_dir(load_dir)
    load_model_weights(_modules(ddp), it_dir)
    optimizer.reload_model_params()
    return it_dir


def _load_model_state(model, state: dict) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing}, unexpected {unexpected}")


def load_checkpoint(
    load_dir: str | os.PathLike,
    ddp,
    optimizer,
    scheduler,
    load_optim: bool = True,
    load_rng: bool = True,
) -> TrainState:
    """Collective: resume a trainer checkpoint (weights, optimizer, schedule, iteration, consumed samples, RNG).

    Works at another TP / PP / DP than the save (model and 'fully_reshardable' optimizer state are resharded:
    every key is global, layer indices included).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    it_dir = resolve_iteration_dir(load_dir)
    meta = json.loads((it_dir / TRAINER_STATE).read_text())
    with_optim = load_optim and meta.get("has_optimizer", False)
    if with_optim and _is_distributed(optimizer):
        _fix_distopt_state_copy()
    request = _sharded_state(ddp, optimizer, scheduler, None, with_optim, loading=True)
    loaded = dist_checkpointing.load(request, str(it_dir))
    modules = _modules(ddp)
    for k, module in enumerate(modules):
        _load_model_state(module, loaded["model" if len(modules) == 1 else f"model{k}"])
    if with_optim:
        optimizer.load_state_dict(loaded["optimizer"])
        unshare_adam_steps(optimizer)
        scheduler.load_state_dict(loaded["opt_param_scheduler"])  # (fp32 main params came with the optimizer)
    else:
        optimizer.reload_model_params()  # main params were copied from the initial weights at build time
    trainer = loaded.get("trainer") or meta
    rng_file = it_dir / "rng" / f"rank_{dist.get_rank():05d}.pt"
    same_layout = (
        meta.get("world_size") == dist.get_world_size()
        and meta.get("tensor_model_parallel_size") == ps.get_tensor_model_parallel_world_size()
        and meta.get("pipeline_model_parallel_size", 1) == ps.get_pipeline_model_parallel_world_size()
        and meta.get("virtual_pipeline_model_parallel_size") == ps.get_virtual_pipeline_model_parallel_world_size()
    )
    if load_rng and same_layout and rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(iteration=int(trainer["iteration"]), consumed_samples=int(trainer["consumed_samples"]))
