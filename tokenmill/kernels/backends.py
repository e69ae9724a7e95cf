"""Attention backends behind one call signature: the torch reference and the Triton kernels.

Every backend is called like tokenmill.layers.attention.paged_attention:
    backend(q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], kv_cache_layer, meta, scale) -> [T, Hq, D]
and writes k/v into kv_cache_layer at meta.slot_mapping before attending.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from tokenmill.layers.attention_metadata import AttentionMetadata

BACKEND_NAMES = ("torch", "triton", "auto")

# (q, k, v, kv_cache_layer, meta, scale, write_kv=True[, out=]) -> [T, Hq, D]
AttentionFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    # True when the decode path (meta.is_decode_only) can be captured in a CUDA graph: fixed launch shapes for a
    # given batch size and block-table width, no host syncs, no branches on device values.
    supports_cuda_graphs: bool
    attention: AttentionFn
    writes_out: bool = False  # `attention` takes an `out=` tensor to write into
    # A prompt-step attention launch whose shape depends only on a plan's capacity, so a CUDA graph can hold it
    # (kernels/triton/prefill.py paged_prefill_planned; engine/piecewise.py captures whole prompt steps with it).
    planned_prefill: Callable[..., torch.Tensor] | None = None

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        write_kv: bool = True,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """write_kv False: k/v are already in the cache. out: where to write the result (e.g. a CUDA graph's input
        buffer); the kernels write there directly."""
        if out is None:
            return self.attention(q, k, v, kv_cache_layer, meta, scale, write_kv)
        if self.writes_out:
            return self.attention(q, k, v, kv_cache_layer, meta, scale, write_kv, out=out)
        return out.copy_(self.attention(q, k, v, kv_cache_layer, meta, scale, write_kv))


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def get_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """'torch': the reference; 'triton': the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1);
    'auto': Triton on CUDA when triton is installed, the reference otherwise."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "torch":
        from tokenmill.layers.attention import paged_attention as reference_attention

        return AttentionBackend(name="torch", supports_cuda_graphs=False, attention=reference_attention)

    if not triton_available():
        raise ValueError("attention backend 'triton' needs the triton package (pip install triton)")
    if device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"attention backend 'triton' runs on CUDA devices, got {device}; use 'torch' or 'auto' "
            "(or set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
        )
    from tokenmill.kernels.triton.attention import paged_attention as triton_attention
    from tokenmill.kernels.triton.prefill import paged_prefill_planned

    return AttentionBackend(name="triton", supports_cuda_graphs=device.type == "cuda", attention=triton_attention,
                            writes_out=True, planned_prefill=paged_prefill_planned)
