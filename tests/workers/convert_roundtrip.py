"""HF Mistral -> SOLO (TP=1, TP=2) -> train 3 steps -> HF, on 2 gloo ranks, against real transformers code.

Env: SOLO_CONVERT_TMP = a fresh dir shared by the ranks (the pytest side reads the exported dirs afterwards).
"""

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_solo import parallel
from megatron_solo.testing.dist_checks import DistChecks

checks = DistChecks()
TMP = Path(os.environ.get("SOLO_CONVERT_TMP", "/tmp/solo_convert_test"))
HF_DIR, BASE_VOCAB = TMP / "hf_mistral", 320  # 320 + 5 vision tokens: padded to 384 at TP=1, 512 at TP=2
ATOL = RTOL = 1e-4  # fp32 on both sides; only summation order differs (TP all-reduce, fused qkv, SDPA vs eager)
PROMPT = "a photo of the sea"


def _rank() -> int:
    return dist.get_rank()


def make_hf_mistral(out: Path) -> None:
    """A tiny random MistralForCausalLM (real transformers code) + a SentencePiece model trained here."""
    from transformers import MistralConfig, MistralForCausalLM

    from megatron_solo.format.tokens import train_sentencepiece

    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(__file__).resolve().parents[2] / "megatron_solo" / "demo_data" / "corpus.txt"
    train_sentencepiece([corpus], out / "tokenizer.model", vocab_size=BASE_VOCAB)
    cfg = MistralConfig(
        vocab_size=BASE_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=16,
        initializer_range=0.1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg)
    with torch.no_grad():  # HF inits norms to 1: randomise them so a wrong norm mapping cannot pass
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out)


