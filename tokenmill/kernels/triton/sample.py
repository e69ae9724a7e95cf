"""A decode step's common sampling case in two kernel launches: temperature (or greedy), min_tokens' forbidden ids
and the NaN/inf check, for rows without penalties, logprobs, top-k / top-p / min-p or a seed.

The sampler's general path (engine/sampler.py) takes ~15 small torch operations per step for this case (a float copy
of the logits, the corruption check, a masked copy for min_tokens and its index upload, a vocabulary of Exp(1) noise,
the race, the stack): on a GPU each is a launch the host pays for, and with the engine one step ahead of the device
(async scheduling) that host time is the step's time once it exceeds the GPU's. Here every row is drawn by the same
exponential race (argmax over tokens of logit / T - log E, E ~ Exp(1)) with E generated in the kernel (Philox,
keyed per row), so nothing of the vocabulary's size is written.

Launch 1, grid (rows, chunks): each program takes CHUNK tokens of a row, keeps its best score and index and the sum of
its logits. Launch 2, grid (rows,): the chunks' bests in order (first index wins a tie, as torch.argmax) and whether
the row's sum is finite. `race_sample_reference` is the same computation in PyTorch given the noise
(`exponential_noise` draws the kernel's noise), against which the tests check the kernel.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

CHUNK = 4096  # tokens per program of the first launch (a 128k vocabulary: 32 programs per row)
PARAM_INTS = 4  # per row: temperature (float bits), greedy, key low, key high; then the forbidden ids


@triton.jit
def _noise(key_lo, key_hi, offs):
    """Exp(1) draws for token ids `offs` of the row keyed (key_lo, key_hi): -log U, U ~ Philox uniform in [0, 1)."""
    key = (key_hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | key_lo.to(tl.uint32, bitcast=True).to(tl.uint64)
    u = tl.rand(key, offs)
    return tl.maximum(-tl.log(u), 1.1754943508222875e-38)  # float32's smallest normal, as the torch path clamps


# Sizes are not specialised on (Triton would compile a variant for a value of 1 or a multiple of 16): one compile per
# logits dtype, which the engine's warm-up does.
@triton.jit(do_not_specialize=["stride_row", "vocab", "params_stride", "num_forbidden", "chunks"])
def _race_chunks_kernel(logits_ptr, stride_row, vocab, params_ptr, params_stride, num_forbidden, part_ptr,
                        chunks, CHUNK: tl.constexpr, FIRST_FORBIDDEN: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    p = params_ptr + row * params_stride
    temperature = tl.load(p).to(tl.float32, bitcast=True)
    greedy = tl.load(p + 1) != 0
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < vocab
    x = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=0.0).to(tl.float32)
    total = tl.sum(x, axis=0)
    if greedy:
        score = x
    else:
        score = x / temperature - tl.log(_noise(tl.load(p + 2), tl.load(p + 3), offs))
    score = tl.where(mask, score, float("-inf"))
    for k in range(num_forbidden):
        score = tl.where(offs == tl.load(p + FIRST_FORBIDDEN + k), float("-inf"), score)
    best = tl.max(score, axis=0)
    index = tl.argmax(score, axis=0, tie_break_left=True) + chunk * CHUNK
    out = part_ptr + (row * chunks + chunk) * 3
    tl.store(out, best)
    tl.store(out + 1, index.to(tl.float32, bitcast=True))
    tl.store(out + 2, total)


@triton.jit(do_not_specialize=["chunks"])
def _race_rows_kernel(part_ptr, chunks, out_ptr, CHUNKS_POW2: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_POW2)
    mask = c < chunks
    base = part_ptr + (row * chunks + c) * 3
    best = tl.load(base, mask=mask, other=float("-inf"))
    index = tl.load(base + 1, mask=mask, other=0.0).to(tl.int32, bitcast=True)
    total = tl.sum(tl.load(base + 2, mask=mask, other=0.0), axis=0)
    winner = tl.argmax(best, axis=0, tie_break_left=True)  # the first chunk holding the row's best score
    token = tl.sum(tl.where(c == winner, index, 0), axis=0)
    finite = tl.abs(total) < float("inf")  # false for inf and NaN
    tl.store(out_ptr + row * 2, token.to(tl.int64))
    tl.store(out_ptr + row * 2 + 1, (~finite).to(tl.int64))


def _int32(value: int) -> int:
    """The low 32 bits of `value` as a signed int32."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def pack_row_params(temperatures: Sequence[float], keys: Sequence[int], forbidden: Sequence[Sequence[int]]
                    ) -> tuple[list[int], int]:
    """The kernel's per-row parameters as one flat int32 list (one host-to-device copy) and its row stride.
    temperature < 1e-5 is greedy; keys are the rows' 64-bit noise keys; forbidden: each row's token ids that must
    not be drawn (min_tokens)."""
    stride = PARAM_INTS + max((len(f) for f in forbidden), default=0)
    flat: list[int] = []
    for temperature, key, ids in zip(temperatures, keys, forbidden):
        greedy = temperature < 1e-5
        bits = struct.unpack("<i", struct.pack("<f", 1.0 if greedy else temperature))[0]
        flat += [bits, int(greedy), _int32(key), _int32(key >> 32), *ids, *([-1] * (stride - PARAM_INTS - len(ids)))]
    return flat, stride


def race_sample(logits: torch.Tensor, params: torch.Tensor, params_stride: int) -> torch.Tensor:
    """[rows, 2] int64: each row's token and 1 where its logits hold NaN/inf. logits: [rows, vocab] (any float
    dtype, rows contiguous); params: pack_row_params's list on the logits' device (int32)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("the logits' vocabulary dimension must be contiguous")
    chunks = triton.cdiv(vocab, CHUNK)
    part = torch.empty((rows, chunks, 3), dtype=torch.float32, device=logits.device)
    out = torch.empty((rows, 2), dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    num_forbidden = params_stride - PARAM_INTS
    _race_chunks_kernel[(rows, chunks)](logits, logits.stride(0), vocab, params, params_stride, num_forbidden, part,
                                        chunks, CHUNK=CHUNK, FIRST_FORBIDDEN=PARAM_INTS, num_warps=8)
    _race_rows_kernel[(rows,)](part, chunks, out, CHUNKS_POW2=triton.next_power_of_2(chunks), num_warps=1)
    return out


@triton.jit
def _noise_kernel(out_ptr, vocab, key_lo, key_hi, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _noise(key_lo, key_hi, offs), mask=offs < vocab)


def exponential_noise(key: int, vocab: int, device: torch.device | str) -> torch.Tensor:
    """[vocab] float32: the Exp(1) draws race_sample uses for a row keyed `key` (for checking it)."""
    out = torch.empty(vocab, dtype=torch.float32, device=device)
    block = 1024
    _noise_kernel[(triton.cdiv(vocab, block),)](out, vocab, _int32(key), _int32(key >> 32), BLOCK=block)
    return out


def race_sample_reference(logits: torch.Tensor, temperatures: Sequence[float], noise: torch.Tensor,
                          forbidden: Sequence[Sequence[int]]) -> torch.Tensor:
    """race_sample in PyTorch, given each row's noise [rows, vocab]."""
    x = logits.float()
    corrupted = ~x.sum(dim=-1).isfinite()
    scores = []
    for row, temperature in enumerate(temperatures):
        score = x[row] if temperature < 1e-5 else x[row] / temperature - noise[row].log()
        score = score.clone()
        for token in forbidden[row]:
            score[token] = float("-inf")
        scores.append(score)
    return torch.stack([torch.stack(scores).argmax(dim=-1), corrupted.long()], dim=1)
