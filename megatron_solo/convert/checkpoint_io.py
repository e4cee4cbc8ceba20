"""The SOLO checkpoint directory as the converters read and write it (model weights only).

Layout (docs/architecture.md, "Checkpoints")::

    <dir>/latest_checkpointed_iteration.txt     "0" for an import (Megatron-LM's tracker file)
    <dir>/tokenizer.model                       the SOLO-extended SentencePiece model
    <dir>/iter_0000000/                         dist_checkpointing (torch_dist) of {"model": model.sharded_state_dict()}
    <dir>/iter_0000000/solo_config.json         architecture (model/config.py ``config_to_dict``) + TP, padded
                                                vocab and dtype of the saved weights (information only)
    <dir>/iter_0000000/tokenizer.model          copy (an iteration dir is self-describing)

An import has no optimizer / trainer state: the trainer starts from it with a fresh optimizer (``--finetune``
style). A trainer checkpoint (megatron_solo/training/checkpointing.py) has the same model keys plus optimizer,
scheduler and trainer state; every reader here asks only for the model's keys, so those are never read.
Reading accepts the checkpoint root or one ``iter_*`` dir, and finds ``solo_config.json`` / ``tokenizer.model``
in the iteration dir or the root.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import torch

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_NAME = "solo_config.json"
TOKENIZER_NAME = "tokenizer.model"

# Written next to the architecture (model/config.py ``config_to_dict``) for information; not read back as config.
RUN_FIELDS = ("tensor_model_parallel_size", "padded_vocab_size", "params_dtype")


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def config_to_json(config) -> dict:
    """solo_config.json: the architecture (``megatron_solo.model.config.config_to_dict``, the one serialisation of
    SoloConfig) + the TP size, padded vocab and dtype the weights were saved with."""
    from megatron_solo.model.config import config_to_dict

    out = config_to_dict(config)
    out["tensor_model_parallel_size"] = config.tensor_model_parallel_size
    out["padded_vocab_size"] = config.padded_vocab_size
    out["params_dtype"] = str(config.params_dtype).removeprefix("torch.")
    return out


def architecture_of(data: dict) -> dict:
    """solo_config.json -> the architecture dict ``config_from_dict`` takes (run fields dropped)."""
    from megatron_solo.model.config import ARCHITECTURE_FIELDS

    return {k: v for k, v in data.items() if k in ARCHITECTURE_FIELDS or k == "activation"}


def iteration_dirs(root: str | os.PathLike, iteration: int) -> tuple[Path, Path]:
    """``(final, tmp)``: the iteration dir and the temp dir a save writes into before renaming it."""
    final = Path(root) / iter_dir_name(iteration)
    return final, final.with_name(final.name + ".tmp")


def begin_iteration_dir(root: str | os.PathLike, iteration: int) -> None:
    """Rank 0, before a save: remove stale ``iter_*.tmp`` of interrupted saves and create a fresh temp dir. The
    caller barriers before the ranks write into it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("iter_*.tmp"):
        shutil.rmtree(stale)
    iteration_dirs(root, iteration)[1].mkdir()


def commit_iteration_dir(root: str | os.PathLike, final: Path, tmp: Path, iteration: int, config, tokenizer_model=None):
    """Rank 0, after every rank wrote into ``tmp``: add solo_config.json and the tokenizer, rename ``tmp`` to
    ``final``, then replace the tracker. Each step is a rename, so a crash at any point leaves the previous
    checkpoint and tracker loadable."""
    root = Path(root)
    (tmp / CONFIG_NAME).write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, tmp / TOKENIZER_NAME)
        root_tok = root / TOKENIZER_NAME
        if Path(tokenizer_model).resolve() != root_tok.resolve():
            shutil.copyfile(tokenizer_model, root / (TOKENIZER_NAME + ".tmp"))
            os.replace(root / (TOKENIZER_NAME + ".tmp"), root_tok)
    if final.exists():  # re-saving the same iteration: move the old one aside first
        old = root / (final.name + ".old.tmp")
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    tracker_tmp = root / (TRACKER + ".tmp")
    tracker_tmp.write_text(f"{iteration}\n")
    os.replace(tracker_tmp, root / TRACKER)


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


