"""Weight-only quantized linear layers for CPU inference: int8 per output channel, or int4 in groups along K.

Decode with a handful of sequences is memory-bound: every weight is read once per step, so bytes per weight set the
speed. With few rows the layer runs torch's weight-only kernels, which read 1 byte (`_weight_int8pack_mm`) or half a
byte (`_weight_int4pack_mm_for_cpu`) per weight. Past `small_batch_rows` rows those kernels fall behind a plain GEMM
(they do not block over rows), so the layer switches to a bf16 copy of the *same* dequantized weights, prepacked
once for oneDNN (AVX512-BF16 / AMX); on the 2-core CI VM that is 3-4x faster than fp32 at 32 rows and ~8x in
prefill. Both paths take bf16 activations (the low-bit kernels only vectorize bf16; with fp32 inputs they are 10x
slower) and return the caller's dtype.

Quantization, from whatever float weights the loader produced:
  int8  symmetric per output row: w ~ q * scale, q in [-127, 127].
  int4  per group of `group_size` inputs: w ~ q * scale + min, q in [0, 15], with (scale, min) from the group's
        min/max or from a grid symmetric around 0, whichever fits the group better. For a GGUF Q4_0 or Q4_1
        source (blocks of 32 along K) this recovers the file's own codes, so only the bf16 rounding of scale and
        min inside the kernel is lost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATION_MODES = ("none", "int8", "int4")
INT4_GROUP_SIZE = 32
# Rows up to which the low-bit kernels beat the prepacked bf16 GEMM, measured on SmolLM2-135M with the weights
# streaming from DRAM as in a real decode step (one core: int4 layers 26 ms vs bf16 29 ms at 8 rows, 37 vs 30 at 12).
# The 49152-row LM head crosses near 2 rows (int8 5.9 ms vs bf16 6.0 at 2, 6.4 vs 5.9 at 3).
SMALL_BATCH_ROWS = 8
LM_HEAD_SMALL_BATCH_ROWS = 2
COMPUTE_DTYPE = torch.bfloat16


class Int8Weights(NamedTuple):
    qweight: torch.Tensor  # [N, K] int8
    scales: torch.Tensor  # [N] float32


class Int4Weights(NamedTuple):
    codes: torch.Tensor  # [N, K] int32 in [0, 15]
    scales: torch.Tensor  # [N, K // group_size] float32
    mins: torch.Tensor  # [N, K // group_size] float32: the value of code 0
    group_size: int


def quantize_int8(weight: torch.Tensor) -> Int8Weights:
    """Symmetric per-row int8; rows of zeros get scale 1 (any scale reproduces them)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    qweight = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weights(qweight, scales)


