"""SOLO Megatron-Core checkpoint (saved at any TP/DP) -> HF directory loadable with ``trust_remote_code=True``.

    python -m megatron_solo.convert.export_hf --checkpoint ckpt/solo-7b --out hf/solo-7b [--dtype bf16]

No model is built. The GLOBAL tensor of each checkpoint key is read straight from the dist_checkpointing files,
one decoder layer at a time (a ShardedTensor naming that layer's slice of the stacked ``decoder.layers.*`` key), so
the TP/DP layout the checkpoint was saved with does not matter and memory stays at about one layer plus one output
shard. Tensors are converted with keymap.py and written to ``model-XXXXX-of-YYYYY.safetensors`` shards of at most
``--max-shard-gb``.

The directory gets: config.json (SoloConfig, ``auto_map`` to the shipped classes; ``solo_chat_template`` when the
checkpoint's solo_config.json records a ``chat_template``), generation_config.json (the
5 vision token ids in ``suppress_tokens``: they are never generated), the weights, tokenizer.model, and the three
files of ``megatron_solo/convert/hf_remote/`` (configuration_solo.py, modeling_solo.py, processing_solo.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from megatron_solo import checkpoint as solo_checkpoint
from megatron_solo.convert import keymap

REMOTE_DIR = Path(__file__).resolve().parent / "hf_remote"
REMOTE_FILES = ("configuration_solo.py", "modeling_solo.py", "processing_solo.py")
AUTO_MAP = {
    "AutoConfig": "configuration_solo.SoloConfig",
    "AutoModelForCausalLM": "modeling_solo.SoloForCausalLM",
    "AutoProcessor": "processing_solo.SoloProcessor",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _SliceLoadPlanner:
    """torch DCP load planner reading one chunk (e.g. one layer of a stacked ``[L, ...]`` key) of each tensor.

    Megatron's own ``dist_checkpointing.load`` cannot read part of a tensor in a 1-process world (it declares the other
    fragments as owned by another rank), so the converter reads the torch_dist files with torch's DCP reader
    directly: same files, same keys, no process group, no model.
    """

    @staticmethod
    def make(offsets: dict[str, tuple[int, ...]]):
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class Planner(DefaultLoadPlanner):
            def __init__(self):
                super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=True)

            def create_local_plan(self) -> LoadPlan:
                items = []
                for fqn, dest in self.state_dict.items():
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[fqn]), sizes=dest.size())
                    items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
                return LoadPlan(items)

            def lookup_tensor(self, index):
                return self.state_dict[index.fqn]

        return Planner()


class CheckpointTensors:
    """Reads GLOBAL tensors (whole, or one layer of a stacked key) from a dist_checkpointing (torch_dist) dir."""

    def __init__(self, it_dir: Path):
        from torch.distributed.checkpoint import FileSystemReader

        self.it_dir = Path(it_dir)
        self._reader_cls = FileSystemReader
        self.meta = FileSystemReader(str(self.it_dir)).read_metadata().state_dict_metadata

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.meta or not hasattr(self.meta[key], "size"):
            raise KeyError(f"{self.it_dir}: checkpoint has no tensor {key!r} (has e.g. {sorted(self.meta)[:4]})")
        return tuple(self.meta[key].size)

    def dtype(self, key: str) -> torch.dtype:
        self.shape(key)
        return self.meta[key].properties.dtype

    def load(self, requests: dict[str, int | None]) -> dict[str, torch.Tensor]:
        """{key: layer (None = whole tensor)} -> {key: global tensor (of that layer)}. Local to this process."""
        import torch.distributed.checkpoint as dcp

        state, offsets = {}, {}
        for key, layer in requests.items():
            shape = self.shape(key)
            if layer is None:
                state[key], offsets[key] = torch.empty(shape, dtype=self.dtype(key)), (0,) * len(shape)
            else:
                state[key] = torch.empty((1, *shape[1:]), dtype=self.dtype(key))
                offsets[key] = (layer,) + (0,) * (len(shape) - 1)
        with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(
                state, storage_reader=self._reader_cls(str(self.it_dir)), planner=_SliceLoadPlanner.make(offsets),
                no_dist=True,
            )  # fmt: skip
        return {key: t[0] if requests[key] is not None else t for key, t in state.items()}


def hf_tensors(ckpt: CheckpointTensors, config) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for the whole model in HF order; one decoder layer in memory at a time."""
    heads = keymap.Heads(config.num_attention_heads, config.num_query_groups, config.kv_channels)
    vocab = config.vocab_size
    singleton_fc1 = keymap.FC1_KEY not in ckpt.meta and keymap.FC1_KEY + "_w" in ckpt.meta
    emb = ckpt.load({keymap.EMBEDDING_KEY: None})[keymap.EMBEDDING_KEY]
    yield keymap.HF_EMBEDDING, emb[:vocab].clone()
    del emb
    for layer in range(config.num_layers):
        keys = [t.ckpt_key for t in keymap.LAYER_TENSORS]
        if singleton_fc1:
            keys = [k for k in keys if k != keymap.FC1_KEY] + [keymap.FC1_KEY + "_w", keymap.FC1_KEY + "_v"]
        got = ckpt.load(dict.fromkeys(keys, layer))
        if singleton_fc1:
            got[keymap.FC1_KEY] = keymap.fc1_to_mcore(got.pop(keymap.FC1_KEY + "_w"), got.pop(keymap.FC1_KEY + "_v"))
        for spec in keymap.LAYER_TENSORS:
            for name, tensor in zip(spec.hf_names(layer), spec.to_hf(got[spec.ckpt_key], heads), strict=True):
                yield name, tensor.contiguous()
    rest = ckpt.load(dict.fromkeys([keymap.FINAL_NORM_KEY, keymap.OUTPUT_KEY, keymap.PROJECTOR_KEY]))
    yield keymap.HF_FINAL_NORM, rest[keymap.FINAL_NORM_KEY]
    yield keymap.HF_OUTPUT, rest[keymap.OUTPUT_KEY][:vocab].clone()
    yield keymap.HF_PROJECTOR, rest[keymap.PROJECTOR_KEY]


