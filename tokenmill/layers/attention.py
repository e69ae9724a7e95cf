"""Paged attention, plain-PyTorch reference (CPU and CUDA), and the backend protocol faster kernels implement.

See tokenmill/layers/attention_metadata.py for how a flattened mixed prefill+decode batch maps onto the paged cache.
Every backend first writes this step's K/V into the cache at meta.slot_mapping, then attends each query token to its
sequence's context, reading only slots at positions < seq_len (slots past a sequence's length may hold anything,
NaN included, and must not change the result).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from tokenmill.layers.attention_metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """q [T, Hq, D], k/v [T, Hkv, D], kv_cache_layer [2, num_blocks, block_size, Hkv, D] -> out [T, Hq, D]."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores k/v [T, Hkv, D] at the flat slots (block_id * block_size + offset) given by slot_mapping [T]."""
    key_cache, value_cache = _flat_caches(kv_cache_layer)
    key_cache.index_copy_(0, slot_mapping, k.to(key_cache.dtype))
    value_cache.index_copy_(0, slot_mapping, v.to(value_cache.dtype))


def _flat_caches(kv_cache_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views [num_blocks * block_size, Hkv, D] of the K and V halves of one layer's cache (no copy)."""
    if kv_cache_layer.dim() != 5 or kv_cache_layer.shape[0] != 2:
        raise ValueError(
            f"kv_cache_layer must be [2, num_blocks, block_size, Hkv, D], got {tuple(kv_cache_layer.shape)}"
        )
    return kv_cache_layer[0].flatten(0, 1), kv_cache_layer[1].flatten(0, 1)


def _context_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots of the given context positions; block_table [..., max_blocks], positions broadcastable."""
    block_ids = torch.gather(block_table.long(), -1, positions // block_size)
    return block_ids * block_size + positions % block_size


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Reference paged attention: write K/V, then causal attention over each sequence's cached context.

    Decode sequences (query_len == 1) are attended in one padded SDPA call; prefill chunks one SDPA call each.
    """
    write_kv_cache(k, v, kv_cache_layer, meta.slot_mapping)
    key_cache, value_cache = _flat_caches(kv_cache_layer)
    block_size = kv_cache_layer.shape[2]

    if meta.is_decode_only:
        return _decode_attention(
            q, key_cache, value_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, block_size, scale
        )

    out = torch.empty_like(q)
    starts, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    decode_seqs = [i for i in range(meta.num_seqs) if starts[i + 1] - starts[i] == 1]
    if decode_seqs:
        token_idx = torch.tensor([starts[i] for i in decode_seqs], dtype=torch.long, device=q.device)
        seq_idx = token_idx.new_tensor(decode_seqs)
        out[token_idx] = _decode_attention(
            q[token_idx],
            key_cache,
            value_cache,
            meta.block_tables[seq_idx],
            meta.seq_lens[seq_idx],
            max(seq_lens[i] for i in decode_seqs),
            block_size,
            scale,
        )
    decode_set = set(decode_seqs)
    for i in range(meta.num_seqs):
        if i in decode_set:
            continue
        start, end, seq_len = starts[i], starts[i + 1], seq_lens[i]
        out[start:end] = _prefill_attention(
            q[start:end], key_cache, value_cache, meta.block_tables[i], seq_len, block_size, scale
        )
    return out


def _prefill_attention(
    q: torch.Tensor,  # [Q, Hq, D], the last Q positions of a context of seq_len tokens
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks]
    seq_len: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    query_len = q.shape[0]
    positions = torch.arange(seq_len, device=q.device)
    slots = _context_slots(block_table, positions, block_size)
    keys = key_cache[slots].to(q.dtype).transpose(0, 1)  # [Hkv, S, D]
    values = value_cache[slots].to(q.dtype).transpose(0, 1)
    gqa = q.shape[1] != keys.shape[0]
    if query_len == seq_len:
        mask, causal = None, True  # SDPA's causal mask is top-left aligned, which is right when Q == S.
    else:
        query_pos = positions[seq_len - query_len :]
        mask, causal = positions[None, :] <= query_pos[:, None], False  # [Q, S], True = attend
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa
    )
    return out.transpose(0, 1)


def _decode_attention(
    q: torch.Tensor,  # [S, Hq, D], one query per sequence, at the last position of its context
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks]
    seq_lens: torch.Tensor,  # [S]
    max_seq_len: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    num_seqs = q.shape[0]
    positions = torch.arange(max_seq_len, device=q.device).expand(num_seqs, max_seq_len)
    valid = positions < seq_lens.to(positions.device).long()[:, None]  # [S, L]
    # Padding positions re-read the sequence's own position 0 (always written), so no slot at or past seq_len is
    # ever touched and the padded keys are finite; the mask then removes them from the softmax.
    slots = _context_slots(block_tables, torch.where(valid, positions, 0), block_size)
    keys = key_cache[slots].to(q.dtype).transpose(1, 2)  # [S, Hkv, L, D]
    values = value_cache[slots].to(q.dtype).transpose(1, 2)
    gqa = q.shape[1] != keys.shape[1]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [S, Hq, 1, D]
        keys,
        values,
        attn_mask=valid[:, None, None, :],
        scale=scale,
        enable_gqa=gqa,
    )
    return out.squeeze(2)