def dequantize_int8(q: Int8Weights) -> torch.Tensor:
    return q.qweight.float() * q.scales[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> Int4Weights:
    """int4 per group of `group_size` consecutive inputs of a row, each group on whichever grid fits it better:
    min/max (w = code * scale + min, GGUF Q4_1 and Q4_K) or symmetric around 0 with the largest-magnitude value at
    code 0 (w = (code - 8) * scale, GGUF Q4_0). Groups that came from either format are recovered exactly."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 quantization needs in_features divisible by {group_size}, got {k}")
    w = weight.detach().float().reshape(n, k // group_size, group_size)

    def fit(scales: torch.Tensor, mins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scales = torch.where(scales != 0, scales, torch.ones_like(scales))  # a constant group: code 0 is exact
        codes = torch.round((w - mins[..., None]) / scales[..., None]).clamp_(0, 15)
        error = (codes * scales[..., None] + mins[..., None] - w).abs().amax(dim=-1)
        return codes, scales, mins, error

    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    asym = fit((hi - lo) / 15.0, lo)
    extreme = torch.where(hi.abs() > lo.abs(), hi, lo)  # Q4_0 puts the largest-magnitude value at code 0
    sym_scales = extreme / -8.0
    sym = fit(sym_scales, -8.0 * sym_scales)
    use_sym = sym[3] < asym[3]
    codes = torch.where(use_sym[..., None], sym[0], asym[0]).to(torch.int32)
    scales = torch.where(use_sym, sym[1], asym[1])
    mins = torch.where(use_sym, sym[2], asym[2])
    return Int4Weights(codes.reshape(n, k), scales, mins, group_size)


def dequantize_int4(q: Int4Weights) -> torch.Tensor:
    n, k = q.codes.shape
    codes = q.codes.reshape(n, k // q.group_size, q.group_size).float()
    return (codes * q.scales[..., None] + q.mins[..., None]).reshape(n, k)


def quantized_kernels_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm") and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def _mkldnn_bf16_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class QuantizedLinear(nn.Module):
    """y = x @ W.T + b with W stored as int8 or int4 (see the module docstring); CPU only."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        mode: str,
        small_batch_rows: int = SMALL_BATCH_ROWS,
        group_size: int = INT4_GROUP_SIZE,
    ) -> None:
        super().__init__()
        if mode not in ("int8", "int4"):
            raise ValueError(f"unknown weight quantization {mode!r}; choose int8 or int4")
        if weight.device.type != "cpu":
            raise ValueError(f"quantized linear layers run on CPU only, got weights on {weight.device}")
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        if not quantized_kernels_available():
            raise ValueError(f"weight quantization needs torch >= 2.5 (this is {torch.__version__})")
        self.out_features, self.in_features = weight.shape
        self.mode = mode
        self.small_batch_rows = small_batch_rows
        if mode == "int4" and self.in_features % group_size:
            raise ValueError(f"int4 quantization needs in_features divisible by {group_size}, got {self.in_features}")
        # The low-bit kernels' shape limits (unchecked inside torch: int8 silently miscomputes when K % 16 != 0);
        # a layer outside them uses the dense path for every batch size, with the same quantized weights.
        if mode == "int8":
            q8 = quantize_int8(weight)
            dense = dequantize_int8(q8)
            self.use_small_batch_kernel = self.in_features % 16 == 0
            self.register_buffer("qweight", q8.qweight if self.use_small_batch_kernel else None)
            self.register_buffer("scales", q8.scales.to(COMPUTE_DTYPE) if self.use_small_batch_kernel else None)
        else:
            q4 = quantize_int4(weight, group_size)
            dense = dequantize_int4(q4)
            self.group_size = group_size
            self.use_small_batch_kernel = self.out_features % 16 == 0
            packed = scales_and_zeros = None
            if self.use_small_batch_kernel:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.codes.contiguous(), 1)
                # The kernel dequantizes (code - 8) * scale + zero, so zero = min + 8 * scale; layout [K/g, N, 2].
                zeros = q4.mins + 8.0 * q4.scales
                scales_and_zeros = torch.stack([q4.scales, zeros], dim=-1).transpose(0, 1).contiguous()
                scales_and_zeros = scales_and_zeros.to(COMPUTE_DTYPE)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        dense = dense.to(COMPUTE_DTYPE)
        # oneDNN's prepacked layout skips a weight reorder on every call (2-3x on the LM head at 32 rows).
        self.prepacked = _mkldnn_bf16_available()
        self.dense_weight = torch.ops.mkldnn._reorder_linear_weight(dense, 32) if self.prepacked else dense

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str, small_batch_rows: int = SMALL_BATCH_ROWS) -> "QuantizedLinear":
        return cls(linear.weight, linear.bias, mode, small_batch_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Decode calls this ~120 times a step with tiny inputs, so the common case ([T, K] bf16) makes no extra calls.
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        x2 = flat if flat.dtype == COMPUTE_DTYPE else flat.to(COMPUTE_DTYPE)
        if self.use_small_batch_kernel and x2.shape[0] <= self.small_batch_rows:
            if not x2.is_contiguous():
                x2 = x2.contiguous()
            if self.mode == "int8":
                y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
        elif self.prepacked:
            y = torch.ops.mkldnn._linear_pointwise(x2, self.dense_weight, None, "none", [], "")
        else:
            y = F.linear(x2, self.dense_weight)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer computes with (for tests and reference checks)."""
        if self.prepacked:
            return self.dense_weight.to_dense().float()
        return self.dense_weight.float()

    def extra_repr(self) -> str:
        kernel = "low-bit" if self.use_small_batch_kernel else "dense only"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
            f"bias={self.bias is not None}, small batches: {kernel} up to {self.small_batch_rows} rows"
        )


def quantize_linears_(module: nn.Module, mode: str, skip: tuple[str, ...] = ()) -> int:
    """Replaces every nn.Linear under `module` (except names in `skip`) by a QuantizedLinear, in place.
    Returns how many layers were replaced."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"unknown weight quantization {mode!r}; choose int8 or int4")
    replaced = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if isinstance(sub, nn.Linear) and full not in skip:
                setattr(child, attr, QuantizedLinear.from_linear(sub, mode))
                replaced += 1
    return replaced
