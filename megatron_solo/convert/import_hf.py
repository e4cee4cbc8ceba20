"""HF Mistral directory -> SOLO Megatron-Core checkpoint at a chosen tensor-parallel size.

    python -m megatron_solo.convert.import_hf --hf-dir mistral-7b/ --out ckpt/solo-7b-init --tp 2

Input: ``config.json`` + ``*.safetensors`` (one file or an index) + ``tokenizer.model``. With ``--tp N > 1`` the
command re-launches itself under ``torchrun --nproc_per_node N`` (each rank builds only its TP shard of the model).

What it does, rank by rank:

1. Extends the tokenizer with the SOLO vision tokens (``megatron_solo.format.tokens.extend_tokenizer``: the same
   function the preprocessing uses, so the ids are identical) -> ``V`` = base pieces + 5.
2. Builds SoloModel from the HF config (GQA, head dim, RMSNorm eps, rope theta, sliding window) with the vocab padded
   to a multiple of 128 x TP, without random init.
3. Fills every tensor of ``model.sharded_state_dict()`` from the GLOBAL tensor of its key (keymap.py), reading the HF
   tensors of one layer at a time from the safetensors files (``safe_open``: only the tensors asked for are read);
   the local TP slice is taken with the offsets Megatron itself declares for that shard, so qkv grouping, SwiGLU
   halves and vocab shards are never re-derived here.
4. ``megatron_solo.checkpoint.save_model`` (the one checkpoint writer) -> ``<out>/iter_0000000`` +
   ``latest_checkpointed_iteration.txt``.

New rows: the 5 vision-token rows of the input embedding AND of the output layer are the mean of the existing rows
(so a new token starts as "an average token": it perturbs neither the input statistics nor, in the output, takes
probability mass from real tokens beyond the average). Rows past ``V`` (TP padding) are zero; their logits are
masked to -inf by SoloModel. The projector (``[hidden, patch_dim]``, no bias) is drawn from N(0, std^2) with
``std = std(word embeddings) / sqrt(patch_dim)``: a normalised patch has ~unit variance per value, so its projection has
the per-dimension scale of a word embedding and the pretrained decoder starts from inputs at its familiar scale
(``--projector-init normal`` uses ``init_method_std`` = HF ``initializer_range`` instead). Seeded: the same inputs
give the same checkpoint at any TP.

An exported SOLO-HF dir (model_type ``solo``, e.g. after fine-tuning in HF) is imported with its trained vision rows
and projector kept (only the TP padding is added). See docs/convert.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from megatron_solo import checkpoint
from megatron_solo.convert import keymap

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
    """The input cannot be converted; the message names the file and what is wrong."""


# ---- reading a HF directory ----------------------------------------------------------------------------------------
class SafetensorsReader:
    """Name -> tensor from a HF dir's safetensors file(s), one tensor at a time (never the whole model)."""

    def __init__(self, hf_dir: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                bins = sorted(self.dir.glob("*.bin"))
                hint = " (only .bin files found: re-save with safe_serialization=True)" if bins else ""
                raise ConversionError(f"{self.dir}: no *.safetensors weights{hint}")
            weight_map = {}
            for f in files:
                with safe_open(f, "pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._handles = {}
        self._safe_open = safe_open

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConversionError(f"{self.dir}: tensor {name!r} not found in the safetensors weights")
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = self._safe_open(self.dir / file, "pt")
        return self._handles[file].get_tensor(name)


def read_hf_config(hf_dir: str | os.PathLike):
    """The HF config of a Mistral-architecture dir (via transformers, so every config.json version is normalised)."""
    from transformers import AutoConfig

    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise ConversionError(f"{hf_dir}: no config.json")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    if model_type == "solo":  # our export: read with our own config class, never run code shipped in the dir
        from megatron_solo.convert.hf_remote.configuration_solo import SoloConfig as HFSoloConfig

        cfg = HFSoloConfig.from_pretrained(str(hf_dir))
    else:
        cfg = AutoConfig.from_pretrained(str(hf_dir))
    if cfg.model_type not in ("mistral", "llama", "solo"):
        raise ConversionError(f"{path}: model_type {cfg.model_type!r} is not a Mistral-architecture model")
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{path}: hidden_act {act!r}; SOLO's SwiGLU needs 'silu'")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ConversionError(f"{path}: biases in attention/MLP are not supported (Mistral has none)")
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConversionError(f"{path}: rope_type {rope.get('rope_type')!r} is not supported (plain RoPE only)")
    return cfg


def rope_theta(cfg) -> float:
    rope = getattr(cfg, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def solo_config_from_hf(cfg, tokenizer, tensor_model_parallel_size: int = 1, **overrides):
    """megatron_solo SoloConfig with the HF architecture, the extended vocab and the given TP."""
    from megatron_solo.model import solo_7b

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    window = getattr(cfg, "sliding_window", None)
    theta = rope_theta(cfg)
    fields = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads or cfg.num_attention_heads,
        kv_channels=head_dim,
        ffn_hidden_size=cfg.intermediate_size,
        layernorm_epsilon=float(cfg.rms_norm_eps),
        rotary_base=int(theta) if theta.is_integer() else theta,
        window_size=None if window is None else (int(window) - 1, 0),
        max_position_embeddings=int(cfg.max_position_embeddings),
        seq_length=min(32768, int(cfg.max_position_embeddings)),
        init_method_std=float(getattr(cfg, "initializer_range", 0.02)),
        vocab_size=tokenizer.vocab_size,
        vpatch_id=tokenizer.vpatch_id,
        first_special_id=tokenizer.first_special_id,
        tensor_model_parallel_size=tensor_model_parallel_size,
    )
    if cfg.model_type == "solo":  # an exported SOLO-HF dir: its vision settings and token ids must agree
        fields.update(patch_dim=int(cfg.patch_dim), pixel_mean=tuple(cfg.pixel_mean), pixel_std=tuple(cfg.pixel_std))
        ours = tokenizer.vision_token_ids()
        if dict(cfg.vision_token_ids) != ours:
            raise ConversionError(f"config.json vision_token_ids {cfg.vision_token_ids} != the tokenizer's {ours}")
    fields.update(overrides)
    return solo_7b(**fields)


# ---- global tensors of the checkpoint keys ---------------------------------------------------------------------
def extend_vocab_rows(weight: torch.Tensor, vocab_size: int, padded_vocab_size: int, source: str) -> torch.Tensor:
    """[V0, H] -> [Vp, H]: rows V0..V-1 (the new SOLO tokens) = mean of the V0 existing rows, rows V..Vp-1 = 0."""
    base = weight.shape[0]
    if base > vocab_size:
        raise ConversionError(f"{source}: {base} rows but the extended tokenizer has only {vocab_size} pieces")
    out = torch.zeros(padded_vocab_size, weight.shape[1], dtype=weight.dtype)
    out[:base] = weight
    out[base:vocab_size] = weight.float().mean(dim=0).to(weight.dtype)
    return out


def projector_init(embedding: torch.Tensor, hidden: int, patch_dim: int, mode: str, std: float, seed: int):
    """The initial projector weight [hidden, patch_dim] (see the module docstring)."""
    if mode == "embedding-scale":
        std = float(embedding.float().std()) / math.sqrt(patch_dim)
    elif mode != "normal":
        raise ValueError(f"unknown projector init {mode!r} (embedding-scale | normal)")
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(hidden, patch_dim, generator=gen, dtype=torch.float32) * std


class HFGlobalTensors:
    """checkpoint key (+ layer) -> the GLOBAL tensor of that key built from a HF Mistral dir (keymap.py)."""

    def __init__(self, reader: SafetensorsReader, config, base_vocab: int, projector: str, seed: int):
        self.reader, self.config, self.base_vocab = reader, config, base_vocab
        self.projector_mode, self.seed = projector, seed
        self.heads = keymap.Heads(config.num_attention_heads, config.num_query_groups, config.kv_channels)
        self._vocab_cache: dict[str, torch.Tensor] = {}
        # A SOLO-HF dir (our export, e.g. after HF fine-tuning) already holds trained vision rows and a projector:
        # keep them (only the TP padding is added) instead of re-initialising.
        self.solo_hf = keymap.HF_PROJECTOR in reader

    def _hf(self, name: str) -> torch.Tensor:
        return self.reader.get(name).to(self.config.params_dtype)

    def _vocab_matrix(self, key: str) -> torch.Tensor:
        if key not in self._vocab_cache:
            name = keymap.GLOBAL_TENSORS[key]
            if key == keymap.OUTPUT_KEY and name not in self.reader:  # tied HF embeddings: untie (SOLO is untied)
                name = keymap.HF_EMBEDDING
            w = self._hf(name)[: self.config.vocab_size if self.solo_hf else self.base_vocab]
            if self.solo_hf and w.shape[0] != self.config.vocab_size:
                raise ConversionError(
                    f"{self.reader.dir}:{name}: {w.shape[0]} rows, the SOLO tokenizer has {self.config.vocab_size}"
                )
            self._vocab_cache[key] = extend_vocab_rows(
                w, self.config.vocab_size, self.config.padded_vocab_size, f"{self.reader.dir}:{name}"
            )
        return self._vocab_cache[key]

    def __call__(self, key: str, layer: int | None) -> torch.Tensor:
        if layer is not None:
            fc1_part = None
            if key in (keymap.FC1_KEY + "_w", keymap.FC1_KEY + "_v"):  # singleton_local_shards layout
                key, fc1_part = keymap.FC1_KEY, key[-1]
            spec = keymap.LAYER_BY_KEY.get(key)
            if spec is None:
                raise ConversionError(f"checkpoint key {key!r} has no HF source in megatron_solo/convert/keymap.py")
            full = spec.to_mcore(*(self._hf(n) for n in spec.hf_names(layer)), self.heads)
            if fc1_part is not None:
                full = keymap.fc1_to_hf(full)[0 if fc1_part == "w" else 1]
            return full
        if key in keymap.VOCAB_KEYS:
            return self._vocab_matrix(key)
        if key == keymap.FINAL_NORM_KEY:
            return self._hf(keymap.HF_FINAL_NORM)
        if key == keymap.PROJECTOR_KEY:
            if self.solo_hf:
                return self._hf(keymap.HF_PROJECTOR)
            emb = self._vocab_matrix(keymap.EMBEDDING_KEY)[: self.base_vocab]
            w = projector_init(
                emb, self.config.hidden_size, self.config.patch_dim, self.projector_mode,
                self.config.init_method_std, self.seed,
            )  # fmt: skip
            return w.to(self.config.params_dtype)
        raise ConversionError(f"checkpoint key {key!r} has no HF source in megatron_solo/convert/keymap.py")


# ---- filling a (TP-sharded) model from global tensors ------------------------------------------------------------
def _sharded_tensors(model) -> Iterator:
    """Every ShardedTensor of ``model.sharded_state_dict()`` (factories built: their tensors are views of params)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for value in nested_values(model.sharded_state_dict()):
        if isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from (nested_values(built) if isinstance(built, dict) else built)
        elif isinstance(value, ShardedTensor):
            yield value


def layer_of(sharded_tensor) -> int | None:
    """Global layer index of a stacked per-layer ShardedTensor (prepended layer axis), else None."""
    return sharded_tensor.global_offset[0] if sharded_tensor.prepend_axis_num else None


def local_slice(sharded_tensor) -> tuple[slice, ...]:
    """Where this rank's data sits inside the global tensor of its key (per layer for stacked keys)."""
    n = sharded_tensor.prepend_axis_num
    return tuple(
        slice(off, off + size)
        for off, size in zip(sharded_tensor.global_offset[n:], sharded_tensor.local_shape, strict=True)
    )


@torch.no_grad()
def fill_model(model, global_tensor: Callable[[str, int | None], torch.Tensor]) -> int:
    """Copy into every parameter of ``model`` its slice of ``global_tensor(key, layer)``; one layer at a time."""
    items = list(_sharded_tensors(model))
    items.sort(key=lambda st: (-1 if layer_of(st) is None else layer_of(st), st.key))
    cache: dict[tuple[str, int | None], torch.Tensor] = {}
    current_layer = object()
    for st in items:
        layer = layer_of(st)
        if layer != current_layer:
            cache.clear()  # keep only the tensors of the layer being filled
            current_layer = layer
        if (st.key, layer) not in cache:
            cache[(st.key, layer)] = global_tensor(st.key, layer)
        full = cache[(st.key, layer)]
        want = tuple(st.global_shape[st.prepend_axis_num :])
        if tuple(full.shape) != want:
            raise ConversionError(
                f"{st.key} (layer {layer}): the source gives shape {tuple(full.shape)}, the model wants {want}"
            )
        st.data.copy_(full[local_slice(st)])
    return len(items)


# ---- the conversion ----------------------------------------------------------------------------------------------
def import_hf(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tp: int | None = None,
    dtype: str = "auto",
    projector: str = "embedding-scale",
    seed: int = 1234,
    tokenizer_model: str | os.PathLike | None = None,
    **config_overrides,
):
    """Convert (collective: call on every rank of an initialized world whose TP size is ``tp``). Returns the SoloConfig.

    ``tokenizer_model``: the base SentencePiece model (default ``<hf_dir>/tokenizer.model``); an already
    SOLO-extended model is used as is.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_solo.format.tokens import SoloTokenizer, TokenizerError, extend_tokenizer
    from megatron_solo.model import build_solo_model

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    world_tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp is not None and tp != world_tp:
        raise ValueError(f"import at TP={tp} needs a world initialised with TP={tp} (it has TP={world_tp})")
    rank = dist.get_rank()
    hf_cfg = read_hf_config(hf_dir)
    base_model = Path(tokenizer_model) if tokenizer_model else hf_dir / "tokenizer.model"
    if not base_model.exists():
        raise ConversionError(f"{base_model}: tokenizer model not found (Mistral's SentencePiece tokenizer.model)")

    out_dir.mkdir(parents=True, exist_ok=True)
    solo_tok_path = out_dir / "tokenizer.model"
    if rank == 0:
        try:
            SoloTokenizer(base_model)  # already extended: keep it
            extended_already = True
        except TokenizerError:
            extended_already = False
        if extended_already:
            solo_tok_path.write_bytes(base_model.read_bytes())
        else:
            extend_tokenizer(base_model, solo_tok_path)
    dist.barrier()
    tokenizer = SoloTokenizer(solo_tok_path)
    base_vocab = tokenizer.first_special_id
    if hf_cfg.vocab_size < base_vocab:
        raise ConversionError(
            f"{hf_dir}/config.json: vocab_size {hf_cfg.vocab_size} < {base_vocab} pieces of {base_model}"
        )

    if dtype == "auto":
        hf_dtype = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None) or torch.float32
        params_dtype = hf_dtype if isinstance(hf_dtype, torch.dtype) else getattr(torch, str(hf_dtype))
    else:
        params_dtype = DTYPES[dtype]
    precision = dict(params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16)
    config = solo_config_from_hf(
        hf_cfg, tokenizer, world_tp, perform_initialization=False, use_cpu_initialization=True,
        **precision, **config_overrides,
    )  # fmt: skip
    model = build_solo_model(config)
    source = HFGlobalTensors(SafetensorsReader(hf_dir), config, base_vocab, projector, seed)
    fill_model(model, source)
    checkpoint.save_model(model, config, out_dir, iteration=0, tokenizer_model=solo_tok_path)
    return config


def _maybe_relaunch(tp: int, argv: list[str]) -> int | None:
    """Outside torchrun with tp > 1: run this same command under ``torchrun --nproc_per_node tp``."""
    if tp <= 1 or "LOCAL_RANK" in os.environ:
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
           "-m", "megatron_solo.convert.import_hf", *argv]  # fmt: skip
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m megatron_solo.convert.import_hf", description=__doc__.split("\n")[0])
    p.add_argument("--hf-dir", required=True, help="HF Mistral dir: config.json, *.safetensors, tokenizer.model")
    p.add_argument("--out", required=True, help="SOLO checkpoint dir to write")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the checkpoint (vocab padded for it)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="stored dtype (auto: the HF dtype)")
    p.add_argument(
        "--projector-init", default="embedding-scale", choices=["embedding-scale", "normal"],
        help="embedding-scale: N(0, (std(emb)/sqrt(patch_dim))^2); normal: N(0, initializer_range^2)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=1234, help="seed of the projector init")
    p.add_argument("--tokenizer-model", default=None, help="base tokenizer.model (default: <hf-dir>/tokenizer.model)")
    p.add_argument("--seq-length", type=int, default=None, help="pack size recorded in solo_config.json")
    args = p.parse_args(argv)
    code = _maybe_relaunch(args.tp, argv)
    if code is not None:
        return code

    from megatron_solo import parallel

    parallel.initialize(tensor_model_parallel_size=args.tp)
    try:
        overrides = {} if args.seq_length is None else {"seq_length": args.seq_length}
        config = import_hf(
            args.hf_dir, args.out, tp=args.tp, dtype=args.dtype, projector=args.projector_init, seed=args.seed,
            tokenizer_model=args.tokenizer_model, **overrides,
        )  # fmt: skip
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        parallel.destroy()
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"wrote {args.out}: TP={args.tp} layers={config.num_layers} hidden={config.hidden_size} "
            f"vocab={config.vocab_size} (padded {config.padded_vocab_size}) dtype={config.params_dtype}"
        )
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing.save spawns a helper that re-imports __main__
    sys.exit(main())
