"""SoloModel across real torchrun/gloo processes equals the TP=1 model (tests/workers/model_checks.py).

Two launches: 2 ranks (TP=2, DP=1) runs every check; 4 ranks (TP=2 x DP=2, a different micro-batch per DP rank)
re-runs the parity checks, which then also cover Megatron DDP's gradient sum and the DP loss reduction.
"""

import pytest

from tests.dist import launch

pytestmark = pytest.mark.dist

WORKER = "tests/workers/model_checks.py"
PARITY = ("tp2_matches_tp1", "tp2_sequence_parallel_matches_tp1")


@pytest.fixture(scope="module")
def tp2():
    return launch(WORKER, nproc=2)


@pytest.fixture(scope="module")
def tp2_dp2():
    return launch(WORKER, nproc=4, env={"SOLO_ONLY_CHECKS": ",".join(PARITY)})


def test_projector_shards_concat_equal_full(tp2):
    tp2.assert_check("projector_shards_concat_equal_full")


def test_tp2_matches_tp1(tp2):
    tp2.assert_check("tp2_matches_tp1")


def test_tp2_sequence_parallel_matches_tp1(tp2):
    tp2.assert_check("tp2_sequence_parallel_matches_tp1")


def test_tp2_sequence_parallel_unpacked_matches_tp1(tp2):
    tp2.assert_check("tp2_sequence_parallel_unpacked_matches_tp1")


def test_padded_vocab_rows_never_predicted_tp2(tp2):
    tp2.assert_check("padded_vocab_rows_never_predicted_tp2")


@pytest.mark.parametrize("check", PARITY)
def test_tp2_dp2_matches_tp1(tp2_dp2, check):
    tp2_dp2.assert_check(check)
