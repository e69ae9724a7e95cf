from pathlib import Path

import pytest

SMOL_GGUF = Path("~/.cache/tokenmill/models/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()


@pytest.fixture(scope="session")
def smol_tokenizer(request, tmp_path_factory):
    """SmolLM2's tokenizer (from the GGUF, through transformers), cached as tokenizer.json in pytest's cache:
    loading a GGUF through transformers takes seconds, reading the JSON a fraction of one."""
    if not SMOL_GGUF.exists():
        pytest.skip(f"{SMOL_GGUF} is absent")
    from tokenizers import Tokenizer

    stat = SMOL_GGUF.stat()
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    folder = cache.mkdir("tokenmill-tokenizers") if cache else tmp_path_factory.mktemp("tokenizers")
    cached = folder / f"smollm2-{stat.st_size}-{int(stat.st_mtime)}.json"
    if not cached.exists():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(SMOL_GGUF.parent), gguf_file=SMOL_GGUF.name)
        hf.backend_tokenizer.save(str(cached))
    return Tokenizer.from_file(str(cached))
