"""The ONE place where megatron-solo changes megatron-core's behaviour (every monkeypatch lives here).

1. CPU redirects (``apply_cpu_redirects``): megatron-core's CUDA assumptions, so it runs on a CPU-only torch with
   gloo. Nothing of this runs when CUDA is available: GPU code paths see megatron-core untouched.
2. Fixes on every device, applied by the code that needs them (``patch_distopt_state_copy`` before a distributed-
   optimizer load, ``writer_queue_dies_with_rank`` before a ``dist_checkpointing.save``): see their docstrings.

Each CPU redirect names the megatron-core site that needs it (checked on 0.16.1 and 0.19.2):

- ``current_device``: ``torch.cuda.current_device()`` allocations in TP mappings/layers, the global memory buffer,
  RoPE and DDP grad buffers.
- ``rng``: the CUDA RNG tracker (``model_parallel_cuda_manual_seed``, ``get_cuda_rng_tracker().fork()``) backed by
  the CPU generator.
- ``causal_mask``: ``get_default_causal_mask`` / ``get_sliding_window_causal_mask`` build on ``device="cuda"``.
- ``synchronize`` / ``streams``: ``torch.cuda.synchronize`` (dist_checkpointing save) and
  ``torch.cuda.current_stream`` (0.19 grad-buffer sync) become no-ops.
- ``device_mode``: a TorchFunctionMode turning ``device="cuda"``, ``.cuda()``, ``.to("cuda")`` and
  ``pin_memory=True`` into CPU (~80 hard-coded sites: optimizer, grad scaler, clip_grads, checkpoint exchange).
- ``fake_cuda_type``: ``Tensor.type()`` reports ``torch.cuda.*`` names (``clip_grads`` asserts it; the distributed
  optimizer dispatches on it).

``install_import_shims()`` runs at package import: megatron-core >= 0.17 imports triton unconditionally from one MoE
module; a CPU torch has no triton, so that one module is stubbed (only when triton is absent).
"""

from __future__ import annotations

import functools
import importlib.util
import multiprocessing
import os
import signal
import sys
import types

import torch

_APPLIED: list[str] = []


def on_cpu() -> bool:
    """True when no CUDA device is usable: the redirects below are then needed."""
    return not torch.cuda.is_available()


def install_import_shims() -> None:
    """Stub megatron-core's one unguarded triton import (>= 0.17) when triton is not installed."""
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(name)
    stub.GLOBAL_BLOCK_SIZE = 1024

    def _no_kernel(*_args, **_kwargs):
        raise RuntimeError("paged_stash triton kernels need triton (GPU); it is not installed")

    stub.paged_stash_copy_kernel = stub.paged_stash_pop_kernel = _no_kernel
    sys.modules[name] = stub


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Send every torch call that asks for a CUDA device to the CPU, and report CUDA tensor type names."""

    @staticmethod
    def _is_cuda(device) -> bool:
        if isinstance(device, str):
            return device.startswith("cuda")
        if isinstance(device, torch.device):
            return device.type == "cuda"
        return isinstance(device, int) and not isinstance(device, bool)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and self._is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func is torch.Tensor.to and len(args) > 1 and self._is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_MODE: _CudaToCpuMode | None = None


class _NoOpStream:
    def wait_event(self, *_a, **_k) -> None: ...

    def wait_stream(self, *_a, **_k) -> None: ...

    def synchronize(self) -> None: ...

    def record_event(self, *_a, **_k) -> None:
        return None


def _redirect_cuda_functions() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *_a, **_k: None
    torch.cuda.current_stream = lambda *_a, **_k: _NoOpStream()
    torch.cuda.default_stream = lambda *_a, **_k: _NoOpStream()
    _APPLIED.append("torch.cuda.current_device/synchronize/streams -> cpu/no-op")


def _redirect_rng_tracker() -> None:
    import megatron.core.tensor_parallel.random as mp_random

    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    _APPLIED.append("CUDA RNG tracker -> CPU generator")


def _redirect_causal_masks() -> None:
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    @functools.lru_cache
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq), diagonal=1).bool()

    def get_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
        ones = torch.ones(sq, skv, dtype=torch.bool)
        upper = torch.triu(ones, diagonal=skv - sq - window_size[0])
        return ~torch.tril(upper, diagonal=skv - sq + window_size[1])

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = get_default_causal_mask
        module.get_sliding_window_causal_mask = get_sliding_window_causal_mask
    _APPLIED.append("default / sliding-window causal masks -> cpu")


def _enter_device_mode() -> None:
    global _MODE
    _MODE = _CudaToCpuMode()
    _MODE.__enter__()  # active for the rest of this thread
    _APPLIED.append("TorchFunctionMode: cuda device/.cuda()/pin_memory -> cpu, Tensor.type() -> torch.cuda.*")


def apply_cpu_redirects() -> list[str]:
    """Apply every redirect once (idempotent). No-op when CUDA is available. Returns what was applied."""
    if not on_cpu() or _APPLIED:
        return list(_APPLIED)
    install_import_shims()
    _redirect_cuda_functions()
    _redirect_rng_tracker()
    _redirect_causal_masks()
    _enter_device_mode()
    return list(_APPLIED)


# ---- fixes on every device --------------------------------------------------------------------------------------
_DISTOPT_PATCHED = False


def patch_distopt_state_copy() -> None:
    """megatron-core <= 0.19 with torch Adam (no Apex/TE, GPU too): ``DistributedOptimizer.
    _set_main_param_and_optimizer_states`` copies every key of the live state, including ``step`` (absent from the
    loaded tensors: KeyError), and writes into fp32 main params that are views of leaf params outside no_grad.
    Copy the loaded keys only, under no_grad. Idempotent; the precision-aware optimizer keeps megatron's code."""
    global _DISTOPT_PATCHED
    if _DISTOPT_PATCHED:
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
    _DISTOPT_PATCHED = True


_WRITER_MANAGERS: list = []  # keeps our Manager alive (its finaliser would shut the queue's server down)


def _die_with_parent() -> None:
    """Manager-server initializer: the kernel SIGKILLs this process when its parent (the rank) dies."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the rank died before prctl took effect
        os._exit(0)


def writer_queue_dies_with_rank() -> None:
    """Call before ``dist_checkpointing.save``. megatron-core's torch_dist writer (0.16-0.19) keeps its results queue
    in a spawned multiprocessing Manager server that nothing stops when a rank is SIGKILLed (OOM killer, node
    failure, a test's kill -9): it would live on forever. Pre-create that queue, which megatron caches in
    ``filesystem_async._results_queue``, from a Manager whose server dies with its rank (Linux PR_SET_PDEATHSIG).
    Elsewhere, or if megatron changes, megatron's own is used."""
    from multiprocessing.managers import SyncManager

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if not sys.platform.startswith("linux") or getattr(filesystem_async, "_results_queue", False) is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_die_with_parent)
    _WRITER_MANAGERS.append(manager)
    filesystem_async._results_queue = manager.Queue()
