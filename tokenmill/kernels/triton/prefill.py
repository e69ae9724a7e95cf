"""Varlen paged prefill attention: query tokens of several sequences against their paged context, causal.

Sequence i's queries are tokens query_start_loc[i] .. query_start_loc[i+1]-1 and sit at the last query_len
positions of its context, so query j (0-based) attends to context positions 0 .. seq_len - query_len + j. This
covers plain prefill, chunked prefill, prefill after a prefix-cache hit and decode tokens in a mixed batch.

A program owns (sequence, tile of BLOCK_Q query tokens, KV head). Its BLOCK_M rows are the tile's tokens times
the GQA group's query heads (row = token * GROUP + head-in-group), so each K/V tile feeds every query head that
shares it. K/V tiles of BLOCK_N positions are gathered through the block table; the softmax is online, in fp32.

Two launch forms. Unplanned: a grid of (sequence, tile, KV head) sized by the step. Planned: a grid of (item, KV
head) over a host-made list of (sequence, tile) items (`plan_prefill`) padded to a capacity that depends only on
the step's token count and sequence limit (`plan_capacity`), so one CUDA graph serves every step of that many
tokens (engine/piecewise.py captures whole prompt steps this way). Padding items (sequence -1) read and write
nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.kv_write import check_kv_cache_layer

LOG2E = 1.4426950408889634


# The block-table width changes from step to step; specialising on it (== 1, multiple of 16) would compile a new
# variant in the middle of serving (~0.4 s each on an H100 host).
@triton.jit(do_not_specialize=["stride_bt"])
def _paged_prefill_kernel(
    out_ptr,
    plan_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PLANNED: tl.constexpr,
):
    if PLANNED:
        # plan[2 * item] = sequence (-1: padding), plan[2 * item + 1] = its query tile; longest items first.
        item = tl.program_id(0)
        planned_seq = tl.load(plan_ptr + 2 * item)
        q_tile = tl.load(plan_ptr + 2 * item + 1)
        seq = tl.maximum(planned_seq, 0)
        kv_head = tl.program_id(1)
    else:
        planned_seq = 0
        seq = tl.program_id(0)
        # Later query tiles see more keys: launch them first so the long programs don't form the tail.
        q_tile = tl.num_programs(1) - 1 - tl.program_id(1)
        kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    # A padding item has no queries: it loads no K/V and stores nothing.
    query_len = tl.where(planned_seq >= 0, tl.load(query_start_loc_ptr + seq + 1) - q_start, 0)
    seq_len = tl.load(seq_lens_ptr + seq)
    first_position = seq_len - query_len  # context position of this sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    tokens = q_tile * BLOCK_Q + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (tokens < query_len)
    dim_valid = dims < HEAD_DIM
    q_rows = (q_start + tokens).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    # Rows past the tile's last token get positions beyond it, so every row sees position 0 and stays finite.
    query_positions = first_position + tokens

    # Keys this tile needs: up to its last valid query's position. A tile past the sequence's queries needs none.
    tile_last_token = tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, query_len) - 1
    kv_end = tl.where(q_tile * BLOCK_Q < query_len, first_position + tile_last_token + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_offset = kv_head * stride_cache_head

    for tile_start in range(0, kv_end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        valid = positions < kv_end
        block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_offsets = block_ids * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_offset + head_offset
        kv_mask = valid[:, None] & dim_valid[None, :]
        k = tl.load(k_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = valid[None, :] & (positions[None, :] <= query_positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


def prefill_block_m(max_query_len: int, group: int, head_dim: int) -> int:
    """Rows per program (query tokens x the GQA group's heads): 128 for long queries, else 64; at least the group."""
    block_d = triton.next_power_of_2(head_dim)
    block_m = 128 if max_query_len * group >= 512 and block_d <= 128 else 64
    return max(block_m, triton.next_power_of_2(group))


def plan_capacity(num_tokens: int, max_seqs: int, block_q: int) -> int:
    """Items a step of num_tokens query tokens over at most max_seqs sequences can need: each sequence's tiles are
    its tokens / block_q rounded up, so at most one partial tile per sequence."""
    return -(-num_tokens // block_q) + min(max_seqs, num_tokens)


def plan_prefill(query_lens: Sequence[int], seq_lens: Sequence[int], block_q: int, capacity: int) -> list[int]:
    """The planned launch's items, flattened [seq, tile, seq, tile, ...] and padded with (-1, 0) to `capacity`
    items. Items with the most keys to read come first, so the longest programs start first."""
    items = []
    for seq, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens)):
        first_position = seq_len - query_len
        for tile in range(-(-query_len // block_q)):
            last_key = first_position + min((tile + 1) * block_q, query_len)
            items.append((-last_key, seq, tile))
    if len(items) > capacity:
        raise ValueError(f"the step needs {len(items)} prefill items, more than the plan's capacity {capacity}")
    items.sort()
    flat = [v for _, seq, tile in items for v in (seq, tile)]
    return flat + [-1, 0] * (capacity - len(items))


def _check_prefill_args(q: torch.Tensor, kv_cache_layer: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, num_seqs: int) -> None:
    check_kv_cache_layer(kv_cache_layer)
    head_dim = kv_cache_layer.shape[-1]
    num_kv_heads = kv_cache_layer.shape[-2]
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [num_tokens, num_q_heads, {head_dim}], got {tuple(q.shape)}")
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_tables.dim() != 2 or block_tables.shape[0] < num_seqs or seq_lens.shape[0] < num_seqs:
        raise ValueError(
            f"block_tables [num_seqs, max_blocks] and seq_lens [num_seqs] must cover {num_seqs} sequences, "
            f"got {tuple(block_tables.shape)} and {tuple(seq_lens.shape)}"
        )
    if q.dtype != kv_cache_layer.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from the KV cache dtype {kv_cache_layer.dtype}")


def _launch(grid, plan: torch.Tensor | None, q, kv_cache_layer, block_tables, seq_lens, query_start_loc, scale,
            out, block_m, block_n, num_warps, num_stages) -> None:
    _, _, block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    group = q.shape[1] // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    _paged_prefill_kernel[grid](
        out,
        query_start_loc if plan is None else plan,  # unread unless PLANNED
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_m // group,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PLANNED=plan is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def paged_prefill(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:
    """Causal attention of each sequence's new query tokens over its paged context (K/V already in the cache).

    q [num_tokens, Hq, D]; kv_cache_layer [2, num_blocks, block_size, Hkv, D]; block_tables [num_seqs,
    max_blocks] int32; seq_lens [num_seqs] int32; query_start_loc [num_seqs + 1] int32; max_query_len is the
    host-side longest query length (sizes the grid). Returns [num_tokens, Hq, D].
    """
    num_seqs = query_start_loc.shape[0] - 1
    _check_prefill_args(q, kv_cache_layer, block_tables, seq_lens, num_seqs)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if num_seqs <= 0 or max_query_len <= 0:
        return out
    num_kv_heads, head_dim = kv_cache_layer.shape[-2], kv_cache_layer.shape[-1]
    group = q.shape[1] // num_kv_heads
    if block_m is None:
        block_m = prefill_block_m(max_query_len, group, head_dim)
    block_m = max(block_m, triton.next_power_of_2(group))
    grid = (num_seqs, triton.cdiv(max_query_len, block_m // group), num_kv_heads)
    _launch(grid, None, q, kv_cache_layer, block_tables, seq_lens, query_start_loc, scale, out, block_m, block_n,
            num_warps, num_stages)
    return out


def paged_prefill_planned(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    plan: torch.Tensor,
    scale: float,
    block_m: int,
    *,
    out: torch.Tensor,
) -> torch.Tensor:
    """paged_prefill over the items of `plan` (int32 [2 * capacity], from plan_prefill with block_q = block_m //
    group): the launch's shape depends only on the plan's capacity, so it can be captured in a CUDA graph and
    replayed with new plan, tables and lengths in the same buffers. query_start_loc needs an entry for every
    sequence a plan item names (plus one)."""
    _check_prefill_args(q, kv_cache_layer, block_tables, seq_lens, query_start_loc.shape[0] - 1)
    if plan.dtype != torch.int32 or plan.dim() != 1 or plan.shape[0] % 2:
        raise ValueError(f"plan must be int32 [2 * capacity], got {plan.dtype} {tuple(plan.shape)}")
    if q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("the planned prefill needs q and out contiguous in the head dimension")
    grid = (plan.shape[0] // 2, kv_cache_layer.shape[-2])
    _launch(grid, plan, q, kv_cache_layer, block_tables, seq_lens, query_start_loc, scale, out, block_m, None,
            None, 2)
    return out
