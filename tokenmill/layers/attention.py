"""Paged attention, plain-PyTorch reference (CPU and CUDA), and the backend protocol faster kernels implement.

See tokenmill/layers/attention_metadata.py for how a flattened mixed prefill+decode batch maps onto the paged cache.
Every backend first writes this step's K/V into the cache at meta.slot_mapping, then attends each query token to its
sequence's context, reading only slots at positions < seq_len (slots past a sequence's length may hold anything,
NaN included, and must not change the result).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from tokenmill.layers.attention_metadata import AttentionMetadata


class AttentionBackend(Protocol):
    """q [T, Hq, D], k/v [T, Hkv, D], kv_cache_layer [2, num_blocks, block_size, Hkv, D] -> out [T, Hq, D]; writes k/v
    at meta.slot_mapping first unless write_kv is False (the caller wrote them)."""

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache_layer: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        write_kv: bool = True,
    ) -> torch.Tensor: ...


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache_layer: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Stores k/v [T, Hkv, D] at the flat slots (block_id * block_size + offset) given by slot_mapping [T]."""
    _write_kv(k, v, _flat_kv(kv_cache_layer), slot_mapping)


def _write_kv(k: torch.Tensor, v: torch.Tensor, kv_flat: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    kv = torch.stack((k, v)).view(2, k.shape[0], -1)
    kv_flat.index_copy_(1, slot_mapping, kv if kv.dtype == kv_flat.dtype else kv.to(kv_flat.dtype))


def _flat_kv(kv_cache_layer: torch.Tensor) -> torch.Tensor:
    """A view [2, num_blocks * block_size, Hkv * D] of one layer's cache: K and V of every slot (no copy)."""
    if kv_cache_layer.dim() != 5 or kv_cache_layer.shape[0] != 2:
        raise ValueError(
            f"kv_cache_layer must be [2, num_blocks, block_size, Hkv, D], got {tuple(kv_cache_layer.shape)}"
        )
    return kv_cache_layer.view(2, -1, kv_cache_layer.shape[3] * kv_cache_layer.shape[4])


class _StepPlan(NamedTuple):
    """Where each sequence of a step reads its context from the flat cache. It depends only on the metadata and the
    block size, so it is built once per step (cached in meta.derived) and shared by every layer."""

    decode_token_index: torch.Tensor | None  # [Sd] flat token index of each decode sequence; None: every token
    decode_slots: torch.Tensor | None  # [Sd * L] context slots, L = longest decode context, row-major per sequence
    decode_mask: torch.Tensor | None  # [Sd, 1, 1, L] True = attend (False on padding); None when nothing is padded
    decode_len: int
    prefills: list[_PrefillGroup]


class _PrefillGroup(NamedTuple):
    """Prefill chunks of the same query and context length, attended in one SDPA call (a batch of identical-length
    prompts arriving together is one group)."""

    token_index: torch.Tensor  # [G * Q] flat token indices, sequence after sequence
    slots: torch.Tensor  # [G * S] context slots
    mask: torch.Tensor | None  # [Q, S] True = attend; None = causal (Q == S)
    num_seqs: int  # G
    query_len: int  # Q
    seq_len: int  # S


def _context_slots(block_table: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat cache slots of the given context positions; block_table [..., max_blocks], positions broadcastable."""
    block_ids = torch.gather(block_table.long(), -1, positions // block_size)
    return block_ids * block_size + positions % block_size


def _step_plan(meta: AttentionMetadata, block_size: int, device: torch.device) -> _StepPlan:
    key = ("reference_plan", block_size, device)
    plan = meta.derived.get(key)
    if plan is None:
        plan = meta.derived[key] = _build_step_plan(meta, block_size, device)
    return plan


def _build_step_plan(meta: AttentionMetadata, block_size: int, device: torch.device) -> _StepPlan:
    starts, seq_lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    if meta.is_decode_only:
        decode_seqs = list(range(meta.num_seqs))
        token_index = None
        tables, lens = meta.block_tables, meta.seq_lens
    else:
        decode_seqs = [i for i in range(meta.num_seqs) if starts[i + 1] - starts[i] == 1]
        token_index = torch.tensor([starts[i] for i in decode_seqs], dtype=torch.long, device=device)
        seq_index = torch.tensor(decode_seqs, dtype=torch.long, device=device)
        tables, lens = meta.block_tables.index_select(0, seq_index), meta.seq_lens.index_select(0, seq_index)
    slots = mask = None
    decode_len = max((seq_lens[i] for i in decode_seqs), default=0)
    if decode_seqs:
        positions = torch.arange(decode_len, device=device).expand(len(decode_seqs), decode_len)
        valid = positions < lens.to(device).long()[:, None]  # [Sd, L]
        # Padding positions re-read the sequence's own position 0 (always written), so no slot at or past seq_len is
        # ever touched and the padded keys are finite; the mask then removes them from the softmax.
        slots = _context_slots(tables, torch.where(valid, positions, 0), block_size).flatten()
        # Equal lengths (a lone sequence, or a batch in lockstep) need no mask; SDPA is faster without one.
        uniform = all(seq_lens[i] == decode_len for i in decode_seqs)
        mask = None if uniform else valid[:, None, None, :]
    decode_set = set(decode_seqs)
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(meta.num_seqs):
        if i not in decode_set:
            groups.setdefault((starts[i + 1] - starts[i], seq_lens[i]), []).append(i)
    prefills = []
    for (query_len, seq_len), members in groups.items():
        positions = torch.arange(seq_len, device=device)
        tables = meta.block_tables.index_select(0, torch.tensor(members, dtype=torch.long, device=device))
        group_slots = _context_slots(tables, positions.expand(len(members), seq_len), block_size).flatten()
        tokens = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in members]).to(device)
        # None: causal. SDPA's causal mask is top-left aligned, which is right when Q == S.
        prefill_mask = None if query_len == seq_len else positions[None, :] <= positions[seq_len - query_len :, None]
        prefills.append(_PrefillGroup(tokens, group_slots, prefill_mask, len(members), query_len, seq_len))
    return _StepPlan(token_index, slots, mask, decode_len, prefills)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    write_kv: bool = True,
) -> torch.Tensor:
    """Reference paged attention: write K/V (unless the caller already did: write_kv False), then causal attention
    over each sequence's cached context.

    Decode sequences (query_len == 1) are attended in one padded SDPA call; prefill chunks in one SDPA call per group
    of equal query and context lengths. Contexts are gathered from the cache with one index_select over slots for K
    and one for V; the slot lists are computed once per step (see _StepPlan).
    """
    kv_flat = _flat_kv(kv_cache_layer)
    if write_kv:
        _write_kv(k, v, kv_flat, meta.slot_mapping)
    key_cache, value_cache = kv_flat.unbind(0)  # [num_slots, Hkv * D] each
    num_kv_heads, head_dim = kv_cache_layer.shape[-2:]
    plan = _step_plan(meta, kv_cache_layer.shape[2], q.device)
    gqa = q.shape[1] != num_kv_heads

    def gather(slots: torch.Tensor, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
        # index_select along dim 0 of each half: parallel on CPU, unlike along dim 1 of [2, num_slots, Hkv * D]
        keys = key_cache.index_select(0, slots).view(*shape, num_kv_heads, head_dim)
        values = value_cache.index_select(0, slots).view(*shape, num_kv_heads, head_dim)
        if keys.dtype != q.dtype:
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        return keys, values

    if meta.is_decode_only:
        return _decode_attention(q, plan, gather, scale)
    out = torch.empty_like(q)
    if plan.decode_slots is not None:
        index = plan.decode_token_index
        out.index_copy_(0, index, _decode_attention(q.index_select(0, index), plan, gather, scale))
    for group in plan.prefills:
        g, q_len, s_len = group.num_seqs, group.query_len, group.seq_len
        keys, values = gather(group.slots, g, s_len)  # [G, S, Hkv, D]
        queries = q.index_select(0, group.token_index).view(g, q_len, *q.shape[1:])
        # 4-D inputs: with 3-D ones and enable_gqa, CPU SDPA falls back to its slow math path.
        group_out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=group.mask,
            is_causal=group.mask is None,
            scale=scale,
            enable_gqa=gqa,
        )
        out.index_copy_(0, group.token_index, group_out.transpose(1, 2).reshape(g * q_len, *q.shape[1:]))
    return out


def _decode_attention(q: torch.Tensor, plan: _StepPlan, gather, scale: float) -> torch.Tensor:
    """q [S, Hq, D], one query per sequence at the last position of its context."""
    num_seqs, num_heads, head_dim = q.shape
    keys, values = gather(plan.decode_slots, num_seqs, plan.decode_len)  # [S, L, Hkv, D]
    num_kv_heads = keys.shape[2]
    if num_kv_heads != num_heads and torch.get_num_threads() > 1:
        # The query heads that share a KV head attend as that head's rows, [S, Hkv, Hq / Hkv, D]: the same math as
        # enable_gqa, which CPU SDPA does not split across threads (measured with 2 threads at 32 sequences: the
        # forward 10% faster this way; with 1 thread enable_gqa is 3% faster).
        query, gqa = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim), False
    else:
        query, gqa = q.unsqueeze(2), num_kv_heads != num_heads  # [S, Hq, 1, D]
    out = F.scaled_dot_product_attention(
        query, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=plan.decode_mask, scale=scale, enable_gqa=gqa
    )
    return out.reshape(num_seqs, num_heads, head_dim)
