"""Process-group and Megatron parallel-state setup: one call for torchrun workers, tests and tools."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist

from megatron_solo import platform


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device this rank computes on (its CUDA device, or the CPU)."""
    if platform.on_cpu():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def initialize(
    tensor_model_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 10,
    **model_parallel_kwargs,
) -> None:
    """Init torch.distributed (env from torchrun, or a 1-process world), megatron parallel state and seeds.

    gloo on CPU (with megatron-core's CUDA assumptions redirected), nccl on GPU.
    """
    if platform.on_cpu():
        platform.apply_cpu_redirects()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" not in os.environ:  # plain `python script.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        backend = "gloo" if platform.on_cpu() else "nccl"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))

    from megatron.core import parallel_state, tensor_parallel

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size, **model_parallel_kwargs
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron parallel state and the process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
