"""HybridModel (megatron-core >= 0.19) as SoloModel's language model equals the GPTModel path
(tests/workers/hybrid_checks.py, 2 gloo ranks). Skipped on megatron-core 0.16, which has no HybridModel; CI runs it
in its 0.19.2 step (the file name matches conftest's MCORE_VERSION_SENSITIVE ``test_model``)."""

import pytest

from megatron_solo.model.hybrid import hybrid_available
from tests.dist import launch

pytestmark = [
    pytest.mark.dist,
    pytest.mark.skipif(not hybrid_available(), reason="megatron-core without models.hybrid (< 0.19)"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return launch(
        "tests/workers/hybrid_checks.py", nproc=2, env={"SOLO_HYBRID_TMP": str(tmp_path_factory.mktemp("hyb"))}
    )


def test_hybrid_matches_gpt_tp2_sequence_parallel(run):
    run.assert_check("hybrid_matches_gpt_tp2_sequence_parallel")


def test_checkpoints_cross_load_between_gpt_and_hybrid(run):
    run.assert_check("checkpoints_cross_load_between_gpt_and_hybrid")


def test_hybrid_needs_megatron_core_019():
    from megatron_solo.model.hybrid import resolve_language_model_type

    assert resolve_language_model_type("auto") == "hybrid" and resolve_language_model_type("gpt") == "gpt"