def save_solo_checkpoint(
    model, config, out_dir: str | os.PathLike, iteration: int = 0, tokenizer_model=None, extra: dict | None = None
) -> Path:
    """Collective: ``dist_checkpointing.save`` of ``{"model": model.sharded_state_dict(), **extra}`` + config,
    tokenizer and tracker files (rank 0).

    Atomic like the trainer's save: written into ``iter_XXXXXXX.tmp``, renamed when complete, tracker replaced last;
    an interrupted save leaves the previous checkpoint and tracker as they were.
    """
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    final, tmp = iteration_dirs(out_dir, iteration)
    if dist.get_rank() == 0:
        begin_iteration_dir(out_dir, iteration)
    dist.barrier()
    writer_queue_dies_with_rank()
    dist_checkpointing.save({"model": model.sharded_state_dict(), **(extra or {})}, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        commit_iteration_dir(out_dir, final, tmp, iteration, config, tokenizer_model)
    dist.barrier()
    return final


def resolve_iteration_dir(ckpt: str | os.PathLike) -> Path:
    """A checkpoint root (with the tracker file) or an ``iter_*`` / ``release`` dir -> the iteration dir."""
    ckpt = Path(ckpt)
    if (ckpt / "metadata.json").exists():  # already a dist_checkpointing dir
        return ckpt
    tracker = ckpt / TRACKER
    if not tracker.exists():
        raise FileNotFoundError(f"{ckpt}: neither a SOLO checkpoint root ({TRACKER}) nor an iteration dir")
    value = tracker.read_text().strip()
    it_dir = ckpt / ("release" if value == "release" else iter_dir_name(int(value)))
    if not it_dir.is_dir():
        raise FileNotFoundError(f"{tracker} names iteration {value!r} but {it_dir} does not exist")
    return it_dir


def find_file(it_dir: Path, name: str) -> Path:
    for candidate in (it_dir / name, it_dir.parent / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{it_dir}: no {name} in the iteration dir nor next to it")


def load_solo_config(it_dir: Path, tensor_model_parallel_size: int = 1, **overrides):
    """(SoloConfig, raw json) of a checkpoint: architecture from solo_config.json; runtime fields as given / the
    device defaults (bf16 on GPU, fp32 on CPU)."""
    from megatron_solo.model.config import config_from_dict

    path = find_file(it_dir, CONFIG_NAME)
    data = json.loads(path.read_text())
    try:
        config = config_from_dict(
            architecture_of(data), tensor_model_parallel_size=tensor_model_parallel_size, **overrides
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid SOLO model config ({e})") from e
    return config, data


def load_model_weights(model, it_dir: Path) -> None:
    """Collective: load the weights of ``model`` (any TP; a list = pipeline chunks) from a checkpoint saved at any
    TP/PP/DP.

    Only the model's own keys are requested, so a trainer checkpoint's optimizer / scheduler / trainer state is
    never read. ``RAISE_UNEXPECTED``: a model key absent from the checkpoint is an error naming it (a wrong
    architecture), keys of the checkpoint the model does not ask for are fine.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    from megatron_solo.model.pipeline import sharded_model_state

    chunks = list(model) if isinstance(model, list | tuple) else [model]
    request = sharded_model_state(chunks)
    state = dist_checkpointing.load(request, str(it_dir), strict=StrictHandling.RAISE_UNEXPECTED)
    for chunk, key in zip(chunks, request):
        chunk.load_state_dict(state[key], strict=True)


def params_dtype_of(data: dict) -> torch.dtype:
    return getattr(torch, data.get("params_dtype", "float32"))
