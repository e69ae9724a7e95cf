"""Fused Triton kernels for the decode step of a Llama-family layer (batch 1..64, any batch by tiling).

Each kernel streams one weight matrix once and does everything around that GEMM that needs no other weights:

    qkv_rope_cache    RMSNorm(h) @ Wqkv^T (+ bias) -> RoPE on q and k -> q to a buffer, k/v into the paged cache
    paged attention   tokenmill.kernels.triton.decode.paged_decode (split-KV), reused as is
    linear_residual   h + attn @ Wo^T                 (in place on the residual stream)
    gate_up_silu      silu(RMSNorm(h) @ Wg^T) * (RMSNorm(h) @ Wu^T)
    linear_residual   h + act @ Wdown^T
    lm_head           RMSNorm(h) @ Wlm^T in fp32, optionally with a fused greedy argmax
    rmsnorm           the final norm alone, for the model's forward() contract

Weights are read in the model's own layout ([N, K] row-major, q/k/v and gate/up rows stacked), so nothing is
copied. RMSNorm is folded into the GEMM: the program multiplies x by the norm weight as it streams K, keeps
sum(x^2) on the side, and scales its fp32 accumulator by rsqrt(mean + eps) at the end (same function as HF's
RMSNorm, all in fp32). Tile shapes come from fused_config.py. With use_pdl, kernels are launched with
programmatic dependent launch: each waits (griddepcontrol.wait) before touching memory a previous kernel wrote.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tokenmill.kernels.triton.fused_config import GemvConfig, check_gemv_config, choose_gemv_config

# ---- building blocks ------------------------------------------------------------------------------------------


@triton.jit
def _pdl_enter(USE_GDC: tl.constexpr):
    if USE_GDC:
        # Wait for the previous kernel's writes, then let the next kernel's programs get scheduled early.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _paired_rows(tile_n, PAIR_HALF: tl.constexpr, BLOCK_N: tl.constexpr):
    """Weight rows of a paired tile: BLOCK_N // 2 first-half rows, then their partners PAIR_HALF rows further on.

    Pair index p (0 <= p < N / 2) lives in group p // PAIR_HALF of 2 * PAIR_HALF rows; its rows are
    group * 2 * PAIR_HALF + p % PAIR_HALF and that plus PAIR_HALF. A tile never crosses a group.
    """
    r = tl.arange(0, BLOCK_N)
    pair = tile_n * (BLOCK_N // 2) + r % (BLOCK_N // 2)
    return (pair // PAIR_HALF) * (2 * PAIR_HALF) + pair % PAIR_HALF + (r // (BLOCK_N // 2)) * PAIR_HALF


@triton.jit
def _gemv_mainloop(
    x_ptr,
    stride_xm,
    w_ptr,
    stride_wn,
    norm_w_ptr,
    rows,
    row_mask,
    offs_m,
    m_mask,
    k_begin,
    K_SPAN: tl.constexpr,
    NORM: tl.constexpr,
    USE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc[BLOCK_N, BLOCK_M] = W[rows, k_begin:+K_SPAN] @ (x * norm_w)[offs_m, same]^T in fp32, and sum(x^2)."""
    offs_k = k_begin + tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]
    g_ptrs = norm_w_ptr + offs_k
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_DOT:
        # Tensor cores; triton software-pipelines these loads through shared memory (cp.async, num_stages).
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k in range(0, K_SPAN, BLOCK_K):
            w = tl.load(w_ptrs + k, mask=row_mask[:, None], other=0.0)
            x = tl.load(x_ptrs + k, mask=m_mask[:, None], other=0.0)
            if NORM:
                xf = x.to(tl.float32)
                sumsq += tl.sum(xf * xf, 1)
                x = xf * tl.load(g_ptrs + k).to(tl.float32)[None, :]
            acc = tl.dot(w, tl.trans(x.to(w.dtype)), acc, input_precision=DOT_PRECISION)
    else:
        # CUDA cores. Triton does not pipeline loads that feed no tl.dot, so the next K step's tiles are loaded
        # into registers before this step's FMAs (two steps of weights in flight per thread).
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        w = tl.load(w_ptrs, mask=row_mask[:, None], other=0.0)
        x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        g = tl.load(g_ptrs) if NORM else x
        for k in range(BLOCK_K, K_SPAN, BLOCK_K):
            w_next = tl.load(w_ptrs + k, mask=row_mask[:, None], other=0.0)
            x_next = tl.load(x_ptrs + k, mask=m_mask[:, None], other=0.0)
            g_next = tl.load(g_ptrs + k) if NORM else x_next
            acc3, sumsq = _fma_step(acc3, sumsq, w, x, g, NORM)
            w, x, g = w_next, x_next, g_next
        acc3, sumsq = _fma_step(acc3, sumsq, w, x, g, NORM)
        acc = tl.trans(tl.sum(acc3, 2))
    return acc, sumsq


