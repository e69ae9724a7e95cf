"""Random-weight model folders: written without transformers, read the same by tokenmill and by transformers."""

import json

import pytest
import torch

from tokenmill.models.hf_weights import iter_safetensors_weights
from tokenmill.models.random_weights import TINY_LLAMA, make_random_model_dir

SHAPE = dict(TINY_LLAMA, num_hidden_layers=1)


def test_same_seed_same_weights_and_another_seed_others(tmp_path):
    a = dict(iter_safetensors_weights(make_random_model_dir(tmp_path / "a", SHAPE, seed=3, std=0.2)))
    b = dict(iter_safetensors_weights(make_random_model_dir(tmp_path / "b", SHAPE, seed=3, std=0.2)))
    c = dict(iter_safetensors_weights(make_random_model_dir(tmp_path / "c", SHAPE, seed=4, std=0.2)))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], c[q])
    assert 0.15 < a[q].std().item() < 0.25
    assert torch.equal(a["model.norm.weight"], torch.ones(SHAPE["hidden_size"]))


def test_config_fills_llama_defaults_and_the_dtype(tmp_path):
    folder = make_random_model_dir(tmp_path, dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=1, num_attention_heads=4), torch.bfloat16)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["torch_dtype"]) == (4, 8, "bfloat16")
    weights = dict(iter_safetensors_weights(folder))
    assert weights["lm_head.weight"].shape == (64, 32)  # untied by default, as in LlamaConfig
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert (folder / "tokenizer.json").is_file()


def test_tied_embeddings_write_no_lm_head(tmp_path):
    folder = make_random_model_dir(tmp_path, dict(SHAPE, tie_word_embeddings=True))
    assert "lm_head.weight" not in dict(iter_safetensors_weights(folder))


@pytest.mark.parametrize("shape,message", [
    ("no-such-shape", "unknown shape 'no-such-shape'"),
    (dict(vocab_size=64, hidden_size=32), "needs intermediate_size, num_hidden_layers, num_attention_heads"),
])
def test_bad_shapes_are_named(tmp_path, shape, message):
    with pytest.raises(ValueError, match=message):
        make_random_model_dir(tmp_path, shape)


def test_transformers_and_tokenmill_read_the_same_model(tmp_path, tiny_hf, paged):
    transformers = pytest.importorskip("transformers")
    from tokenmill.models.loader import load_model

    folder = make_random_model_dir(tmp_path, SHAPE, std=0.2)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    loaded = load_model(folder, dtype=torch.float32)
    seq = [0, 5, 17, 42, 300, 7, 7, 511]
    (logits,) = paged.run(loaded.model, [seq], paged.one_step([len(seq)]))
    diff = (torch.log_softmax(logits, -1) - tiny_hf.logprobs(hf, seq)).abs().max().item()
    assert diff < 1e-3, f"max |logprob diff| {diff}"
