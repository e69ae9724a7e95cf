import random
from pathlib import Path

import pytest

SMOL_GGUF = Path("~/.cache/tokenmill/models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()


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


@pytest.fixture(scope="session")
def smol_tokenizer(request):
    """SmolLM2's tokenizer (from the GGUF, through transformers), cached as tokenizer.json in pytest's cache:
    loading a GGUF through transformers takes seconds, reading the JSON a fraction of one."""
    if not SMOL_GGUF.exists():
        pytest.skip(f"{SMOL_GGUF} is absent")
    from tokenizers import Tokenizer

    stat = SMOL_GGUF.stat()
    cached = request.config.cache.mkdir("tokenmill-tokenizers") / f"smollm2-{stat.st_size}-{int(stat.st_mtime)}.json"
    if not cached.exists():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(SMOL_GGUF.parent), gguf_file=SMOL_GGUF.name)
        hf.backend_tokenizer.save(str(cached))
    return Tokenizer.from_file(str(cached))
