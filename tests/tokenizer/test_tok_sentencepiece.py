"""SentencePiece-style GGUF vocabularies (tokenizer.ggml.model == "llama"): merges from scores, byte fallback, BOS."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tok_helpers import write_tokenizer_gguf

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.tokenizer import Tokenizer

_WORDS = ["▁Hello", "▁world", "▁the", "▁is", "ing", "▁test", "▁token", "▁Paris"]
_CHARS = sorted(set("".join(_WORDS)) | set("abcdefghijklmnopqrstuvwxyzHWP▁,.!"))


def _spm_vocab() -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)]]
    types = [2, 3, 3, *[6] * 256]
    scores = [0.0] * len(tokens)
    merged = sorted({w[:i] for w in _WORDS for i in range(2, len(w) + 1)}, key=lambda p: (len(p), p))
    # Like a trained SentencePiece model: distinct scores, pieces learned earlier score higher; characters last.
    for rank, piece in enumerate(merged + _CHARS):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
    return tokens, types, scores


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory) -> Path:
    tokens, types, scores = _spm_vocab()
    d = tmp_path_factory.mktemp("spm")
    write_tokenizer_gguf(
        d / "spm.gguf",
        model="llama",
        tokens=tokens,
        token_types=types,
        scores=scores,
        extra={"bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0},
    )
    return d


@pytest.fixture(scope="module")
def spm(spm_dir) -> Tokenizer:
    return Tokenizer.from_gguf(spm_dir / "spm.gguf")


@pytest.fixture(scope="module")
def hf_spm(spm_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(spm_dir), gguf_file="spm.gguf")


def test_bos_and_prefix_space(spm):
    ids = spm.encode("Hello world")
    assert spm.convert_ids_to_tokens(ids) == ["<s>", "▁Hello", "▁world"]
    assert spm.add_bos_token and spm.bos_token_id == 1 and spm.eos_token_ids == [2]
    assert spm.encode("Hello world", add_special_tokens=False) == ids[1:]
    assert spm.decode(ids) == "Hello world"


def test_byte_fallback(spm):
    ids = spm.encode("Héllo 中", add_special_tokens=False)
    assert spm.convert_ids_to_tokens(ids) == [
        "▁H",
        "<0xC3>",
        "<0xA9>",
        "l",
        "l",
        "o",
        "▁",
        "<0xE4>",
        "<0xB8>",
        "<0xAD>",
    ]
    assert spm.decode(ids) == "Héllo 中"


def test_space_after_special_token_like_llama_cpp(spm):
    # llama.cpp prefixes a space to every text run that follows a special token (so does HF's legacy Llama tokenizer)
    ids = spm.encode("the</s>Hello", add_special_tokens=False)
    assert spm.convert_ids_to_tokens(ids) == ["▁the", "</s>", "▁Hello"]


_SPM_TEXT = st.lists(
    st.sampled_from(["Hello", " world", " the", " is", "ing", " test", " token", " ", "  ", "é", "中", "!", "x", "Pa"]),
    max_size=12,
).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_SPM_TEXT)
def test_matches_transformers_on_plain_text(spm, hf_spm, text):
    ids = spm.encode(text)
    assert ids == hf_spm.encode(text)
    assert spm.decode(ids) == hf_spm.decode(ids, skip_special_tokens=True)


def test_detokenizer_keeps_leading_space_with_prompt_context(spm):
    prompt = spm.encode("the")
    output = spm.encode(" Paris is", add_special_tokens=False)
    assert spm.convert_ids_to_tokens(output) == ["▁Paris", "▁is"]
    detok = IncrementalDetokenizer(spm, prompt, True, [], False)
    text = "".join(detok.update([t]).delta_text for t in output) + detok.flush().delta_text
    assert text == " Paris is"  # prompt + output reads "the Paris is"
    no_prompt = IncrementalDetokenizer(spm, [], True, [], False)
    text = "".join(no_prompt.update([t]).delta_text for t in output) + no_prompt.flush().delta_text
    assert text == spm.decode(output) == "Paris is"


def test_detokenizer_byte_fallback_never_splits_a_character(spm):
    output = spm.encode("中é!", add_special_tokens=False)
    detok = IncrementalDetokenizer(spm, [], True, [], False)
    deltas = [detok.update([t]).delta_text for t in output] + [detok.flush().delta_text]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == spm.decode(output)
