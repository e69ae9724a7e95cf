"""Shared fixtures for tokenizer tests: the default SmolLM2 GGUF, our tokenizer from it, transformers' reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from tok_helpers import DEFAULT_GGUF, default_gguf_path


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    path = default_gguf_path()
    if path is None:
        pytest.skip(f"default GGUF not present at {DEFAULT_GGUF}")
    return path


@pytest.fixture(scope="session")
def smol(gguf_path):
    from tokenmill.tokenizer import Tokenizer

    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="session")
def hf_smol_raw(gguf_path):
    """transformers' tokenizer from the GGUF, exactly as its GGUF converter builds it."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def hf_smol(hf_smol_raw):
    """The reference: transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer.

    transformers' GGUF converter ignores tokenizer.ggml.pre == "smollm" and falls back to plain GPT-2 splitting.
    SmolLM2's tokenizer.json (and llama.cpp's "smollm" regex set) first isolates every digit, then applies the GPT-2
    regex; the two differ on text like "  0" (whitespace before a digit). We restore that pre-tokenizer here.
    """
    import copy

    from tokenizers import pre_tokenizers

    hf = copy.deepcopy(hf_smol_raw)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return hf
