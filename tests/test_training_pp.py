"""Pipeline parallelism end to end: pretrain_solo.py under real torchrun + gloo (CPU) equals the one-process run.

The debug model with 4 layers, seq 256, GBS 4 / MBS 1 (4 micro-batches per step: more than the 2 stages), Adam +
warm-up + cosine, distributed optimizer. Eight launches share one module fixture:

- ``ref``: 1 process (PP=1), iterations 1..15, saves at 5, 10, 15: the reference;
- ``pp2``: PP=2 (2 processes, 1F1B) resumes ``ref`` at 5 and runs 6..15;
- ``vpp``: PP=2 with 1 layer per virtual stage (2 chunks per rank, interleaved 1F1B), 6..15 from ``ref``'s 5;
- ``a``: TP=2 x PP=2 (4 processes) with sequence parallelism, 6..15 from ``ref``'s 5, saves at 10 and 15;
- ``b``: 1 process (PP=1) resumes ``a``'s iteration 10 (weights and optimizer state resharded from 4 tensor /
  pipeline shards to one), runs 11..13, saves;
- ``c``: back to a pipeline: PP=2 with virtual stages (2 processes) resumes ``b`` (one chunk's keys split into two
  chunks per rank), runs 14..15;
- ``sig``: as ``pp2`` with ``--exit-signal-handler`` and ``--save``; rank 0 alone (the FIRST stage: it computes no
  loss) gets SIGTERM after iteration 8 (a preemption): every stage stops at the same step and saves;
- ``sig2``: resumes ``sig`` at the same layout (RNG restored) and runs to 15.

Every pipeline run starts from a checkpoint (its weights resharded into stages): a FRESH model's initialisation
depends on how the layers are split over stages (as in Megatron-LM), so fresh runs at different PP differ from
step 1. ``pp2`` and ``c`` run with ``--language-model-type auto``: on megatron-core 0.19 (CI's second step) they
use HybridModel, so there the GPTModel reference is also matched by HybridModel under PP=2 and a GPTModel checkpoint
resumes into HybridModel chunks; on 0.16 they are GPTModel runs.

Tolerance: rtol 1e-4 on per-step losses (fp32; other reduction orders), as tests/test_training.py.
"""

from __future__ import annotations

import pytest

from megatron_solo.model.hybrid import hybrid_available
from tests.test_training import LOSS_RTOL, _close, _ok, _torchrun

ITERS = 15
PP_STEPS = range(6, ITERS + 1)  # 10 steps of every pipeline layout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_solo.preprocess.demo import build_demo_shards

    tmp = tmp_path_factory.mktemp("train_pp")
    data = build_demo_shards(tmp / "demo", seq_length=256)
    common = [
        "--model", "debug", "--num-layers", "4", "--data-path", data["train"], "--valid-data-path", data["valid"],
        "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", str(ITERS),
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--seed", "7", "--use-distributed-optimizer", "--log-throughput",
    ]  # fmt: skip
    from_ref = [*common, "--load", str(tmp / "ref" / "iter_0000005")]
    pp2 = ["--pipeline-model-parallel-size", "2"]
    vpp = [*pp2, "--num-layers-per-virtual-pipeline-stage", "1"]
    auto = ["--language-model-type", "auto"]  # HybridModel where megatron-core has it (0.19), GPTModel on 0.16
    r = {"tmp": tmp}
    ref_flags = [*common, "--save", str(tmp / "ref"), "--save-interval", "5", "--eval-interval", "10"]
    r["ref"] = _torchrun(1, ref_flags, tmp / "ref.jsonl")
    r["pp2"] = _torchrun(2, [*from_ref, *pp2, *auto, "--eval-interval", "10"], tmp / "pp2.jsonl")
    r["vpp"] = _torchrun(2, [*from_ref, *vpp], tmp / "vpp.jsonl")
    tp2sp = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]  # P2P shape [b*s/TP, 1, h]
    a_flags = [*from_ref, *tp2sp, *pp2, "--save", str(tmp / "a"), "--save-interval", "5"]
    r["a"] = _torchrun(4, a_flags, tmp / "a.jsonl")
    b_flags = [*common, "--load", str(tmp / "a" / "iter_0000010"), "--save", str(tmp / "b"), "--exit-interval", "13"]
    r["b"] = _torchrun(1, b_flags, tmp / "b.jsonl")
    r["c"] = _torchrun(2, [*common, *vpp, *auto, "--load", str(tmp / "b")], tmp / "c.jsonl")
    sig_flags = [*common, *pp2, *auto, "--eval-interval", "10", "--save", str(tmp / "sig"), "--exit-signal-handler"]
    r["sig"] = _torchrun(
        2, [*sig_flags, "--load", str(tmp / "ref" / "iter_0000005")], tmp / "sig.jsonl", sigterm_at=(0, 8)
    )
    r["sig2"] = _torchrun(2, [*sig_flags, "--load", str(tmp / "sig")], tmp / "sig2.jsonl")
    return r