@triton.jit
def _fma_step(acc3, sumsq, w, x, g, NORM: tl.constexpr):
    xf = x.to(tl.float32)
    if NORM:
        sumsq += tl.sum(xf * xf, 1)
        xf = xf * g.to(tl.float32)[None, :]
    acc3 += w.to(tl.float32)[None, :, :] * xf[:, None, :]
    return acc3, sumsq


@triton.jit
def _split_k_reduce(
    acc,
    sumsq,
    partial_ptr,
    partial_sumsq_ptr,
    counter_ptr,
    tile,
    split,
    SPLIT_K: tl.constexpr,
    NORM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Every split stores its fp32 partial; the last split to arrive at the tile's counter adds all of them in
    split order (deterministic) and resets the counter for the next launch.

    Returns (acc, sumsq, is_last[BLOCK_M]): is_last is all-true in the program that must run the epilogue.
    """
    tile64 = tile.to(tl.int64)
    tile_elems = BLOCK_N * BLOCK_M
    offs = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
    offs_m = tl.arange(0, BLOCK_M)
    base = tile64 * SPLIT_K * tile_elems
    base_ss = tile64 * SPLIT_K * BLOCK_M
    tl.store(partial_ptr + base + split * tile_elems + offs, acc)
    if NORM:
        tl.store(partial_sumsq_ptr + base_ss + split * BLOCK_M + offs_m, sumsq)
    # All threads' partial stores happen before the (single-thread) release of the counter.
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel", scope="gpu")
    # Masks are built at full shape from the counter value: the CPU interpreter mishandles scalar-bool broadcasts.
    tile_mask = (tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32) + arrived) == SPLIT_K - 1
    is_last = (tl.zeros([BLOCK_M], dtype=tl.int32) + arrived) == SPLIT_K - 1
    total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    total_ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        # .cg: read from L2, where the other programs' partials are, never from a stale L1 line.
        total += tl.load(partial_ptr + base + s * tile_elems + offs, mask=tile_mask, other=0.0, cache_modifier=".cg")
        if NORM:
            total_ss += tl.load(
                partial_sumsq_ptr + base_ss + s * BLOCK_M + offs_m, mask=is_last, other=0.0, cache_modifier=".cg"
            )
    tl.store(counter_ptr + tile + offs_m, tl.zeros([BLOCK_M], dtype=tl.int32), mask=is_last & (offs_m == 0))
    return total, total_ss, is_last


@triton.jit
def _split_pairs(acc, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc[BLOCK_N, BLOCK_M], first-half rows then partner rows -> (first, partner), each [BLOCK_N // 2, BLOCK_M]."""
    pairs = tl.permute(tl.reshape(acc, [2, BLOCK_N // 2, BLOCK_M]), [1, 2, 0])
    return tl.split(pairs)


# ---- (a) RMSNorm + QKV + bias + RoPE + KV-cache write -----------------------------------------------------------


@triton.jit
def _qkv_rope_cache_kernel(
    x_ptr,
    w_ptr,
    norm_w_ptr,
    bias_ptr,
    q_ptr,
    positions_ptr,
    cos_ptr,
    sin_ptr,
    slot_ptr,
    k_cache_ptr,
    v_cache_ptr,
    partial_ptr,
    partial_sumsq_ptr,
    counter_ptr,
    M,
    eps,
    stride_xm,
    stride_wn,
    stride_qm,
    stride_cos,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    K: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CACHE_BLOCK_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    BLOCK_P: tl.constexpr = BLOCK_N // 2
    tile_n = tl.program_id(0) // SPLIT_K
    split = tl.program_id(0) % SPLIT_K
    pid_m = tl.program_id(1)
    _pdl_enter(USE_GDC)

    rows = _paired_rows(tile_n, HALF, BLOCK_N)
    head = (tile_n * BLOCK_P) // HALF  # q heads, then k heads, then v heads; one head per tile
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row_mask = rows < (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    acc, sumsq = _gemv_mainloop(
        x_ptr, stride_xm, w_ptr, stride_wn, norm_w_ptr, rows, row_mask, offs_m, m_mask, split * (K // SPLIT_K),
        K // SPLIT_K, True, USE_DOT, BLOCK_N, BLOCK_M, BLOCK_K, DOT_PRECISION,
    )
    if SPLIT_K > 1:
        tile = pid_m * (tl.num_programs(0) // SPLIT_K) + tile_n
        acc, sumsq, is_last = _split_k_reduce(
            acc, sumsq, partial_ptr, partial_sumsq_ptr, counter_ptr, tile, split, SPLIT_K, True, BLOCK_N, BLOCK_M
        )
    else:
        is_last = offs_m >= 0

    acc = acc * tl.rsqrt(sumsq / K + eps)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows).to(tl.float32)[:, None]
    x1, x2 = _split_pairs(acc, BLOCK_N, BLOCK_M)  # [BLOCK_P, BLOCK_M] each: dims j and j + HALF
    dims = (tile_n * BLOCK_P) % HALF + tl.arange(0, BLOCK_P)
    # The head is one scalar per tile; it is broadcast to the tile before any mask arithmetic (the CPU
    # interpreter mishandles scalar-bool & tensor).
    head_t = tl.zeros([BLOCK_P, BLOCK_M], dtype=tl.int32) + head
    is_q = head_t < NUM_Q_HEADS
    is_v = head_t >= NUM_Q_HEADS + NUM_KV_HEADS
    is_k = (head_t >= NUM_Q_HEADS) & (head_t < NUM_Q_HEADS + NUM_KV_HEADS)
    out_mask = (m_mask & is_last)[None, :] & (head_t >= 0)

    positions = tl.load(positions_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    rope_offs = positions[None, :] * stride_cos + dims[:, None]
    cos = tl.load(cos_ptr + rope_offs, mask=out_mask & (is_q | is_k), other=1.0)
    sin = tl.load(sin_ptr + rope_offs, mask=out_mask & (is_q | is_k), other=0.0)
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin

    q_offs = offs_m[None, :] * stride_qm + head * HEAD_DIM + dims[:, None]
    q_mask = out_mask & is_q
    tl.store(q_ptr + q_offs, y1.to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_ptr + q_offs + HALF, y2.to(q_ptr.dtype.element_ty), mask=q_mask)

    # A negative slot marks a padding row whose K/V must not be written.
    slots = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1).to(tl.int64)
    slot_offs = (slots // CACHE_BLOCK_SIZE) * stride_cache_block + (slots % CACHE_BLOCK_SIZE) * stride_cache_offset
    kv_mask = out_mask & (slots >= 0)[None, :]
    k_offs = slot_offs[None, :] + (head - NUM_Q_HEADS) * stride_cache_head + dims[:, None]
    k_mask = kv_mask & is_k
    tl.store(k_cache_ptr + k_offs, y1.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    tl.store(k_cache_ptr + k_offs + HALF, y2.to(k_cache_ptr.dtype.element_ty), mask=k_mask)
    v_offs = slot_offs[None, :] + (head - NUM_Q_HEADS - NUM_KV_HEADS) * stride_cache_head + dims[:, None]
    v_mask = kv_mask & is_v
    tl.store(v_cache_ptr + v_offs, x1.to(v_cache_ptr.dtype.element_ty), mask=v_mask)
    tl.store(v_cache_ptr + v_offs + HALF, x2.to(v_cache_ptr.dtype.element_ty), mask=v_mask)


# ---- (c, e) projection + residual add ---------------------------------------------------------------------------


@triton.jit
def _linear_residual_kernel(
    x_ptr,
    w_ptr,
    residual_ptr,
    out_ptr,
    partial_ptr,
    counter_ptr,
    M,
    N,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_om,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    tile_n = tl.program_id(0) // SPLIT_K
    split = tl.program_id(0) % SPLIT_K
    pid_m = tl.program_id(1)
    _pdl_enter(USE_GDC)

    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    acc, sumsq = _gemv_mainloop(
        x_ptr, stride_xm, w_ptr, stride_wn, w_ptr, rows, row_mask, offs_m, m_mask, split * (K // SPLIT_K),
        K // SPLIT_K, False, USE_DOT, BLOCK_N, BLOCK_M, BLOCK_K, DOT_PRECISION,
    )
    if SPLIT_K > 1:
        tile = pid_m * (tl.num_programs(0) // SPLIT_K) + tile_n
        acc, sumsq, is_last = _split_k_reduce(
            acc, sumsq, partial_ptr, partial_ptr, counter_ptr, tile, split, SPLIT_K, False, BLOCK_N, BLOCK_M
        )
    else:
        is_last = offs_m >= 0
    mask = row_mask[:, None] & (m_mask & is_last)[None, :]
    residual = tl.load(residual_ptr + offs_m[None, :] * stride_rm + rows[:, None], mask=mask, other=0.0)
    out = residual.to(tl.float32) + acc
    tl.store(out_ptr + offs_m[None, :] * stride_om + rows[:, None], out.to(out_ptr.dtype.element_ty), mask=mask)


# ---- (d) RMSNorm + gate/up + SiLU * up ----------------------------------------------------------------------------


@triton.jit
def _gate_up_silu_kernel(
    x_ptr,
    w_ptr,
    norm_w_ptr,
    out_ptr,
    partial_ptr,
    partial_sumsq_ptr,
    counter_ptr,
    M,
    eps,
    stride_xm,
    stride_wn,
    stride_om,
    K: tl.constexpr,
    INTERMEDIATE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    BLOCK_P: tl.constexpr = BLOCK_N // 2
    tile_n = tl.program_id(0) // SPLIT_K
    split = tl.program_id(0) % SPLIT_K
    pid_m = tl.program_id(1)
    _pdl_enter(USE_GDC)

    rows = _paired_rows(tile_n, INTERMEDIATE, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    row_mask = rows < 2 * INTERMEDIATE
    acc, sumsq = _gemv_mainloop(
        x_ptr, stride_xm, w_ptr, stride_wn, norm_w_ptr, rows, row_mask, offs_m, m_mask, split * (K // SPLIT_K),
        K // SPLIT_K, True, USE_DOT, BLOCK_N, BLOCK_M, BLOCK_K, DOT_PRECISION,
    )
    if SPLIT_K > 1:
        tile = pid_m * (tl.num_programs(0) // SPLIT_K) + tile_n
        acc, sumsq, is_last = _split_k_reduce(
            acc, sumsq, partial_ptr, partial_sumsq_ptr, counter_ptr, tile, split, SPLIT_K, True, BLOCK_N, BLOCK_M
        )
    else:
        is_last = offs_m >= 0
    acc = acc * tl.rsqrt(sumsq / K + eps)[None, :]
    gate, up = _split_pairs(acc, BLOCK_N, BLOCK_M)
    act = gate / (1.0 + tl.exp(-gate)) * up
    cols = tile_n * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = (m_mask & is_last)[None, :]
    tl.store(out_ptr + offs_m[None, :] * stride_om + cols[:, None], act.to(out_ptr.dtype.element_ty), mask=mask)


# ---- (f) final RMSNorm + LM head (+ greedy argmax) ----------------------------------------------------------------


@triton.jit
def _lm_head_kernel(
    x_ptr,
    w_ptr,
    norm_w_ptr,
    logits_ptr,
    tile_max_ptr,
    tile_arg_ptr,
    partial_ptr,
    partial_sumsq_ptr,
    counter_ptr,
    M,
    N,
    eps,
    stride_xm,
    stride_wn,
    stride_lm,
    stride_tile,
    K: tl.constexpr,
    NORM: tl.constexpr,
    WRITE_LOGITS: tl.constexpr,
    ARGMAX: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    tile_n = tl.program_id(0) // SPLIT_K
    split = tl.program_id(0) % SPLIT_K
    pid_m = tl.program_id(1)
    _pdl_enter(USE_GDC)

    rows = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    acc, sumsq = _gemv_mainloop(
        x_ptr, stride_xm, w_ptr, stride_wn, norm_w_ptr, rows, row_mask, offs_m, m_mask, split * (K // SPLIT_K),
        K // SPLIT_K, NORM, USE_DOT, BLOCK_N, BLOCK_M, BLOCK_K, DOT_PRECISION,
    )
    if SPLIT_K > 1:
        tile = pid_m * (tl.num_programs(0) // SPLIT_K) + tile_n
        acc, sumsq, is_last = _split_k_reduce(
            acc, sumsq, partial_ptr, partial_sumsq_ptr, counter_ptr, tile, split, SPLIT_K, NORM, BLOCK_N, BLOCK_M
        )
    else:
        is_last = offs_m >= 0
    if NORM:
        acc = acc * tl.rsqrt(sumsq / K + eps)[None, :]
    if WRITE_LOGITS:
        mask = row_mask[:, None] & (m_mask & is_last)[None, :]
        tl.store(logits_ptr + offs_m[None, :] * stride_lm + rows[:, None], acc, mask=mask)
    if ARGMAX:
        scores = tl.where(row_mask[:, None], acc, float("-inf"))
        best = tl.max(scores, 0)
        best_row = tile_n * BLOCK_N + tl.argmax(scores, 0, tie_break_left=True)
        tile_offs = tile_n * stride_tile + offs_m
        tl.store(tile_max_ptr + tile_offs, best, mask=m_mask & is_last)
        tl.store(tile_arg_ptr + tile_offs, best_row, mask=m_mask & is_last)


@triton.jit
def _argmax_reduce_kernel(tile_max_ptr, tile_arg_ptr, tokens_ptr, stride_tile, NUM_TILES: tl.constexpr,
                          BLOCK_T: tl.constexpr):
    """tokens[m] = row of the largest logit over all tiles; ties go to the lowest row, like torch.argmax."""
    m = tl.program_id(0)
    best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    best_arg = tl.full([BLOCK_T], 2147483647, dtype=tl.int32)
    for t0 in range(0, NUM_TILES, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < NUM_TILES
        value = tl.load(tile_max_ptr + t * stride_tile + m, mask=valid, other=float("-inf"))
        arg = tl.load(tile_arg_ptr + t * stride_tile + m, mask=valid, other=2147483647)
        better = (value > best) | ((value == best) & (arg < best_arg))
        best = tl.where(better, value, best)
        best_arg = tl.where(better, arg, best_arg)
    top = tl.max(best, 0)
    token = tl.min(tl.where(best == top, best_arg, 2147483647), 0)
    tl.store(tokens_ptr + m, token.to(tl.int64))


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, eps, stride_xm, stride_om, N: tl.constexpr, BLOCK: tl.constexpr,
                    USE_GDC: tl.constexpr):
    """HF RMSNorm: normalize in fp32, cast to the input dtype, then multiply by the weight."""
    m = tl.program_id(0)
    _pdl_enter(USE_GDC)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + m * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + m * stride_om + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


# ---- launchers ----------------------------------------------------------------------------------------------------


class LMHeadOutput(NamedTuple):
    logits: torch.Tensor | None  # [M, vocab] fp32
    tokens: torch.Tensor | None  # [M] int64 greedy tokens


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; a nominal 4 in the CPU interpreter (small grids, still exercising split-K)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def pdl_supported(device_index: int = 0) -> bool:
    """Programmatic dependent launch needs Hopper or newer and a triton with gdc_wait and the launch_pdl option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        has_option = "launch_pdl" in CUDAOptions.__dataclass_fields__
        has_ops = hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")
    except (ImportError, AttributeError):
        return False
    if not (has_option and has_ops and torch.cuda.is_available()):
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_options(config: GemvConfig, use_pdl: bool) -> dict:
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if use_pdl:
        options["launch_pdl"] = True
    return options


def _check_rows(x: torch.Tensor, k: int, name: str) -> None:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{name} must be [num_rows, {k}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous along its last dimension")


def _check_weight(w: torch.Tensor, name: str) -> None:
    if w.dim() != 2 or w.stride(1) != 1:
        raise ValueError(f"{name} must be a 2-D weight [N, K] contiguous along K, got shape {tuple(w.shape)}")


class SplitKScratch(NamedTuple):
    partial: torch.Tensor  # fp32 partial tiles
    partial_sumsq: torch.Tensor  # fp32 partial sums of squares
    counters: torch.Tensor  # int32 arrival counters, zero between launches


def _split_k_scratch(config: GemvConfig, n_tiles: int, m_tiles: int, counters: torch.Tensor | None,
                     device: torch.device) -> SplitKScratch:
    tiles = n_tiles * m_tiles
    if config.split_k == 1:
        dummy = torch.empty(1, dtype=torch.float32, device=device)
        return SplitKScratch(dummy, dummy, torch.empty(1, dtype=torch.int32, device=device))
    partial = torch.empty(tiles * config.split_k * config.block_n * config.block_m, dtype=torch.float32,
                          device=device)
    partial_sumsq = torch.empty(tiles * config.split_k * config.block_m, dtype=torch.float32, device=device)
    if counters is None:
        counters = torch.zeros(tiles, dtype=torch.int32, device=device)
    elif counters.numel() < tiles or counters.dtype != torch.int32:
        raise ValueError(f"split-K counters must be int32 with at least {tiles} entries")
    return SplitKScratch(partial, partial_sumsq, counters)


def qkv_rope_cache(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    num_q_heads: int,
    *,
    q_out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    counters: torch.Tensor | None = None,
    use_pdl: bool = False,
) -> torch.Tensor:
    """q = RoPE(RMSNorm(x) @ Wq^T + bq); k/v likewise (no RoPE on v) written at slot_mapping of the cache.

    x [M, hidden]; qkv_weight [(Hq + 2 Hkv) * D, hidden] (q rows, then k, then v); cos/sin_cache
    [max_positions, D / 2] fp32; kv_cache_layer [2, num_blocks, block_size, Hkv, D]. Returns q [M, Hq, D].
    Negative slots are padding rows: their K/V is not written.
    """
    _, _, cache_block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    num_rows, hidden = x.shape
    n = (num_q_heads + 2 * num_kv_heads) * head_dim
    _check_rows(x, hidden, "x")
    _check_weight(qkv_weight, "qkv_weight")
    if qkv_weight.shape != (n, hidden):
        raise ValueError(f"qkv_weight must be [{n}, {hidden}], got {tuple(qkv_weight.shape)}")
    if kv_cache_layer.stride(-1) != 1:
        raise ValueError("kv_cache_layer must be contiguous along head_dim")
    if cos_cache.shape[1] != head_dim // 2 or cos_cache.stride() != sin_cache.stride():
        raise ValueError(f"cos/sin caches must be [max_positions, {head_dim // 2}] with equal strides")
    if positions.shape != (num_rows,) or slot_mapping.shape != (num_rows,):
        raise ValueError(f"positions and slot_mapping must be [{num_rows}]")
    if q_out is None:
        q_out = torch.empty(num_rows, num_q_heads, head_dim, dtype=kv_cache_layer.dtype, device=x.device)
    if num_rows == 0:
        return q_out
    config = config or choose_gemv_config(num_rows, n, hidden, sm_count=sm_count(x.device), pair_half=head_dim // 2,
                                         folds_norm=True)
    check_gemv_config(config, n, hidden, pair_half=head_dim // 2)
    n_tiles, m_tiles = n // config.block_n, triton.cdiv(num_rows, config.block_m)
    scratch = _split_k_scratch(config, n_tiles, m_tiles, counters, x.device)
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    _qkv_rope_cache_kernel[(n_tiles * config.split_k, m_tiles)](
        x, qkv_weight, norm_weight, qkv_bias if qkv_bias is not None else qkv_weight, q_out, positions,
        cos_cache, sin_cache, slot_mapping, k_cache, v_cache, *scratch,
        num_rows, eps, x.stride(0), qkv_weight.stride(0), q_out.stride(0), cos_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        K=hidden, NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        CACHE_BLOCK_SIZE=cache_block_size, HAS_BIAS=qkv_bias is not None,
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        USE_DOT=config.use_dot, DOT_PRECISION=_dot_precision(x.dtype), USE_GDC=use_pdl,
        **_launch_options(config, use_pdl),
    )
    return q_out


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    counters: torch.Tensor | None = None,
    use_pdl: bool = False,
) -> torch.Tensor:
    """out = residual + x @ weight^T (fp32 accumulation, one rounding). out defaults to residual (in place)."""
    num_rows, k = x.shape
    _check_rows(x, k, "x")
    _check_weight(weight, "weight")
    n = weight.shape[0]
    if weight.shape[1] != k or residual.shape != (num_rows, n) or residual.stride(1) != 1:
        raise ValueError(f"shapes do not chain: x {tuple(x.shape)}, weight {tuple(weight.shape)}, "
                         f"residual {tuple(residual.shape)}")
    out = residual if out is None else out
    if num_rows == 0:
        return out
    config = config or choose_gemv_config(num_rows, n, k, sm_count=sm_count(x.device))
    check_gemv_config(config, n, k)
    n_tiles, m_tiles = triton.cdiv(n, config.block_n), triton.cdiv(num_rows, config.block_m)
    scratch = _split_k_scratch(config, n_tiles, m_tiles, counters, x.device)
    _linear_residual_kernel[(n_tiles * config.split_k, m_tiles)](
        x, weight, residual, out, scratch.partial, scratch.counters,
        num_rows, n, x.stride(0), weight.stride(0), residual.stride(0), out.stride(0),
        K=k, BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        USE_DOT=config.use_dot, DOT_PRECISION=_dot_precision(x.dtype), USE_GDC=use_pdl,
        **_launch_options(config, use_pdl),
    )
    return out


def gate_up_silu(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    counters: torch.Tensor | None = None,
    use_pdl: bool = False,
) -> torch.Tensor:
    """silu(RMSNorm(x) @ Wgate^T) * (RMSNorm(x) @ Wup^T); gate_up_weight [2 I, hidden] (gate rows, then up)."""
    num_rows, k = x.shape
    _check_rows(x, k, "x")
    _check_weight(gate_up_weight, "gate_up_weight")
    if gate_up_weight.shape[1] != k or gate_up_weight.shape[0] % 2:
        raise ValueError(f"gate_up_weight must be [2 * intermediate, {k}], got {tuple(gate_up_weight.shape)}")
    inter = gate_up_weight.shape[0] // 2
    if out is None:
        out = torch.empty(num_rows, inter, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    config = config or choose_gemv_config(num_rows, 2 * inter, k, sm_count=sm_count(x.device), pair_half=inter,
                                         folds_norm=True)
    check_gemv_config(config, 2 * inter, k, pair_half=inter)
    n_tiles, m_tiles = 2 * inter // config.block_n, triton.cdiv(num_rows, config.block_m)
    scratch = _split_k_scratch(config, n_tiles, m_tiles, counters, x.device)
    _gate_up_silu_kernel[(n_tiles * config.split_k, m_tiles)](
        x, gate_up_weight, norm_weight, out, *scratch,
        num_rows, eps, x.stride(0), gate_up_weight.stride(0), out.stride(0),
        K=k, INTERMEDIATE=inter, BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_K=config.block_k,
        SPLIT_K=config.split_k, USE_DOT=config.use_dot, DOT_PRECISION=_dot_precision(x.dtype), USE_GDC=use_pdl,
        **_launch_options(config, use_pdl),
    )
    return out


def lm_head(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-5,
    write_logits: bool = True,
    argmax: bool = False,
    logits_out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    counters: torch.Tensor | None = None,
    use_pdl: bool = False,
) -> LMHeadOutput:
    """logits = (RMSNorm(x) if norm_weight is given else x) @ weight^T in fp32; argmax=True adds greedy tokens."""
    if not (write_logits or argmax):
        raise ValueError("lm_head needs write_logits or argmax")
    num_rows, k = x.shape
    _check_rows(x, k, "x")
    _check_weight(weight, "weight")
    vocab = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight must be [vocab, {k}], got {tuple(weight.shape)}")
    logits = None
    if write_logits:
        logits = logits_out if logits_out is not None else torch.empty(
            num_rows, vocab, dtype=torch.float32, device=x.device)
    tokens = torch.empty(num_rows, dtype=torch.int64, device=x.device) if argmax else None
    if num_rows == 0:
        return LMHeadOutput(logits, tokens)
    config = config or choose_gemv_config(num_rows, vocab, k, sm_count=sm_count(x.device),
                                         folds_norm=norm_weight is not None)
    check_gemv_config(config, vocab, k)
    n_tiles, m_tiles = triton.cdiv(vocab, config.block_n), triton.cdiv(num_rows, config.block_m)
    scratch = _split_k_scratch(config, n_tiles, m_tiles, counters, x.device)
    if argmax:
        tile_max = torch.empty(n_tiles, num_rows, dtype=torch.float32, device=x.device)
        tile_arg = torch.empty(n_tiles, num_rows, dtype=torch.int32, device=x.device)
    else:
        tile_max = tile_arg = scratch.partial
    _lm_head_kernel[(n_tiles * config.split_k, m_tiles)](
        x, weight, norm_weight if norm_weight is not None else weight,
        logits if logits is not None else scratch.partial, tile_max, tile_arg, *scratch,
        num_rows, vocab, eps, x.stride(0), weight.stride(0), logits.stride(0) if logits is not None else 0,
        num_rows,
        K=k, NORM=norm_weight is not None, WRITE_LOGITS=write_logits, ARGMAX=argmax,
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        USE_DOT=config.use_dot, DOT_PRECISION=_dot_precision(x.dtype), USE_GDC=use_pdl,
        **_launch_options(config, use_pdl),
    )
    if argmax:
        _argmax_reduce_kernel[(num_rows,)](
            tile_max, tile_arg, tokens, num_rows, NUM_TILES=n_tiles, BLOCK_T=min(1024, triton.next_power_of_2(n_tiles)),
            num_warps=4,
        )
    return LMHeadOutput(logits, tokens)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None,
            use_pdl: bool = False) -> torch.Tensor:
    """HF RMSNorm of each row of x [M, hidden]."""
    num_rows, hidden = x.shape
    _check_rows(x, hidden, "x")
    out = torch.empty_like(x) if out is None else out
    if num_rows == 0:
        return out
    block = triton.next_power_of_2(hidden)
    options = dict(num_warps=4 if block <= 4096 else 8)
    if use_pdl:
        options["launch_pdl"] = True
    _rmsnorm_kernel[(num_rows,)](x, weight, out, eps, x.stride(0), out.stride(0), N=hidden, BLOCK=block,
                                 USE_GDC=use_pdl, **options)
    return out
