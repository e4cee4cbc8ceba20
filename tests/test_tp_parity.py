"""Megatron-Core's TP layers and GPTModel on CPU/gloo through megatron_solo.platform: TP=2 equals unsharded."""

import pytest

from tests.dist import launch

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def run():
    return launch("tests/workers/tp_parity.py", nproc=2)


def test_column_row_parallel_equal_linear(run):
    run.assert_check("column_row_parallel_equal_linear")


def test_gpt_tp2_matches_tp1(run):
    run.assert_check("gpt_tp2_matches_tp1")
