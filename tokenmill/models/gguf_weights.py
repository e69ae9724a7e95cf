"""Reading a llama.cpp GGUF file: architecture config from metadata, weights dequantized to torch, HF names.

Quantized tensors (Q4_0/Q4_1/Q8_0/K-quants/...) are dequantized with gguf.quants one tensor at a time, so memory
holds at most one fp32 tensor beyond the model. llama.cpp's converter permutes the rows of q_proj/k_proj of llama
models into the interleaved-pairs RoPE layout; we invert that, since our rotary uses HF's rotate_half layout.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from tokenmill.config import ModelConfig

# Architectures whose Q/K rows llama.cpp's converter permutes (qwen2 uses the NEOX/rotate_half layout natively).
_PERMUTED_QK_ARCHITECTURES = {"llama"}

_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd\.weight)$")
_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class _PlainArrayGGUFReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map. Slicing an np.memmap builds a memmap object per
    slice, which made parsing the ~100k tokenizer strings of a typical GGUF 4x slower; the bytes are the same."""

    @property
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value


def open_gguf(path: str | Path) -> GGUFReader:
    """A GGUFReader for `path` (metadata parsed, tensors memory-mapped); ValueError if it is not a GGUF file."""
    try:
        return _PlainArrayGGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: GGUFReader) -> str:
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise ValueError("GGUF file has no general.architecture metadata")
    return arch


def read_gguf_config(reader: GGUFReader) -> ModelConfig:
    arch = gguf_architecture(reader)
    tensors = {t.name: t for t in reader.tensors}

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = field_value(reader, f"{arch}.{name}", default)
        if required and value is None:
            raise ValueError(f"GGUF file lacks required metadata {arch}.{name}")
        return value

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    rotary_dims = key("rope.dimension_count")
    if rotary_dims is not None and int(rotary_dims) != head_dim:
        raise ValueError(
            f"partial rotary embeddings (rope.dimension_count={rotary_dims} < {head_dim}) are not supported"
        )

    token_field = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = len(token_field.data) if token_field is not None else key("vocab_size")
    if "token_embd.weight" not in tensors:
        raise ValueError("GGUF file has no token_embd.weight tensor")
    embed_rows = int(tensors["token_embd.weight"].shape[1])
    if vocab_size is None or int(vocab_size) != embed_rows:
        vocab_size = embed_rows  # the embedding's shape is what the model computes over

    eos_ids = [
        int(v)
        for v in (
            field_value(reader, "tokenizer.ggml.eos_token_id"),
            field_value(reader, "tokenizer.ggml.eot_token_id"),
        )
        if v is not None
    ]
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_hidden_layers=int(key("block_count", required=True)),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(reader, arch, tensors),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        architecture=arch,
    )


def _gguf_rope_scaling(reader: GGUFReader, arch: str, tensors: dict) -> dict[str, Any] | None:
    if "rope_freqs.weight" in tensors:
        # llama3-style scaling: the converter stores the per-frequency divisors, not the parameters.
        factors = _to_torch(tensors["rope_freqs.weight"]).flatten().tolist()
        return {"rope_type": "freq_factors", "freq_factors": factors}
    scaling_type = field_value(reader, f"{arch}.rope.scaling.type")
    factor = field_value(reader, f"{arch}.rope.scaling.factor")
    if scaling_type is None and field_value(reader, f"{arch}.rope.scale_linear") is not None:
        scaling_type, factor = "linear", field_value(reader, f"{arch}.rope.scale_linear")
    if scaling_type in (None, "none") or (scaling_type == "linear" and float(factor or 1.0) == 1.0):
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported (only linear and llama3)")


def iter_gguf_weights(reader: GGUFReader, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF weight name, tensor) one at a time, dequantized and with llama's Q/K permutation undone."""
    unpermute = config.architecture in _PERMUTED_QK_ARCHITECTURES
    for tensor in reader.tensors:
        if _IGNORED.match(tensor.name):
            continue
        hf_name = hf_name_for(tensor.name)
        value = _to_torch(tensor)
        if unpermute and ".self_attn.q_proj." in hf_name:
            value = unpermute_qk_rows(value, config.num_attention_heads)
        elif unpermute and ".self_attn.k_proj." in hf_name:
            value = unpermute_qk_rows(value, config.num_key_value_heads)
        yield hf_name, value


def hf_name_for(gguf_name: str) -> str:
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    match = _BLOCK_TENSOR.match(gguf_name)
    if match is None or match.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a supported Llama/Qwen2 model")
    layer, module, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[module]}.{kind}"


def unpermute_qk_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert permute: per head, interleaved (x0, x1), (x2, x3)... rows back to halves.

    llama.cpp: w.reshape(heads, 2, rows_per_head // 2, ...).swapaxes(1, 2); this undoes it. Works for biases too.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {num_heads} rotary heads")
    rest = weight.shape[1:]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(weight.shape)


def _to_torch(tensor) -> torch.Tensor:
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        array = np.asarray(tensor.data)
    else:
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"GGUF tensor {tensor.name!r}: {e}") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memmap; we only ever copy out of it
        return torch.from_numpy(array.reshape(shape))
