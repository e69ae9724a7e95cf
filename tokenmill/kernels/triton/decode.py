"""Paged-attention decode: one query token per sequence, GQA-grouped, optional split-KV (flash-decoding).

Each program owns one (sequence, KV head, split): it loads the query rows of every query head that shares the
KV head (padded to 16 rows so tl.dot can use tensor cores), walks its share of the context BLOCK_N tokens at a
time through the sequence's block table, and keeps an fp32 online softmax. With more than one split, a second
kernel merges the per-split partial outputs by their log-sum-exp. Launch shapes depend only on tensor shapes
and the SM count, and nothing reads device values on the host, so the call can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.kv_write import check_kv_cache_layer

LOG2E = 1.4426950408889634
# Splitting below this many context tokens per split costs more in the merge than it wins in parallelism.
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64
# Aim for this many resident programs per SM, so enough loads are in flight to saturate memory bandwidth.
PROGRAMS_PER_SM = 4


# Block-table width and split count change from step to step outside CUDA graphs: no variants compiled for them.
@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _paged_decode_kernel(
    out_ptr,
    lse_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_bt,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    num_splits,
    IS_SPLIT: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    groups = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + groups
    q_mask = (groups[:, None] < GROUP) & (dims[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_offset = kv_head * stride_cache_head

    # Every tile starts below `end`, so it holds at least one valid position and m_i is finite after it.
    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        valid = positions < end
        block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_offsets = block_ids * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_offset + head_offset
        kv_mask = valid[:, None] & (dims[None, :] < HEAD_DIM)
        k = tl.load(k_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_tokens = l_i > 0
    acc = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    out_offsets = seq * stride_ot + heads[:, None] * stride_oh + split * stride_os + dims[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=q_mask)
    if IS_SPLIT:
        # log2-domain log-sum-exp of this split's scores; -inf marks a split that saw no tokens.
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq * stride_lt + heads * stride_lh + split, lse, mask=groups < GROUP)


@triton.jit
def _merge_splits_kernel(
    out_ptr,
    partial_ptr,
    lse_ptr,
    stride_ot,
    stride_oh,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_lt,
    stride_lh,
    num_splits,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_mask = splits < num_splits
    lse = tl.load(lse_ptr + seq * stride_lt + head * stride_lh + splits, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    total = tl.sum(weights, 0)
    partial = tl.load(
        partial_ptr + seq * stride_pt + head * stride_ph + splits[:, None] * stride_ps + dims[None, :],
        mask=split_mask[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    merged = tl.sum(weights[:, None] * partial, 0) / tl.where(total > 0, total, 1.0)
    out_offsets = seq * stride_ot + head * stride_oh + dims
    tl.store(out_ptr + out_offsets, merged.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a nominal 4 elsewhere (the Triton interpreter on CPU)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, sm_count: int) -> int:
    """Splits per (sequence, KV head) so the grid fills the GPU when batch x KV heads alone cannot.

    Uses only shapes (never sequence lengths read from the device), so it is stable under CUDA graphs.
    """
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(PROGRAMS_PER_SM * sm_count, max(programs, 1))
    useful = max(1, max_context_len // MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def paged_decode(
    q: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """Attention of one new query token per sequence over its paged context.

    q [num_seqs, Hq, D]; kv_cache_layer [2, num_blocks, block_size, Hkv, D]; block_tables [num_seqs, max_blocks]
    int32; seq_lens [num_seqs] int32 (context length including the new token; 0 gives a zero output row).
    num_splits=None picks the split count from the batch shape and the SM count. Returns [num_seqs, Hq, D].
    """
    check_kv_cache_layer(kv_cache_layer)
    _, _, block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    if q.dim() != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [num_seqs, num_q_heads, {head_dim}], got {tuple(q.shape)}")
    num_seqs, num_q_heads = q.shape[0], q.shape[1]
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_tables.dim() != 2 or block_tables.shape[0] < num_seqs or seq_lens.shape[0] < num_seqs:
        raise ValueError(
            f"block_tables [num_seqs, max_blocks] and seq_lens [num_seqs] must cover {num_seqs} sequences, "
            f"got {tuple(block_tables.shape)} and {tuple(seq_lens.shape)}"
        )
    if q.dtype != kv_cache_layer.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from the KV cache dtype {kv_cache_layer.dtype}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out

    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, num_sms(q.device))
    group = num_q_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_dim)
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    meta = dict(
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        BLOCK_N=block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    common = (
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
    )
    grid = (num_seqs, num_kv_heads, num_splits)
    if num_splits == 1:
        _paged_decode_kernel[grid](
            out, out, *common, out.stride(0), out.stride(1), 0, 0, 0, 1, IS_SPLIT=False, **meta
        )
        return out

    partial = torch.empty(num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[grid](
        partial,
        lse,
        *common,
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        num_splits,
        IS_SPLIT=True,
        **meta,
    )
    _merge_splits_kernel[(num_seqs, num_q_heads)](
        out,
        partial,
        lse,
        out.stride(0),
        out.stride(1),
        partial.stride(0),
        partial.stride(1),
        partial.stride(2),
        lse.stride(0),
        lse.stride(1),
        num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        num_warps=1 if block_d <= 64 else 2,
    )
    return out