def hf_config(config, tokenizer, dtype: torch.dtype):
    """The SOLO-HF config (configuration_solo.SoloConfig) of a megatron SoloConfig + its tokenizer."""
    from megatron_solo.convert.hf_remote.configuration_solo import SoloConfig as HFSoloConfig
    from megatron_solo.format.schema import PATCH_SIZE

    window = config.window_size
    cfg = HFSoloConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups,
        head_dim=config.kv_channels,
        hidden_act="silu",
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.init_method_std,
        rms_norm_eps=config.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rotary_base)},
        sliding_window=None if window is None else int(window[0]) + 1,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        patch_size=PATCH_SIZE,
        patch_dim=config.patch_dim,
        vision_token_ids=tokenizer.vision_token_ids(),
        first_special_id=tokenizer.first_special_id,
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )
    cfg.auto_map = dict(AUTO_MAP)
    cfg.architectures = ["SoloForCausalLM"]
    cfg.dtype = dtype
    return cfg


def generation_config(tokenizer):
    from transformers import GenerationConfig

    vision_ids = [tokenizer.vision_id + k for k in range(5)]  # <vision> .. </vision>: never generated
    return GenerationConfig(
        bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        suppress_tokens=vision_ids,
    )


class ShardWriter:
    """Streams (name, tensor) into safetensors files of at most ``max_bytes`` and writes the index."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.out_dir / f"part-{len(self.files):05d}.tmp"), metadata={"format": "pt"})
        self.files.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.out_dir / "part-00000.tmp", self.out_dir / "model.safetensors")
            return
        weight_map = {}
        for k, names in enumerate(self.files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"part-{k:05d}.tmp", self.out_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def open_checkpoint(checkpoint: str | os.PathLike):
    """(SoloConfig, tokenizer path, SoloTokenizer, CheckpointTensors) of a SOLO checkpoint root or iteration dir;
    refuses a tokenizer whose size differs from the checkpoint's vocab."""
    from megatron_solo.format.tokens import SoloTokenizer

    found = solo_checkpoint.open_checkpoint(checkpoint)
    config = found.solo_config()
    tok_path = found.tokenizer_path
    tokenizer = SoloTokenizer(tok_path)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(f"{tok_path}: {tokenizer.vocab_size} pieces but the checkpoint vocab is {config.vocab_size}")
    return config, tok_path, tokenizer, CheckpointTensors(found.it_dir)