def make_image(path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    Image.fromarray((rng.random((70, 100, 3)) * 255).astype(np.uint8)).save(path)  # -> 3 x 4 patches


def hf_reference(path: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", **kwargs).eval()


def text_ids() -> torch.Tensor:
    return torch.randint(3, BASE_VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > window 16


def load_solo(ckpt: Path, tp: int):
    from megatron_solo import checkpoint
    from megatron_solo.model import build_solo_model

    found = checkpoint.open_checkpoint(ckpt)
    config = found.solo_config(tp)
    model = build_solo_model(config)
    checkpoint.load_model_weights(model, found)
    return model.eval(), config


def full_logits(model, tokens: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
    """Our logits, all-gathered over TP -> [b, s, V_padded]."""
    from megatron.core import parallel_state as ps

    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, pos, patches)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    return logits


def solo_image_prompt(tokenizer, image_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The training-side layout of [BOS] <image> text, built from megatron_solo.format directly."""
    from megatron_solo.format.image import load_and_resize
    from megatron_solo.format.layout import grid_shape, image_tokens, patchify

    pixels = load_and_resize(str(image_path))
    n_h, n_w = grid_shape(pixels)
    ids = [tokenizer.bos_id, *image_tokens(tokenizer, n_h, n_w).token_ids.tolist(), *tokenizer.encode(PROMPT)]
    return torch.tensor([ids]), torch.from_numpy(patchify(pixels))


@checks.check
def setup_inputs():
    parallel.initialize(tensor_model_parallel_size=1)
    if _rank() == 0:
        make_hf_mistral(HF_DIR)
        make_image(TMP / "image.png")
    dist.barrier()
    assert (HF_DIR / "model.safetensors").exists()


def _import_and_compare(tp: int) -> None:
    from megatron_solo.convert.import_hf import import_hf

    parallel.initialize(tensor_model_parallel_size=tp)
    ckpt = TMP / f"solo_tp{tp}"
    config = import_hf(HF_DIR, ckpt, tp=tp)
    assert config.vocab_size == BASE_VOCAB + 5 and config.padded_vocab_size == (384 if tp == 1 else 512)
    assert config.window_size == (15, 0) and config.num_query_groups == 2
    model, _ = load_solo(ckpt, tp)
    ids = text_ids()
    ours = full_logits(model, ids, None)
    with torch.no_grad():
        ref = hf_reference(HF_DIR)(ids).logits
    assert ours.shape == (2, 40, config.padded_vocab_size)
    torch.testing.assert_close(ours[..., :BASE_VOCAB], ref, atol=ATOL, rtol=RTOL)
    assert torch.isinf(ours[..., config.vocab_size :]).all(), "padded vocab rows must be masked"
    # The sliding window matters on this input: without it HF's logits are different (the check can fail).
    with torch.no_grad():
        no_window = hf_reference(HF_DIR, sliding_window=None)(ids).logits
    assert (no_window - ref).abs().max() > 100 * ATOL


@checks.check
def import_tp1_logits_match_hf():
    _import_and_compare(1)


@checks.check
def import_tp2_logits_match_hf():
    _import_and_compare(2)


@checks.check
def import_extends_rows_with_mean_and_is_tp_independent():
    """New vision rows = mean of the old rows (input and output); TP=1 and TP=2 imports hold the same weights."""
    from safetensors.torch import load_file

    from megatron_solo.convert.export_hf import CheckpointTensors
    from megatron_solo.convert.keymap import EMBEDDING_KEY, OUTPUT_KEY, PROJECTOR_KEY

    hf = load_file(HF_DIR / "model.safetensors")
    t1 = CheckpointTensors(TMP / "solo_tp1" / "iter_0000000")
    t2 = CheckpointTensors(TMP / "solo_tp2" / "iter_0000000")
    for key, name in ((EMBEDDING_KEY, "model.embed_tokens.weight"), (OUTPUT_KEY, "lm_head.weight")):
        w1, w2 = t1.load({key: None})[key], t2.load({key: None})[key]
        assert w1.shape[0] == 384 and w2.shape[0] == 512
        torch.testing.assert_close(w1[:BASE_VOCAB], hf[name], atol=0, rtol=0)
        mean = hf[name].mean(0)
        for row in range(BASE_VOCAB, BASE_VOCAB + 5):
            torch.testing.assert_close(w1[row], mean)
        assert (w1[BASE_VOCAB + 5 :] == 0).all()
        torch.testing.assert_close(w1[: BASE_VOCAB + 5], w2[: BASE_VOCAB + 5], atol=0, rtol=0)
    p1, p2 = t1.load({PROJECTOR_KEY: None})[PROJECTOR_KEY], t2.load({PROJECTOR_KEY: None})[PROJECTOR_KEY]
    torch.testing.assert_close(p1, p2, atol=0, rtol=0)  # seeded: the same init at any TP
    expected_std = hf["model.embed_tokens.weight"].std() / 3072**0.5
    assert abs(p1.std() / expected_std - 1) < 0.05, (p1.std(), expected_std)


@checks.check
def tokenizer_extension_is_the_preprocessing_one():
    """The import's tokenizer.model is byte-identical to `python -m megatron_solo.format.tokens extend` output."""
    from megatron_solo.format.tokens import SoloTokenizer, extend_tokenizer

    mine = TMP / f"extended_by_format_cli_rank{_rank()}.model"
    ref = extend_tokenizer(HF_DIR / "tokenizer.model", mine)  # what the shard builder is given
    for ckpt in ("solo_tp1", "solo_tp2"):
        ours = SoloTokenizer(TMP / ckpt / "tokenizer.model")
        assert ours.checksum == ref.checksum
        ids = (ours.vision_id, ours.vpatch_id, ours.row_sep_id, ours.frame_sep_id, ours.vision_end_id)
        assert ids == tuple(range(BASE_VOCAB, BASE_VOCAB + 5))
        assert ours.encode(PROMPT) == ref.encode(PROMPT)


def _train_three_steps(model, tokens: torch.Tensor, patches: torch.Tensor, first_special_id: int) -> list[float]:
    """3 plain Adam steps (the trainer is a separate part; this only has to move every weight)."""
    from megatron.core import parallel_state as ps

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    labels = torch.roll(tokens, -1, dims=1)
    mask = (labels < first_special_id).float()
    mask[:, -1] = 0
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = (model(tokens, pos, patches, labels=labels) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    # TP ranks hold replicas of the norms: they must have taken the same steps.
    norm = next(p for n, p in model.named_parameters() if n.endswith("final_layernorm.weight"))
    copies = [torch.empty_like(norm) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(copies, norm.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
    assert all(torch.equal(c, copies[0]) for c in copies)
    return losses, opt


def _trainer_state(opt) -> dict:
    """What a trainer checkpoint holds besides the model: sharded optimizer moments, a per-rank object and common
    (non-sharded) state. Saved next to "model" so the readers are shown to ignore them."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    rank, world = _rank(), dist.get_world_size()
    moments = {}
    for k, state in enumerate(opt.state.values()):
        for name in ("exp_avg", "exp_avg_sq"):
            key = f"optimizer.state.{name}.{k}"
            moments[key] = ShardedTensor.from_rank_offsets(key, state[name], (0, rank, world), replica_id=0)
    rng = ShardedObject("rng_state", torch.get_rng_state(), (world,), (rank,), replica_id=0)
    return {"optimizer": moments, "rng_state": rng, "trainer": {"iteration": 3, "consumed_samples": 3}}


@checks.check
def roundtrip_tp2_train_export_matches_hf_processor():
    from transformers import AutoProcessor

    from megatron_solo import checkpoint
    from megatron_solo.convert.export_hf import export_hf
    from megatron_solo.format.tokens import SoloTokenizer

    parallel.initialize(tensor_model_parallel_size=2)
    model, config = load_solo(TMP / "solo_tp2", 2)
    tokenizer = SoloTokenizer(TMP / "solo_tp2" / "tokenizer.model")
    tokens, patches = solo_image_prompt(tokenizer, TMP / "image.png")
    assert patches.shape == (12, 3072) and tokens.shape[1] > 16  # 3 x 4 patches; longer than the window
    before = full_logits(model, tokens, patches)
    losses, opt = _train_three_steps(model, tokens, patches, config.first_special_id)
    assert losses[-1] < losses[0], losses
    model.eval()
    ours = full_logits(model, tokens, patches)
    assert (ours - before)[..., : config.vocab_size].abs().max() > 1e-2, "training did not change the model"
    sharded = {"model": model.sharded_state_dict(), **_trainer_state(opt)}
    checkpoint.save(TMP / "solo_trained", 3, sharded, config, tokenizer_model=tokenizer.path)
    if _rank() == 0:
        torch.save({"tokens": tokens, "patches": patches, "logits": ours}, TMP / "trained_logits.pt")
    if _rank() == 0:
        export_hf(TMP / "solo_trained", TMP / "hf_solo")
    dist.barrier()

    processor = AutoProcessor.from_pretrained(str(TMP / "hf_solo"), trust_remote_code=True)
    inputs = processor(text=PROMPT, images=str(TMP / "image.png"))
    assert torch.equal(inputs["input_ids"], tokens), "HF processor layout differs from the training layout"
    assert torch.equal(inputs["patches"], patches)
    hf = hf_reference(TMP / "hf_solo", trust_remote_code=True)
    assert type(hf).__name__ == "SoloForCausalLM"
    assert hf.config.sliding_window == 16 and hf.config.num_key_value_heads == 2
    assert hf.config.rope_parameters["rope_theta"] == 10000.0
    with torch.no_grad():
        theirs = hf(**inputs).logits
    assert theirs.shape[-1] == config.vocab_size
    torch.testing.assert_close(ours[..., : config.vocab_size], theirs, atol=ATOL, rtol=RTOL)

    # generate(): vision ids are suppressed (their scores are -inf at every step), the rest is ordinary decoding.
    out = hf.generate(**inputs, max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    vision_ids = list(range(config.first_special_id, config.first_special_id + 5))
    for step_scores in out.scores:
        assert torch.isinf(step_scores[:, vision_ids]).all() and (step_scores[:, vision_ids] < 0).all()
    new = out.sequences[0, tokens.shape[1] :]
    assert len(new) >= 1 and not any(int(t) in vision_ids for t in new)
    assert int(new[0]) == int(ours[0, -1, : config.vocab_size].argmax()), "first greedy token differs from ours"


@checks.check
def trained_tp2_checkpoint_loads_at_tp1_ignoring_trainer_state():
    """The TP=2 trained checkpoint (with optimizer/RNG/trainer state) loads into a TP=1 model: same logits."""
    from megatron_solo.convert.export_hf import CheckpointTensors

    parallel.initialize(tensor_model_parallel_size=1)
    meta = CheckpointTensors(TMP / "solo_trained" / "iter_0000003").meta
    assert any(k.startswith("optimizer.state.exp_avg.") for k in meta) and "rng_state" in str(sorted(meta))
    saved = torch.load(TMP / "trained_logits.pt")
    model, config = load_solo(TMP / "solo_trained", 1)
    ours = full_logits(model, saved["tokens"], saved["patches"])
    # Vocab padding depends on TP (384 rows here, 512 at TP=2); the real rows [0, V) are the same tensor.
    assert ours.shape[-1] == config.padded_vocab_size == 384 and saved["logits"].shape[-1] == 512
    v = config.vocab_size
    torch.testing.assert_close(ours[..., :v], saved["logits"][..., :v], atol=ATOL, rtol=RTOL)


@checks.check
def reimport_of_exported_solo_hf_keeps_vision_weights():
    """HF -> SOLO -> train -> SOLO-HF -> import again (e.g. after HF fine-tuning): the trained vision rows and
    projector are kept, not re-initialised, so the logits are those of the trained model."""
    from megatron_solo.convert.import_hf import import_hf

    parallel.initialize(tensor_model_parallel_size=2)
    import_hf(TMP / "hf_solo", TMP / "solo_reimported", tp=2)
    saved = torch.load(TMP / "trained_logits.pt")
    model, config = load_solo(TMP / "solo_reimported", 2)
    ours = full_logits(model, saved["tokens"], saved["patches"])
    torch.testing.assert_close(ours, saved["logits"], atol=ATOL, rtol=RTOL)


if __name__ == "__main__":
    checks.main()
