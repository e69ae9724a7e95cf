"""Complete model folders with random weights, for benchmarks and tests that need a known shape, not a trained model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

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


def make_random_model_dir(out: str | Path, shape: dict[str, Any] | str, dtype: torch.dtype = torch.float32,
                          seed: int = 0, std: float = 0.02, device: str = "cpu") -> Path:
    """Writes config.json, model.safetensors and a word-level tokenizer ("<i>" is token i) into `out`. Needs
    transformers (its Llama writes the folder; the test extra installs it): ValueError without it."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise ValueError("random-weight models are written with transformers, which is not installed: "
                         "pip install transformers") from None

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**(SHAPES[shape] if isinstance(shape, str) else shape))
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=std)
    model.to(dtype).save_pretrained(out)
    write_wordlevel_tokenizer(out, cfg.vocab_size, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
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
