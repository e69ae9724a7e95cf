"""Shared fixtures: a tiny random-weight Llama folder and the default SmolLM2 GGUF."""

from __future__ import annotations

import random
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


def train_toy_bpe(vocab_size: int = 2000, seed: int = 0):
    """A small byte-level BPE (GPT-2 style pre-tokenizer) trained in ~0.2 s on random words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 8))) for _ in range(3000)]
    corpus = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


@pytest.fixture(scope="session")
def toy_tokenizer():
    return train_toy_bpe()


@pytest.fixture()
def one_torch_thread():
    """Tiny models on the 2 shared CI cores: intra-op threads only add contention."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
