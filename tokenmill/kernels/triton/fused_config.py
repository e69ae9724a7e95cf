"""Tile shapes for the skinny weight-streaming GEMMs of a decode step (plain Python; the kernels are in fused_decode).

A decode step multiplies a few activation rows (the batch, M = 1..64) by every weight matrix once, so each
kernel is bound by streaming the weight [N, K] from memory. One program owns `block_n` weight rows (for the
paired ops, `block_n // 2` pairs: the two RoPE halves of a head, or a gate row and its up row) and `block_m`
batch rows, and walks `K / split_k` of the reduction dimension in `block_k` steps.

  * M == 1: CUDA-core path (`use_dot=False`): fp32 multiply-accumulate in registers, reduced once at the end.
    Narrow tiles (4 rows) give hundreds to thousands of programs, so every SM streams.
  * M >= 2: tensor-core path (`use_dot=True`), swap-AB: acc[block_n, block_m] = W_tile @ x_tile^T, with the
    batch padded to 16 columns; the MMA is far faster than the weight stream, so padding costs nothing.
  * split_k > 1 when the weight rows alone give too few programs to fill the GPU and the reduction is long (the
    down projection); the last program of each tile adds the partial sums in split order, so results are
    deterministic.

The same tile mapping (weight rows of a tile, K range of a split) is what a persistent megakernel schedules as
its instructions, so these shapes are the unit of work for step 2 as well.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Batch rows per program on the tensor-core path; larger batches add programs along the batch axis.
MAX_BLOCK_M = 64
# Largest batch handled by the CUDA-core path.
CUDA_CORE_MAX_ROWS = 1
MAX_SPLIT_K = 8
# Fewest programs per SM each path aims for (see choose_gemv_config for the measurements behind them).
CUDA_CORE_PROGRAMS_PER_SM = 2
DOT_PROGRAMS_PER_SM = 4
# A K split must still stream this many elements of each weight row (4 KB of bf16).
MIN_SPLIT_K_SPAN = 2048


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # weight rows per program (an even number for paired ops)
    block_k: int  # reduction step
    block_m: int  # batch rows per program
    split_k: int  # programs sharing one tile's reduction
    use_dot: bool  # tensor cores (tl.dot) or CUDA-core FMAs
    num_warps: int = 4
    num_stages: int = 3

    def with_(self, **changes) -> "GemvConfig":
        return replace(self, **changes)


def _largest_pow2_dividing(n: int, at_most: int) -> int:
    """Largest power of two that divides n and is <= at_most (1 when n is odd)."""
    d = 1
    while d * 2 <= at_most and n % (d * 2) == 0:
        d *= 2
    return d


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def choose_gemv_config(num_rows: int, n: int, k: int, *, sm_count: int, pair_half: int = 0,
                       folds_norm: bool = False) -> GemvConfig:
    """Picks a tile shape for out[num_rows, n] = x[num_rows, k] @ W[n, k]^T from the shapes and SM count alone
    (never from timings on this machine, so every CUDA graph the runner captures gets the same launch).

    pair_half > 0 marks a paired op: weight row i is combined with row i + pair_half inside its group of
    2 * pair_half rows (RoPE halves: pair_half = head_dim / 2; gate/up: pair_half = intermediate_size).
    folds_norm: each program RMSNorms its x tile before the MMA (qkv, gate_up, lm_head).

    The rules come from the H100 tile sweep at Llama-3.2-1B shapes (docs/bench/decode_h100_sweep.log, 2026-11-26;
    % of copy bandwidth per op, 132 SMs):

    batch 1 (CUDA cores): 4-row tiles with 1024-element K steps won or tied everywhere: gate_up 89 % (8 rows: 81 %),
    lm_head 92 % (8 rows: 89 %), down 78 % and o 50 % (2 rows: 74 % / 47 %). o and down have 512 such tiles, 3.9 per
    SM, and still beat 2-row tiles, so tiles narrow below 4 rows only under CUDA_CORE_PROGRAMS_PER_SM. (qkv: 8 rows
    measured 7.8 us vs 8.3 us for 4 rows, within the spread between runs of the same shape; not special-cased.)

    batch >= 2 (tensor cores, batch padded to 16): throughput grew with tile width on the ops that fold an RMSNorm
    into the GEMM, because every program re-loads x and scales it by the norm weight per K step, a cost shared by
    its rows: gate_up 33 / 64 / 80 % and lm_head 36 / 67 / 91 % at 16 / 32 / 64 rows. But too few tiles leave SMs
    idle: qkv (3072 rows) was best at 32 rows = 96 tiles (31 %; 64 rows = 48 tiles: 23 %), o and down (2048 rows)
    at 16 rows. Rule: the widest of 64 / 32 / 16 rows that still gives half a wave of tiles.
    Split-K pays only with a long reduction: down (K = 8192) went 55 / 67 / 71 % at split 1 / 2 / 4 (4 splits = 512
    programs, 3.9 per SM); for qkv (K = 2048) splitting a 32-row tile lost (22 % vs 31 %), and o (K = 2048) is ~40 %
    with or without it. Rule: split while programs < DOT_PROGRAMS_PER_SM per SM and each split keeps at least
    MIN_SPLIT_K_SPAN elements of K. K steps: 16 x 256 for unsplit 16-row tiles (o: 39 %), 32 x 256 and 64 x 128
    (16 KB of weights per stage) for wider ones, 3 stages; a split tile has a short K span, so it steps 128 with 4
    stages (down: 16 x 128, split 4, 4 stages: 71 %; 16 x 256, split 2, 3 stages: 67 %).
    Batches 2-15 use the batch-16 shapes (same padded tile).

    32 and 64 rows (H100 sweep at those batches, docs/bench/decode_h100_sweep_32_64.json, 2026-11-27; us per call,
    best vs the batch-16 rules): the ops that fold an RMSNorm (folds_norm: qkv, gate_up, lm_head) take 64-row tiles
    whatever their count, since re-normalising x per tile dominates (qkv 13.1 vs 21.8 at 32 rows, 20.8 vs 31.1 at
    64), with 256-element K steps while there are fewer tiles than SMs (qkv: 13.1 vs 19.2 at 128). Ops without a
    norm keep 256-element K steps at 64 rows (o: 7.95 vs 9.59) and split K only to one program per SM per 16 batch
    rows (down at 64 rows: split 2, 21.7 us, vs split 4, 29.1). Eight warps only for a 64 x 64 accumulator with
    128-element steps (gate_up at 64 rows: 29.0 vs 30.8 with 4; 4 warps won everywhere else: o at 32 rows 7.2 vs
    8.2).
    """
    if num_rows < 1 or n < 1 or k < 1:
        raise ValueError(f"empty GEMM: rows={num_rows}, n={n}, k={k}")

    def pair_cap(block_n: int) -> int:
        return min(block_n, 2 * _largest_pow2_dividing(pair_half, block_n // 2)) if pair_half else block_n

    def tiles(block_n: int) -> int:
        return n // block_n if pair_half else -(-n // block_n)

    if num_rows <= CUDA_CORE_MAX_ROWS:
        block_m, use_dot, num_warps, num_stages = 1, False, 4, 1
        # Loads are not pipelined on this path: latency is hidden by several resident programs per SM.
        block_n = pair_cap(4)
        while block_n > 2 and tiles(block_n) < CUDA_CORE_PROGRAMS_PER_SM * sm_count:
            block_n //= 2
        block_k = _largest_pow2_dividing(k, min(2048, 4096 // block_n))
        min_programs = CUDA_CORE_PROGRAMS_PER_SM * sm_count
    else:
        block_m = min(MAX_BLOCK_M, max(16, _next_pow2(num_rows)))
        use_dot, num_warps = True, 4
        m_tiles = -(-num_rows // block_m)
        if folds_norm and block_m >= 32 and pair_cap(64) == 64:
            block_n = 64
        else:
            block_n = next((w for w in (64, 32) if pair_cap(w) == w and 2 * tiles(w) * m_tiles >= sm_count), 16)
        block_n = pair_cap(block_n)
        num_stages = 3
        # A normed x tile is held in fp32: at most 8192 elements of it.
        x_cap = 8192 // block_m if folds_norm else 256
        block_k = _largest_pow2_dividing(k, max(16, min(8192 // block_n, x_cap, 256)))
        if folds_norm and block_m >= 32 and tiles(block_n) * m_tiles < sm_count:
            block_k = _largest_pow2_dividing(k, 256)
        min_programs = DOT_PROGRAMS_PER_SM * sm_count * 16 // block_m
    programs = tiles(block_n) * -(-num_rows // block_m)
    split_step = min(block_k, 128) if use_dot else block_k
    split_k = 1
    while (
        programs * split_k < min_programs
        and split_k < MAX_SPLIT_K
        and k % (2 * split_k * split_step) == 0
        and k // (2 * split_k) >= MIN_SPLIT_K_SPAN
    ):
        split_k *= 2
    if use_dot and split_k > 1:
        block_k, num_stages = split_step, 4  # shorter K span per program: finer steps, one more stage in flight
    if use_dot and block_n * block_m >= 4096 and block_k <= 128:
        num_warps = 8  # a 64x64 fp32 accumulator
    config = GemvConfig(block_n, block_k, block_m, split_k, use_dot, num_warps, num_stages)
    check_gemv_config(config, n, k, pair_half)
    return config


def check_gemv_config(config: GemvConfig, n: int, k: int, pair_half: int = 0) -> None:
    """Raises ValueError when the tile shape cannot compute this GEMM exactly."""
    c = config
    for name in ("block_n", "block_k", "block_m", "split_k"):
        value = getattr(c, name)
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    if c.use_dot and (c.block_n < 16 or c.block_m < 16 or c.block_k < 16):
        raise ValueError(f"the tensor-core path needs block_n, block_m, block_k >= 16, got {c}")
    if not c.use_dot and c.block_m > 4:
        raise ValueError(f"the CUDA-core path keeps block_m x block_n x block_k in registers: block_m <= 4, got {c}")
    if k % (c.split_k * c.block_k):
        raise ValueError(f"k={k} is not a multiple of split_k * block_k = {c.split_k * c.block_k}")
    if pair_half:
        if c.block_n < 2 or pair_half % (c.block_n // 2):
            raise ValueError(f"block_n/2 = {c.block_n // 2} must divide the pair distance {pair_half}")
        if n % (2 * pair_half):
            raise ValueError(f"n={n} is not a whole number of {2 * pair_half}-row pair groups")