@pytest.mark.dist
def test_pp2_matches_single_process(runs):
    _ok(runs["ref"])
    _ok(runs["pp2"])
    ref, pp2 = runs["ref"]["losses"], runs["pp2"]["losses"]
    assert sorted(ref) == list(range(1, ITERS + 1)) and sorted(pp2) == list(PP_STEPS)
    assert ref[ITERS] < ref[1] - 0.5  # it trains
    _close(pp2, ref, PP_STEPS)
    _close(runs["pp2"]["valid"], runs["ref"]["valid"], (10,))  # the forward-only schedule too
    out = runs["pp2"]["out"]
    assert "= TP 1 x PP 2 x DP 1" in out and "4 micro-batches/step" in out and "resumed from" in out
    assert ("HybridModel" if hybrid_available() else "GPTModel") in out
    for field in ("| loss ", "| vision-lm ", "| text-lm ", "| tokens/s "):  # logged values from the last stage
        assert field in out


@pytest.mark.dist
def test_virtual_pipeline_matches_single_process(runs):
    _ok(runs["vpp"])
    assert "(2 virtual stages per rank)" in runs["vpp"]["out"]
    _close(runs["vpp"]["losses"], runs["ref"]["losses"], PP_STEPS)


@pytest.mark.dist
def test_tp2_pp2_matches_single_process(runs):
    _ok(runs["a"])
    assert "= TP 2 x PP 2 x DP 1" in runs["a"]["out"]
    _close(runs["a"]["losses"], runs["ref"]["losses"], PP_STEPS)


@pytest.mark.dist
def test_reshard_tp2pp2_to_pp1_and_back_to_virtual_pp2(runs):
    b, c, ref = runs["b"], runs["c"], runs["ref"]["losses"]
    _ok(b)
    _ok(c)
    assert "resumed from" in b["out"] and "at iteration 10" in b["out"], b["out"][-3000:]
    assert sorted(b["losses"]) == [11, 12, 13]
    _close(b["losses"], ref, (11, 12, 13), rtol=LOSS_RTOL)
    assert "at iteration 13" in c["out"] and sorted(c["losses"]) == [14, 15]
    _close(c["losses"], ref, (14, 15), rtol=LOSS_RTOL)


@pytest.mark.dist
def test_sigterm_to_a_first_stage_rank_stops_every_stage_at_one_step_and_resumes_identically(runs):
    sig, sig2, pp2 = runs["sig"], runs["sig2"], runs["pp2"]["losses"]
    _ok(sig)  # exit code 0: a preempted job that saved is a success
    stopped = max(sig["losses"])
    assert 8 <= stopped < ITERS, sig["out"][-3000:]
    assert sig["out"].count(f"exiting after iteration {stopped}: SIGTERM received") == 1  # printed once
    # the save at the stop (the tracker moves on with sig2, which saves into the same dir)
    assert f"saved checkpoint {runs['tmp'] / 'sig' / f'iter_{stopped:07d}'}" in sig["out"]
    assert (runs["tmp"] / "sig" / f"iter_{stopped:07d}" / "trainer_state.json").is_file()
    assert {i: sig["losses"][i] for i in range(6, stopped + 1)} == {i: pp2[i] for i in range(6, stopped + 1)}
    _ok(sig2)
    assert f"at iteration {stopped}" in sig2["out"] and sorted(sig2["losses"]) == list(range(stopped + 1, ITERS + 1))
    assert sig2["losses"] == {i: pp2[i] for i in sig2["losses"]}  # bit-identical to the uninterrupted PP=2 run
