"""Reading a Hugging Face model folder: config.json and *.safetensors (single file or sharded with an index)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tokenmill.config import ModelConfig
from tokenmill.layers.rotary import SUPPORTED_ROPE_TYPES, rope_type_of


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{model_dir} has no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def hf_architecture(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures")
    if archs:
        return archs[0]
    return {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        cfg.get("model_type", ""), str(cfg.get("model_type"))
    )


def hf_model_config(cfg: dict[str, Any]) -> ModelConfig:
    """ModelConfig from config.json, rejecting features this model code does not implement."""
    config = ModelConfig.from_hf_dict(cfg)
    rope_type = rope_type_of(config.rope_scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope scaling {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    if cfg.get("mlp_bias"):
        raise ValueError("mlp_bias=True is not supported")
    if cfg.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    if config.architecture == "llama" and config.attention_bias:
        raise ValueError("Llama with attention_bias=True (bias on o_proj too) is not supported")
    return config


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights (other weight formats are not supported)")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"safetensors shards listed in the index are missing: {', '.join(missing)}")
    return files


def iter_safetensors_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, tensor) one tensor at a time from memory-mapped files, in the checkpoint's own dtype."""
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names = f.keys()
            for name in names:
                yield name, f.get_tensor(name)
