"""Pipeline parallelism end to end: pretrain_solo.py under real torchrun + gloo (CPU) equals the one-process run.

The debug model with 4 layers, seq 256, GBS 4 / MBS 1 (4 micro-batches per step: more than the 2 stages), Adam +
warm-up + cosine, 10 iterations. Seven launches share one module fixture:

- ``init``: 1 process, one step, saves: the common starting weights (a fresh model's initialisation depends on
  how the layers are split over stages, as in Megatron-LM, so every run starts from these weights via
  ``--pretrained-checkpoint``: fresh optimizer and schedule, iteration 0);
- ``ref``: 1 process (PP=1), the reference;
- ``pp2``: PP=2 (2 processes, 1F1B);
- ``vpp``: PP=2 with 1 layer per virtual stage (2 chunks per rank, interleaved 1F1B);
- ``a``: TP=2 x PP=2 (4 processes), distributed optimizer, saves at 5 and 10;
- ``b``: 1 process (PP=1) resumes ``a``'s iteration 5 (weights and distributed-optimizer state resharded from
  4 pipeline/tensor shards to one), runs 6..8, saves;
- ``c``: back to a pipeline: PP=2 with virtual stages (2 processes) resumes ``b`` (one chunk's keys split into
  two chunks per rank), runs 9..10.

``pp2`` and ``c`` run with ``--language-model-type auto``: on megatron-core 0.19 (CI's second step) they use
HybridModel, so there the GPTModel reference is also matched by HybridModel under PP=2 and a GPTModel checkpoint
resumes into HybridModel chunks; on 0.16 they are GPTModel runs.

Tolerance: rtol 1e-4 on per-step losses (fp32; other reduction orders), as tests/test_training.py.
"""

from __future__ import annotations

import pytest

from megatron_solo.model.hybrid import hybrid_available
from tests.test_training import LOSS_RTOL, _close, _ok, _torchrun

ITERS = 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_solo.preprocess.demo import build_demo_shards

    tmp = tmp_path_factory.mktemp("train_pp")
    data = build_demo_shards(tmp / "demo", seq_length=256)
    common = [
        "--model", "debug", "--num-layers", "4", "--data-path", data["train"], "--valid-data-path", data["valid"],
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--seed", "7",
    ]  # fmt: skip
    start = [*common, "--pretrained-checkpoint", str(tmp / "init")]
    pp2 = ["--pipeline-model-parallel-size", "2"]
    tp2pp2 = ["--tensor-model-parallel-size", "2", *pp2, "--use-distributed-optimizer"]
    r = {"tmp": tmp}
    r["init"] = _torchrun(1, [*common, "--exit-interval", "1", "--save", str(tmp / "init")], tmp / "init.jsonl")
    r["ref"] = _torchrun(1, [*start, "--eval-interval", "5"], tmp / "ref.jsonl")
    auto = ["--language-model-type", "auto"]  # HybridModel where megatron-core has it (0.19), GPTModel on 0.16
    r["pp2"] = _torchrun(2, [*start, *pp2, *auto, "--eval-interval", "5"], tmp / "pp2.jsonl")
    vpp = [*pp2, "--num-layers-per-virtual-pipeline-stage", "1"]
    r["vpp"] = _torchrun(2, [*start, *vpp], tmp / "vpp.jsonl")
    a_flags = [*start, *tp2pp2, "--save", str(tmp / "a"), "--save-interval", "5"]
    r["a"] = _torchrun(4, a_flags, tmp / "a.jsonl")
    b_flags = [*common, "--use-distributed-optimizer", "--load", str(tmp / "a" / "iter_0000005")]
    r["b"] = _torchrun(1, [*b_flags, "--save", str(tmp / "b"), "--exit-interval", "8"], tmp / "b.jsonl")
    c_flags = [*common, *vpp, *auto, "--use-distributed-optimizer", "--load", str(tmp / "b")]
    r["c"] = _torchrun(2, c_flags, tmp / "c.jsonl")
    return r


@pytest.mark.dist
def test_pp2_matches_single_process(runs):
    _ok(runs["init"])
    _ok(runs["ref"])
    _ok(runs["pp2"])
    ref, pp2 = runs["ref"]["losses"], runs["pp2"]["losses"]
    assert sorted(ref) == sorted(pp2) == list(range(1, ITERS + 1))
    _close(pp2, ref, range(1, ITERS + 1))
    assert ref[ITERS] < ref[1] - 0.5  # it trains
    _close(runs["pp2"]["valid"], runs["ref"]["valid"], (5, 10))  # forward-only schedule too
    out = runs["pp2"]["out"]
    assert "= TP 1 x PP 2 x DP 1" in out and "4 micro-batches/step" in out
    assert ("HybridModel" if hybrid_available() else "GPTModel") in out
    for field in ("| loss ", "| vision-lm ", "| text-lm ", "| tokens/s "):  # logged values from the last stage
        assert field in out


@pytest.mark.dist
def test_virtual_pipeline_matches_single_process(runs):
    _ok(runs["vpp"])
    assert "(2 virtual stages per rank)" in runs["vpp"]["out"]
    _close(runs["vpp"]["losses"], runs["ref"]["losses"], range(1, ITERS + 1))


@pytest.mark.dist
def test_tp2_pp2_matches_single_process(runs):
    _ok(runs["a"])
    assert "= TP 2 x PP 2 x DP 1" in runs["a"]["out"]
    _close(runs["a"]["losses"], runs["ref"]["losses"], range(1, ITERS + 1))


@pytest.mark.dist
def test_reshard_tp2pp2_to_pp1_and_back_to_virtual_pp2(runs):
    b, c, ref = runs["b"], runs["c"], runs["ref"]["losses"]
    _ok(b)
    _ok(c)
    assert "resumed from" in b["out"] and "at iteration 5" in b["out"], b["out"][-3000:]
    assert sorted(b["losses"]) == [6, 7, 8]
    _close(b["losses"], ref, (6, 7, 8), rtol=LOSS_RTOL)
    assert "at iteration 8" in c["out"] and sorted(c["losses"]) == [9, 10]
    _close(c["losses"], ref, (9, 10), rtol=LOSS_RTOL)
