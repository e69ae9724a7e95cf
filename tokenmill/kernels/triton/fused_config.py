"""Tile shapes for the skinny weight-streaming GEMMs of a decode step (plain Python; the kernels are in fused_decode).

A decode step multiplies a few activation rows (the batch, M = 1..64) by every weight matrix once, so each
kernel is bound by streaming the weight [N, K] from memory. One program owns `block_n` weight rows (for the
paired ops, `block_n // 2` pairs: the two RoPE halves of a head, or a gate row and its up row) and `block_m`
batch rows, and walks `K / split_k` of the reduction dimension in `block_k` steps.

  * M == 1: CUDA-core path (`use_dot=False`): fp32 multiply-accumulate in registers, reduced once at the end.
    Small `block_n` gives thousands of programs, so every SM streams.
  * M >= 2: tensor-core path (`use_dot=True`), swap-AB: acc[block_n, block_m] = W_tile @ x_tile^T, with the
    batch padded to 16 columns; the MMA is far faster than the weight stream, so padding costs nothing.
  * split_k > 1 when the weight rows alone give too few programs to fill the GPU (o/down projections at larger
    batches); the last program of each tile adds the partial sums in split order, so results are deterministic.

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
CUDA_CORE_PROGRAMS_PER_SM = 4


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


def choose_gemv_config(
    num_rows: int, n: int, k: int, *, sm_count: int, pair_half: int = 0, target_waves: float = 1.5
) -> GemvConfig:
    """Picks a tile shape for out[num_rows, n] = x[num_rows, k] @ W[n, k]^T from the shapes and SM count alone.

    pair_half > 0 marks a paired op: weight row i is combined with row i + pair_half inside its group of
    2 * pair_half rows (RoPE halves: pair_half = head_dim / 2; gate/up: pair_half = intermediate_size).
    """
    if num_rows < 1 or n < 1 or k < 1:
        raise ValueError(f"empty GEMM: rows={num_rows}, n={n}, k={k}")
    if num_rows <= CUDA_CORE_MAX_ROWS:
        block_m, use_dot, num_warps, num_stages = 1, False, 4, 1
        # Loads are not pipelined on this path: latency is hidden by several resident programs per SM, so keep
        # at least CUDA_CORE_PROGRAMS_PER_SM programs per SM by narrowing the tile (o/down at Llama-1B: 2 rows).
        block_n = 8
        while block_n > 2 and -(-n // block_n) < CUDA_CORE_PROGRAMS_PER_SM * sm_count:
            block_n //= 2
        tile_elems = 4096
    else:
        block_m = min(MAX_BLOCK_M, max(16, _next_pow2(num_rows)))
        use_dot, num_warps, num_stages = True, 4, 3
        block_n = 16 if block_m <= 16 else (32 if block_m <= 32 else 64)
        tile_elems = 4096 if block_n <= 32 else 8192
    if pair_half:
        block_n = min(block_n, 2 * _largest_pow2_dividing(pair_half, block_n // 2))
    block_k = _largest_pow2_dividing(k, max(16, tile_elems // block_n))
    if not use_dot:
        block_k = min(block_k, 2048)
    n_tiles = -(-n // block_n) if not pair_half else n // block_n
    programs = n_tiles * -(-num_rows // block_m)
    split_k = 1
    while (
        programs * split_k < target_waves * sm_count
        and split_k < MAX_SPLIT_K
        and k % (2 * split_k * block_k) == 0
    ):
        split_k *= 2
    if block_n * block_m >= 4096:
        num_warps = 8  # a 64x64 fp32 accumulator (plus the RoPE/SiLU epilogue) spills with 4 warps
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
