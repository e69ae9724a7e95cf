"""Tokenizer.from_dir on what transformers' save_pretrained writes, plus config-file variations."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from tok_helpers import CORPUS

from tokenmill.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def saved_dir(hf_smol, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("smol_hf")
    hf_smol.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def from_dir(saved_dir) -> Tokenizer:
    return Tokenizer.from_dir(saved_dir)


def test_encodes_like_gguf_and_transformers(from_dir, smol, hf_smol):
    for text in CORPUS:
        ids = from_dir.encode(text)
        assert ids == smol.encode(text) == hf_smol.encode(text), text
        assert from_dir.decode(ids, skip_special_tokens=False) == text


def test_special_ids_and_template(from_dir, smol, hf_smol):
    assert from_dir.vocab_size == smol.vocab_size
    assert from_dir.bos_token_id == 1 and not from_dir.add_bos_token
    assert from_dir.eos_token_ids == [2]
    assert from_dir.pad_token_id == 2 and from_dir.unk_token_id == 0
    assert from_dir.all_special_ids == smol.all_special_ids
    conversation = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert from_dir.apply_chat_template(conversation) == hf_smol.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )


def test_from_source_hf_dir(saved_dir, from_dir):
    tok = Tokenizer.from_source(SimpleNamespace(kind="hf_dir", path=saved_dir))
    assert tok.encode("same 123") == from_dir.encode("same 123")
    assert Tokenizer.from_source(str(saved_dir)).encode("x y") == from_dir.encode("x y")


def _copy(saved_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "tok"
    shutil.copytree(saved_dir, dest)
    return dest


def test_generation_config_eos_and_template_in_config(saved_dir, tmp_path):
    d = _copy(saved_dir, tmp_path)
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}<|endoftext|>{% endfor %}"
    config["add_bos_token"] = True
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tok = Tokenizer.from_dir(d)
    # eos from tokenizer_config, then generation_config, then the template's turn-end marker <|endoftext|> (id 0)
    assert tok.eos_token_ids == [2, 5, 0]
    assert tok.add_bos_token and tok.encode("hi")[0] == 1
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "a<|endoftext|>"


def test_special_tokens_map_and_named_templates(saved_dir, tmp_path):
    d = _copy(saved_dir, tmp_path)
    (d / "chat_template.jinja").unlink()
    config = json.loads((d / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        config.pop(key, None)
    config["chat_template"] = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<|endoftext|>", "special": True}, "bos_token": "<|im_start|>"})
    )
    tok = Tokenizer.from_dir(d)
    assert tok.eos_token_ids == [0] and tok.bos_token_id == 1
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "D"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"name": "f"}]) == "T"


def test_no_template_falls_back_to_chatml(saved_dir, tmp_path):
    d = _copy(saved_dir, tmp_path)
    (d / "chat_template.jinja").unlink()
    tok = Tokenizer.from_dir(d)
    assert not tok.has_chat_template
    assert (
        tok.apply_chat_template([{"role": "user", "content": "x"}])
        == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_post_processor_bos_and_config_override(saved_dir, tmp_path):
    d = _copy(saved_dir, tmp_path)
    data = json.loads((d / "tokenizer.json").read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}},
    }
    (d / "tokenizer.json").write_text(json.dumps(data))
    tok = Tokenizer.from_dir(d)
    assert tok.add_bos_token and tok.encode("x")[0] == 1  # tokenizer.json's own post-processor is trusted
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(d)
    assert not tok.add_bos_token and tok.encode("x") == tok.encode("x", add_special_tokens=False)
