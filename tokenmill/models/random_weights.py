"""Complete model folders with random weights, for benchmarks and tests that need a known shape, not a trained model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

LLAMA_3_2_1B: dict[str, Any] = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, rope_theta=500000.0, max_position_embeddings=131072,
    tie_word_embeddings=True, rms_norm_eps=1e-5,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=0, eos_token_id=1,
)

TINY_LLAMA: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)

SHAPES = {"llama-3.2-1b": LLAMA_3_2_1B, "tiny": TINY_LLAMA}


# LlamaConfig's defaults for what a shape leaves out: the folders load in transformers and in tokenmill alike.
LLAMA_CONFIG_DEFAULTS: dict[str, Any] = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", initializer_range=0.02,
    max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, attention_bias=False,
    attention_dropout=0.0, mlp_bias=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    pretraining_tp=1, use_cache=True,
)
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def make_random_model_dir(out: str | Path, shape: dict[str, Any] | str, dtype: torch.dtype = torch.float32,
                          seed: int = 0, std: float = 0.02, device: str = "cpu") -> Path:
    """Writes config.json, model.safetensors and a word-level tokenizer ("<i>" is token i) into `out`: a Llama of
    `shape` (a name in SHAPES or config.json fields) whose matrices are drawn from N(0, std) by a generator seeded
    with `seed` on `device`, norm weights ones; saved in `dtype`."""
    if isinstance(shape, str) and shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    config = {**LLAMA_CONFIG_DEFAULTS, **(SHAPES[shape] if isinstance(shape, str) else shape)}
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"a model shape needs {', '.join(missing)}")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.setdefault("num_key_value_heads", heads)
    head_dim = config.setdefault("head_dim", hidden // heads)
    inter, vocab = config["intermediate_size"], config["vocab_size"]
    config["torch_dtype"] = str(dtype).removeprefix("torch.")

    generator = torch.Generator(device=device).manual_seed(seed)

    def matrix(rows: int, cols: int) -> torch.Tensor:
        weight = torch.empty(rows, cols, device=device).normal_(std=std, generator=generator)
        return weight.to(dtype).cpu()

    def ones() -> torch.Tensor:
        return torch.ones(hidden, dtype=dtype)

    tensors = {"model.embed_tokens.weight": matrix(vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        tensors.update({
            layer + "self_attn.q_proj.weight": matrix(heads * head_dim, hidden),
            layer + "self_attn.k_proj.weight": matrix(kv_heads * head_dim, hidden),
            layer + "self_attn.v_proj.weight": matrix(kv_heads * head_dim, hidden),
            layer + "self_attn.o_proj.weight": matrix(hidden, heads * head_dim),
            layer + "mlp.gate_proj.weight": matrix(inter, hidden),
            layer + "mlp.up_proj.weight": matrix(inter, hidden),
            layer + "mlp.down_proj.weight": matrix(hidden, inter),
            layer + "input_layernorm.weight": ones(),
            layer + "post_attention_layernorm.weight": ones(),
        })
    tensors["model.norm.weight"] = ones()
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = matrix(vocab, hidden)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_wordlevel_tokenizer(out, vocab, bos_id=config["bos_token_id"], eos_id=config["eos_token_id"])
    return out


def write_wordlevel_tokenizer(folder: Path, vocab_size: int, bos_id: int | None = 0, eos_id: int | None = 1) -> None:
    """A tokenizer in which text "<5> <17>" is tokens [5, 17]: enough to drive a random-weight model end to end."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<2>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.save(str(Path(folder) / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<2>"}
    if bos_id is not None:
        config["bos_token"] = f"<{bos_id}>"
    if eos_id is not None:
        config["eos_token"] = f"<{eos_id}>"
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config))
