"""The SOLO checkpoint directory: names, the tracker, resolving a path to one iteration, the atomic commit.

Layout (docs/architecture.md, "Checkpoints")::

    <root>/latest_checkpointed_iteration.txt    Megatron-LM's tracker: the last COMPLETE iteration (written last)
    <root>/tokenizer.model                      the SOLO-extended SentencePiece model
    <root>/iter_0000100/                        dist_checkpointing (torch_dist): {"model": ..., [trainer keys]}
                                                ("model0", "model1", .. when saved with virtual pipeline stages)
    <root>/iter_0000100/solo_config.json        architecture (model/config.py ``config_to_dict``) + TP, padded
                                                vocab and dtype of the saved weights (information only)
    <root>/iter_0000100/tokenizer.model         copy (an iteration dir is self-describing)
    <root>/iter_0000100/trainer_state.json      trainer checkpoints only: iteration, samples, layout, optimizer kind
    <root>/iter_0000100/rng/rank_00000.pt       trainer checkpoints only: per-rank RNG states

Model part names (``model_part_names``): ``"model"`` for one model chunk per rank, ``"model0".."modelN"`` for the
chunks of virtual pipeline stages (Megatron-LM's names). Every tensor key inside is global (layer indices included:
TransformerBlock applies the stage's layer offset), so the files are the same at any TP / PP / VPP / DP and a
reader asking for ``"model"`` of a one-chunk model finds every key of any save.

An HF import is iteration 0 without trainer state. Atomic commit: every rank writes into ``iter_XXXXXXX.tmp``;
rank 0 adds the JSON files and renames it once complete, then replaces the tracker (each step a rename), so a crash
at any point leaves the previous checkpoint and tracker loadable; the next save removes stale ``*.tmp`` dirs.

Everything here is plain file work (no process group): the start of a run is decided before one exists.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_NAME = "solo_config.json"
TOKENIZER_NAME = "tokenizer.model"
TRAINER_STATE = "trainer_state.json"
RNG_DIR = "rng"
CHAT_TEMPLATE_KEY = "chat_template"
"""solo_config.json field: the chat template (format/chat_template.py) an instruction-tuned checkpoint was trained
with; generate / evaluate / the export default to it. Absent for pre-training checkpoints."""

# Written next to the architecture (model/config.py ``config_to_dict``) for information; not read back as config.
RUN_FIELDS = ("tensor_model_parallel_size", "padded_vocab_size", "params_dtype")


class CheckpointNotFound(FileNotFoundError):
    """The path holds no SOLO checkpoint (no tracker file, no dist_checkpointing dir)."""


class CheckpointError(ValueError):
    """The path is a SOLO checkpoint but a part of it is missing or unreadable; the message names the file."""


def model_part_names(chunks: int) -> list[str]:
    """The state-dict keys of a model saved as ``chunks`` chunks per rank (see the module docstring)."""
    return ["model"] if chunks == 1 else [f"model{k}" for k in range(chunks)]


def iter_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def iteration_dirs(root: str | os.PathLike, iteration: int) -> tuple[Path, Path]:
    """``(final, tmp)``: the iteration dir and the temp dir a save writes into before renaming it."""
    final = Path(root) / iter_dir_name(iteration)
    return final, final.with_name(final.name + ".tmp")


@dataclass(frozen=True)
class Checkpoint:
    """One complete iteration of a SOLO checkpoint (``open_checkpoint``); reads its small files on demand."""

    it_dir: Path

    @property
    def root(self) -> Path:
        return self.it_dir.parent

    def find(self, name: str) -> Path:
        """``name`` in the iteration dir, else next to it (the checkpoint root)."""
        for candidate in (self.it_dir / name, self.root / name):
            if candidate.exists():
                return candidate
        raise CheckpointError(f"{self.it_dir}: no {name} in the iteration dir nor next to it")

    def _json(self, name: str) -> dict:
        path = self.find(name)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable ({e})") from e

    @cached_property
    def config_json(self) -> dict:
        """solo_config.json as written (architecture + run fields)."""
        return self._json(CONFIG_NAME)

    @property
    def architecture(self) -> dict:
        """The architecture dict ``model.config.config_from_dict`` takes (run fields dropped)."""
        from megatron_solo.model.config import ARCHITECTURE_FIELDS

        return {k: v for k, v in self.config_json.items() if k in ARCHITECTURE_FIELDS or k == "activation"}

    @property
    def chat_template(self) -> str | None:
        return self.config_json.get(CHAT_TEMPLATE_KEY)

    @property
    def tokenizer_path(self) -> Path:
        return self.find(TOKENIZER_NAME)

    @cached_property
    def trainer_state(self) -> dict | None:
        """trainer_state.json of a trainer checkpoint; None for weights only (an HF import)."""
        return self._json(TRAINER_STATE) if (self.it_dir / TRAINER_STATE).exists() else None

    @property
    def is_trainer_checkpoint(self) -> bool:
        return self.trainer_state is not None

    @property
    def iteration(self) -> int:
        state = self.trainer_state
        if state is not None:
            return int(state["iteration"])
        name = self.it_dir.name
        return int(name.removeprefix("iter_")) if name.startswith("iter_") else 0

    @cached_property
    def common_state(self) -> dict:
        """dist_checkpointing's common (non-sharded) state: scheduler, optimizer param groups, trainer counters."""
        from megatron.core import dist_checkpointing

        try:
            return dist_checkpointing.load_common_state_dict(str(self.it_dir))
        except Exception as e:  # noqa: BLE001 - any failure to read it is a broken checkpoint, named here
            raise CheckpointError(f"{self.it_dir}: cannot read its common state ({e})") from e

    def solo_config(self, tensor_model_parallel_size: int = 1, **overrides):
        """The SoloConfig of the saved weights; runtime fields as given / the device defaults."""
        from megatron_solo.model.config import config_from_dict

        try:
            return config_from_dict(
                self.architecture, tensor_model_parallel_size=tensor_model_parallel_size, **overrides
            )
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{self.find(CONFIG_NAME)}: not a valid SOLO model config ({e})") from e

    @property
    def params_dtype(self):
        import torch

        return getattr(torch, self.config_json.get("params_dtype", "float32"))

    def rng_file(self, rank: int) -> Path:
        return self.it_dir / RNG_DIR / f"rank_{rank:05d}.pt"


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint root (with the tracker file), an ``iter_*`` / ``release`` dir -> its :class:`Checkpoint`.

    Raises :class:`CheckpointNotFound` when ``path`` holds none, :class:`CheckpointError` when the tracker names a
    missing iteration.
    """
    path = Path(path)
    if (path / "metadata.json").exists():  # already one dist_checkpointing dir
        return Checkpoint(path)
    tracker = path / TRACKER
    if not tracker.exists():
        raise CheckpointNotFound(f"{path}: neither a SOLO checkpoint root ({TRACKER}) nor an iteration dir")
    value = tracker.read_text().strip()
    try:
        it_dir = path / ("release" if value == "release" else iter_dir_name(int(value)))
    except ValueError:
        raise CheckpointError(f"{tracker}: {value!r} is not an iteration number") from None
    if not (it_dir / "metadata.json").exists():
        raise CheckpointError(f"{tracker} names iteration {value!r} but {it_dir} is not a complete checkpoint")
    return Checkpoint(it_dir)


def find_checkpoint(path: str | os.PathLike | None) -> Checkpoint | None:
    """:func:`open_checkpoint`, or None where ``path`` is unset, missing or holds no checkpoint yet."""
    if not path:
        return None
    try:
        return open_checkpoint(path)
    except CheckpointNotFound:
        return None


# ---- writing (rank 0) --------------------------------------------------------------------------------------------
def config_to_json(config) -> dict:
    """solo_config.json: the architecture (``model.config.config_to_dict``, the one serialisation of SoloConfig) +
    the TP size, padded vocab and dtype the weights were saved with."""
    from megatron_solo.model.config import config_to_dict

    out = config_to_dict(config)
    out["tensor_model_parallel_size"] = config.tensor_model_parallel_size
    out["padded_vocab_size"] = config.padded_vocab_size
    out["params_dtype"] = str(config.params_dtype).removeprefix("torch.")
    return out


def begin_iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    """Rank 0, before a save: remove stale ``iter_*.tmp`` of interrupted saves, create a fresh temp dir and return
    it. The caller barriers before the ranks write into it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("iter_*.tmp"):
        shutil.rmtree(stale)
    tmp = iteration_dirs(root, iteration)[1]
    tmp.mkdir()
    return tmp


def commit_iteration_dir(
    root: str | os.PathLike,
    iteration: int,
    config,
    tokenizer_model=None,
    trainer_state: dict | None = None,
    chat_template: str | None = None,
) -> Path:
    """Rank 0, after every rank wrote into the temp dir: add solo_config.json (+ ``chat_template`` when given),
    trainer_state.json and the tokenizer, rename the temp dir to ``iter_XXXXXXX``, then replace the tracker.
    Returns the iteration dir."""
    root = Path(root)
    final, tmp = iteration_dirs(root, iteration)
    solo_config = config_to_json(config)
    if chat_template is not None:
        solo_config[CHAT_TEMPLATE_KEY] = chat_template
    (tmp / CONFIG_NAME).write_text(json.dumps(solo_config, indent=2) + "\n")
    if trainer_state is not None:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
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
    return final
