"""Shared pytest configuration: which test files also run in CI's megatron-core 0.19.2 step."""

from __future__ import annotations

import pytest

# Files whose tests exercise megatron-core directly (model, TP, trainer, conversion): CI runs them on 0.16.1 AND 0.19.2.
MCORE_VERSION_SENSITIVE = ("test_tp_parity", "test_model", "test_training", "test_platform", "test_convert")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.stem.startswith(MCORE_VERSION_SENSITIVE):
            item.add_marker(pytest.mark.mcore019)


@pytest.fixture(scope="session")
def tiny_solo(tmp_path_factory):
    """A tiny random SOLO model as a SOLO checkpoint and an exported HF dir, plus images (tests/tiny_solo.py);
    built once per session (~30 s) for the generate / evaluate / lmms-eval tests."""
    from tests.tiny_solo import build_tiny_solo

    return build_tiny_solo(tmp_path_factory.mktemp("tiny_solo"))
