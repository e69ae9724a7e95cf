"""load_model: a name, path or Hub id -> a model with weights, its ModelConfig, and where it came from.

Weights stream one tensor at a time from the file (memory-mapped safetensors, or GGUF dequantized per tensor)
straight into parameters already allocated in the target dtype and device, so no second full copy is ever held.
Parcae folders (exports, training runs, parcae-lm checkpoints; see models/parcae_checkpoint.py) load whole and are
wrapped in ParcaeForEngine at the requested recurrence T.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import nn

from tokenmill.config import ModelConfig, parse_dtype
from tokenmill.layers.attention import AttentionBackend
from tokenmill.models.gguf_weights import gguf_architecture, iter_gguf_weights, open_gguf, read_gguf_config
from tokenmill.models.hf_weights import hf_architecture, hf_model_config, iter_safetensors_weights, read_hf_config
from tokenmill.models.hub import ModelSource, resolve_model
from tokenmill.models.parcae_checkpoint import parcae_folder_model_config, parcae_format, read_parcae_checkpoint
from tokenmill.models.parcae_engine import ParcaeForEngine
from tokenmill.models.registry import get_model_class


class LoadedModel(NamedTuple):
    model: nn.Module
    config: ModelConfig
    source: ModelSource


def load_model(
    path_or_id: str | os.PathLike | ModelSource | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    attn_backend: AttentionBackend | None = None,
    parcae_recurrence: int | None = None,
) -> LoadedModel:
    """`parcae_recurrence`: the loops T to serve a Parcae model at (None: the model's own); other models reject it."""
    source = path_or_id if isinstance(path_or_id, ModelSource) else resolve_model(path_or_id)
    dtype, device = parse_dtype(dtype), torch.device(device)
    if source.kind == "hf_dir" and parcae_format(source.path) is not None:
        ckpt = read_parcae_checkpoint(source.path, dtype, device)
        model = ParcaeForEngine(
            ckpt.model,
            parcae_recurrence or ckpt.recurrence,
            attn_backend,
            eos_token_ids=ckpt.eos_token_ids,
            bos_token_id=ckpt.bos_token_id,
        )
        return LoadedModel(model, model.config, source)
    if parcae_recurrence is not None:
        raise ValueError(f"parcae_recurrence (--parcae-recurrence) applies to Parcae models only, not {source.path}")
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        model_class = get_model_class(gguf_architecture(reader))
        config = read_gguf_config(reader)
        weights = iter_gguf_weights(reader, config)
    elif source.kind == "hf_dir":
        hf_config = read_hf_config(source.path)
        model_class = get_model_class(hf_architecture(hf_config))
        config = hf_model_config(hf_config)
        weights = iter_safetensors_weights(source.path)
    else:
        raise ValueError(f"unknown model source kind {source.kind!r}")
    model = model_class(config, dtype=dtype, device=device, attn_backend=attn_backend)
    model.load_weights(weights)
    return LoadedModel(model, config, source)


def load_model_config(path_or_id: str | os.PathLike | ModelSource | None = None) -> tuple[ModelConfig, ModelSource]:
    """The ModelConfig alone (no weights read), e.g. to size the KV cache before loading."""
    source = path_or_id if isinstance(path_or_id, ModelSource) else resolve_model(path_or_id)
    if source.kind == "gguf":
        reader = open_gguf(source.path)
        get_model_class(gguf_architecture(reader))
        return read_gguf_config(reader), source
    if parcae_format(source.path) is not None:
        return parcae_folder_model_config(source.path), source
    hf_config = read_hf_config(source.path)
    get_model_class(hf_architecture(hf_config))
    return hf_model_config(hf_config), source
