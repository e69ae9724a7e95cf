"""The Triton twin of tokenmill.layers.attention.paged_attention: cache the new K/V, then attend."""

from __future__ import annotations

import torch

from tokenmill.kernels.triton.decode import paged_decode
from tokenmill.kernels.triton.kv_write import reshape_and_cache
from tokenmill.kernels.triton.prefill import paged_prefill
from tokenmill.layers.attention_metadata import AttentionMetadata


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    write_kv: bool = True,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], kv_cache_layer [2, num_blocks, block_size, Hkv, D] -> [T, Hq, D].

    Writes k/v at meta.slot_mapping (unless write_kv is False: the caller did), then runs the decode kernel when
    every sequence has one query token (the CUDA-graph-capturable path) and the varlen prefill kernel otherwise.
    """
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q has {q.shape[0]} tokens but k/v have {k.shape[0]}")
    if write_kv:
        reshape_and_cache(k, v, kv_cache_layer, meta.slot_mapping)
    if meta.is_decode_only:
        if q.shape[0] != meta.block_tables.shape[0]:
            raise ValueError(f"a decode batch needs one token per sequence: {q.shape[0]} tokens, "
                             f"{meta.block_tables.shape[0]} sequences")
        return paged_decode(q, kv_cache_layer, meta.block_tables, meta.seq_lens, scale, out=out)
    return paged_prefill(
        q,
        kv_cache_layer,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        scale,
        out=out,
    )
