"""Shared fixtures: a tiny random-weight Llama folder and the default SmolLM2 GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tokenmill.models.random_weights import make_random_model_dir

    # std 0.2 spreads the logits, so greedy choices are far from ties and batch-invariance checks are meaningful.
    return make_random_model_dir(tmp_path_factory.mktemp("tiny-llama"), "tiny", std=0.2)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from tokenmill.models.hub import default_model_path

    return default_model_path()
