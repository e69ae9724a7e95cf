"""Rotary position embedding with Hugging Face semantics (rotate_half: the two halves of each head are the pair).

The cos/sin table is precomputed in fp32 for every position up to max_positions and indexed by a positions tensor,
so a flattened batch of sequences at arbitrary positions needs no per-sequence work.

Supported `rope_scaling` types (key "rope_type", or the older "type"):
  default / None   inv_freq = theta ** (-2i/d)
  linear           inv_freq / factor
  llama3           Llama 3.1 frequency-dependent scaling (factor, low_freq_factor, high_freq_factor,
                   original_max_position_embeddings)
  freq_factors     inv_freq / freq_factors[i]; how llama.cpp stores llama3 scaling in GGUF (tensor rope_freqs)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"


def compute_inv_freq(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, computed exactly as transformers does."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = rope_type_of(rope_scaling)
    if rope_type == "default":
        return inv_freq
    assert rope_scaling is not None
    if rope_type == "linear":
        return inv_freq / float(rope_scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    if rope_type == "freq_factors":
        factors = torch.tensor(rope_scaling["freq_factors"], dtype=torch.float32)
        if factors.shape != inv_freq.shape:
            raise ValueError(f"rope freq_factors has {factors.numel()} entries, expected {inv_freq.numel()}")
        return inv_freq / factors
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    try:
        factor = float(scaling["factor"])
        low_freq_factor = float(scaling["low_freq_factor"])
        high_freq_factor = float(scaling["high_freq_factor"])
        old_context_len = float(scaling["original_max_position_embeddings"])
    except KeyError as e:
        raise ValueError(f"llama3 rope_scaling is missing {e.args[0]!r}") from None
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are slowed down by `factor`; short ones are kept; the band between is
    # interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds cos/sin tables [max_positions, head_dim // 2] and rotates q/k at given positions."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        inv_freq = compute_inv_freq(head_dim, theta, rope_scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_cache", freqs.cos().to(device), persistent=False)
        self.register_buffer("sin_cache", freqs.sin().to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each position: [T, 1, head_dim // 2] in `dtype` (broadcast over heads)."""
        cos = self.cos_cache[positions].to(dtype).unsqueeze(1)
        sin = self.sin_cache[positions].to(dtype).unsqueeze(1)
        return cos, sin


    def rotation_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-width tables for `rotate`: cos [T, 1, D] = (cos, cos) and signed sin [T, 1, D] = (-sin, sin)."""
        cos, sin = self.cos_sin(positions, dtype)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary with the tables of RotaryEmbedding.rotation_tables, in 4 kernels instead of 8; bit-identical
    (x1 * cos + x2 * -sin rounds exactly like x1 * cos - x2 * sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated pairwise (x[:D/2], x[D/2:]); cos/sin [T, 1, D/2] in x's dtype.

    Equal to HF's x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), rounding step for rounding step.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
