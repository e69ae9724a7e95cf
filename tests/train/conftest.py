"""A tiny dataset built with the real pipeline (BPE training, token files, meta) from generated English text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


def generated_documents(n_docs: int = 40, sentences: int = 60, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    subjects = ["the king", "a fool", "the queen", "my lord", "the duke", "a ghost", "the soldier", "her father"]
    verbs = ["loves", "fears", "follows", "betrays", "remembers", "answers", "forgives", "watches"]
    objects = ["the crown", "his brother", "the sea", "a letter", "the night", "their honour", "the garden"]
    docs = {}
    for d in range(n_docs):
        lines = []
        for _ in range(sentences):
            s, v, o = rng.choice(subjects), rng.choice(verbs), rng.choice(objects)
            lines.append(f"{s.capitalize()} {v} {o}, and {rng.choice(subjects)} {rng.choice(verbs)} {s}.")
        docs[f"gen/doc{d:03d}.txt"] = "\n".join(lines) + "\n"
    return docs


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    from tokenmill.train.data import build_dataset

    out = tmp_path_factory.mktemp("tiny-corpus")
    build_dataset(generated_documents(), out, vocab_size=320, val_permille=100, progress=False)
    return out
