"""Helpers shared by the tokenizer tests: a varied text corpus, the default GGUF's location, a GGUF writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

DEFAULT_GGUF = Path.home() / ".cache" / "tokenmill" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

CORPUS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm; we'll see—maybe.",
    "I'M SURE THEY'VE SAID 'HELLO', you'd know",
    "12345 apples cost $3.14159 (≈ 1,000,000 yen) in 2024-01-02",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    '#include <stdio.h>\nint main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}\n',
    "   leading spaces and trailing   ",
    "a  b   c    d\n\n\nnew\t\ttabs\r\nwindows\u00a0nbsp\u3000ideographic",
    "\n",
    " ",
    "",
    "emoji 🎉🙂👍🏽 family 👨‍👩‍👧 flag 🇫🇷 keycap 1️⃣",
    "中文测试，日本語のテキスト、한국어 텍스트。",
    "Ελληνικά, русский, العربية, हिन्दी, ไทย",
    "Café déjà vu — naïve façade Ångström",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>tokenmill<file_sep>x.py",
    "not special: <|im_sta <im_start> |im_end|>",
    "x" * 300,
    "🎉" * 20,
]


def default_gguf_path() -> Path | None:
    """The default model file if it is already in the cache (tests never download it)."""
    try:
        from tokenmill.models import hub

        candidate = hub.cache_dir() / "models" / hub.DEFAULT_MODEL_FILE
    except (ImportError, AttributeError):
        candidate = DEFAULT_GGUF
    return candidate if candidate.is_file() else None


def write_tokenizer_gguf(
    path: Path,
    *,
    model: str,
    tokens: Sequence[str],
    token_types: Sequence[int],
    scores: Sequence[float] | None = None,
    merges: Sequence[str] | None = None,
    pre: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A GGUF holding only tokenizer metadata (plus the few llama.* keys readers expect)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_head_count(1)
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(list(tokens))
    writer.add_token_types(list(token_types))
    if scores is not None:
        writer.add_token_scores(list(scores))
    if merges is not None:
        writer.add_token_merges(list(merges))
    for key, value in (extra or {}).items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