TEMPLATE_KEY = solo_checkpoint.CHAT_TEMPLATE_KEY  # solo_config.json: the template an SFT checkpoint was trained with
HF_TEMPLATE_KEY = "solo_chat_template"  # its name in the exported config.json (HF's own `chat_template` is Jinja)


def recorded_chat_template(checkpoint: str | os.PathLike) -> str | None:
    """The chat template name a SOLO checkpoint records in solo_config.json (None for pre-training checkpoints)."""
    return solo_checkpoint.open_checkpoint(checkpoint).chat_template


def export_hf(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "auto", max_shard_gb: float = 4.0
) -> Path:
    """Convert a SOLO checkpoint to a HF dir (one process; no process group needed). Returns the HF dir."""
    config, tok_path, tokenizer, ckpt = open_checkpoint(checkpoint)
    out_dtype = ckpt.dtype(keymap.EMBEDDING_KEY) if dtype == "auto" else DTYPES[dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("*.safetensors"), *out_dir.glob("*.tmp"), *out_dir.glob("*.safetensors.index.json")]:
        stale.unlink()
    writer = ShardWriter(out_dir, int(max_shard_gb * 2**30))
    for name, tensor in hf_tensors(ckpt, config):
        writer.add(name, tensor.to(out_dtype))
    writer.close()
    cfg = hf_config(config, tokenizer, out_dtype)
    template = recorded_chat_template(checkpoint)
    if template is not None:  # the processor's default template (processing_solo.SoloProcessor.from_pretrained)
        setattr(cfg, HF_TEMPLATE_KEY, template)
    cfg.save_pretrained(str(out_dir))
    generation_config(tokenizer).save_pretrained(str(out_dir))
    shutil.copyfile(tok_path, out_dir / "tokenizer.model")
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, out_dir / name)
    return out_dir


def hf_model_from_checkpoint(checkpoint: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None):
    """(SoloForCausalLM, tokenizer path) from a SOLO checkpoint, without writing a HF dir (megatron_solo.generate).

    The model is built on ``device`` in ``dtype`` (default: the checkpoint's) and filled tensor by tensor from the
    checkpoint reader: one model copy plus one decoder layer in memory, never a full state dict beside the model.
    """
    from megatron_solo.convert.hf_remote.modeling_solo import SoloForCausalLM

    config, tok_path, tokenizer, ckpt = open_checkpoint(checkpoint)
    out_dtype = dtype or ckpt.dtype(keymap.EMBEDDING_KEY)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(out_dtype)
    try:
        with torch.device(device):
            model = SoloForCausalLM(hf_config(config, tokenizer, out_dtype))
    finally:
        torch.set_default_dtype(previous)
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for name, tensor in hf_tensors(ckpt, config):
            if name not in params or params[name].shape != tensor.shape:
                got = tuple(params[name].shape) if name in params else None
                raise ValueError(f"{ckpt.it_dir}: tensor {name} {tuple(tensor.shape)} does not fit the HF model: {got}")
            params[name].copy_(tensor)
            filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"{ckpt.it_dir}: the checkpoint gave no value for {missing}")
    return model.eval(), tok_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_solo.convert.export_hf", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="SOLO checkpoint root (or one iter_* dir)")
    p.add_argument("--out", required=True, help="HF directory to write")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: the checkpoint's dtype")
    p.add_argument("--max-shard-gb", type=float, default=4.0)
    args = p.parse_args(argv)

    try:
        out = export_hf(args.checkpoint, args.out, dtype=args.dtype, max_shard_gb=args.max_shard_gb)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} (load with AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
