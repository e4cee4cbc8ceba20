"""HF Mistral <-> SOLO conversion, the shipped HF classes, and the captioning CLI (CPU).

One torchrun launch (tests/workers/convert_roundtrip.py) builds a tiny random HF MistralForCausalLM with real
transformers code, imports it at TP=1 and TP=2, trains the TP=2 model 3 steps and exports it; the tests below read
its per-check results and then drive the generate CLI on both formats of the trained model.
"""

import ast
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_solo.convert import keymap
from tests.dist import REPO, launch


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def run(workdir):
    return launch("tests/workers/convert_roundtrip.py", nproc=2, env={"SOLO_CONVERT_TMP": str(workdir)})


@pytest.mark.dist
def test_import_tp1_logits_match_hf(run):
    run.assert_check("setup_inputs")
    run.assert_check("import_tp1_logits_match_hf")


@pytest.mark.dist
def test_import_tp2_logits_match_hf(run):
    run.assert_check("import_tp2_logits_match_hf")


@pytest.mark.dist
def test_import_new_rows_mean_init_and_tp_independent(run):
    run.assert_check("import_extends_rows_with_mean_and_is_tp_independent")


@pytest.mark.dist
def test_tokenizer_extension_is_the_preprocessing_one(run):
    run.assert_check("tokenizer_extension_is_the_preprocessing_one")


@pytest.mark.dist
def test_roundtrip_tp2_train_export_matches_hf_processor(run):
    run.assert_check("roundtrip_tp2_train_export_matches_hf_processor")


@pytest.mark.dist
def test_trained_tp2_checkpoint_loads_at_tp1_ignoring_trainer_state(run):
    run.assert_check("trained_tp2_checkpoint_loads_at_tp1_ignoring_trainer_state")


@pytest.mark.dist
def test_reimport_of_exported_solo_hf_keeps_vision_weights(run):
    run.assert_check("reimport_of_exported_solo_hf_keeps_vision_weights")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


@pytest.mark.dist
def test_import_and_export_clis_reproduce_the_library_calls(run, workdir):
    """`import_hf --tp 2` (re-launches itself under torchrun) and `export_hf` write what the worker's calls wrote."""
    from safetensors.torch import load_file

    from megatron_solo.convert.export_hf import CheckpointTensors

    run.assert_check("roundtrip_tp2_train_export_matches_hf_processor")
    out = workdir / "cli_tp2"
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_solo.convert.import_hf", "--hf-dir", str(workdir / "hf_mistral"),
         "--out", str(out), "--tp", "2"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TP=2" in proc.stdout and "vocab=325 (padded 512)" in proc.stdout, proc.stdout
    ours, ref = CheckpointTensors(out / "iter_0000000"), CheckpointTensors(workdir / "solo_tp2" / "iter_0000000")
    assert sorted(ours.meta) == sorted(ref.meta)
    keys = [k for k in ref.meta if hasattr(ref.meta[k], "size")]
    for key in keys:
        torch.testing.assert_close(ours.load({key: None})[key], ref.load({key: None})[key], atol=0, rtol=0)

    from megatron_solo.convert.export_hf import main as export_main

    assert export_main(["--checkpoint", str(workdir / "solo_trained"), "--out", str(workdir / "hf_cli")]) == 0
    a, b = load_file(workdir / "hf_cli" / "model.safetensors"), load_file(workdir / "hf_solo" / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("module", ["megatron_solo.convert.import_hf", "megatron_solo.convert.export_hf",
                                    "megatron_solo.generate"])  # fmt: skip
def test_cli_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--checkpoint" in text or "--hf-dir" in text


def _cli(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_solo.generate", *args, "--json"], cwd=REPO, env=_env(),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.dist
def test_generate_cli_same_tokens_from_solo_checkpoint_and_hf_dir(run, workdir):
    run.assert_check("roundtrip_tp2_train_export_matches_hf_processor")
    from megatron_solo.generate import generate, load

    image = str(workdir / "image.png")
    from_solo = _cli("--checkpoint", str(workdir / "solo_trained"), "--image", image,
                     "--prompt", "a photo of the sea", "--greedy", "--max-new-tokens", "6")  # fmt: skip
    model, processor = load(workdir / "hf_solo", device="cpu")
    text, ids = generate(model, processor, "a photo of the sea", [image], max_new_tokens=6)
    assert from_solo["ids"] == ids and from_solo["text"] == text
    assert len(ids) == 6
    # Sampling: reproducible for a seed, and it really samples (a high temperature leaves the greedy path).
    sampled = [generate(model, processor, "a photo", [image], 12, greedy=False, temperature=5.0, seed=s)[1]
               for s in (1, 1, 2)]  # fmt: skip
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    vision = set(model.config.vision_token_ids.values())
    assert not vision & {t for s in sampled for t in s}


def test_keymap_qkv_grouping_round_trip():
    heads = keymap.Heads(num_heads=4, num_kv_heads=2, head_dim=3)
    hidden = 5
    q = torch.arange(4 * 3 * hidden, dtype=torch.float32).reshape(12, hidden)
    k = 1000 + torch.arange(2 * 3 * hidden, dtype=torch.float32).reshape(6, hidden)
    v = 2000 + torch.arange(2 * 3 * hidden, dtype=torch.float32).reshape(6, hidden)
    qkv = keymap.qkv_to_mcore(q, k, v, heads)
    # Megatron's layout: per KV group g, [q heads 2g, 2g+1; k_g; v_g].
    expected = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(qkv, expected)
    assert all(torch.equal(a, b) for a, b in zip(keymap.qkv_to_hf(qkv, heads), (q, k, v)))
    gate, up = torch.randn(7, hidden), torch.randn(7, hidden)
    assert all(torch.equal(a, b) for a, b in zip(keymap.fc1_to_hf(keymap.fc1_to_mcore(gate, up)), (gate, up)))
    names = keymap.all_hf_names(2)
    assert len(names) == len(set(names)) == 3 + 2 * 9 + 1


def test_hf_remote_files_import_only_allowed_packages():
    """The files copied into HF dirs must load with transformers' own remote-code import check."""
    from transformers.dynamic_module_utils import get_imports, get_relative_imports

    allowed = {"transformers", "torch", "numpy", "PIL", "sentencepiece"} | set(sys.stdlib_module_names)
    for name in ("configuration_solo.py", "modeling_solo.py", "processing_solo.py"):
        path = REPO / "megatron_solo" / "convert" / "hf_remote" / name
        assert set(get_imports(path)) <= allowed, (name, get_imports(path))
        assert set(get_relative_imports(path)) <= {"configuration_solo", "modeling_solo", "processing_solo"}
        ast.parse(path.read_text())


def test_import_errors_name_the_input(tmp_path):
    from megatron_solo.convert.import_hf import ConversionError, SafetensorsReader, read_hf_config

    with pytest.raises(ConversionError, match="no config.json"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConversionError, match="not a Mistral-architecture"):
        read_hf_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"no \*\.safetensors weights \(only \.bin"):
        SafetensorsReader(tmp_path)
