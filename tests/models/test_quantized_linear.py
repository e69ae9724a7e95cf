"""Weight-only quantized linear layers against float references on random weights (CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers import quantized_linear as ql
from tokenmill.layers.quantized_linear import (
    QuantizedLinear,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    quantize_linears_,
)

pytestmark = pytest.mark.skipif(not ql.quantized_kernels_available(), reason="torch lacks the CPU low-bit kernels")


def _weights(n: int, k: int, seed: int = 0, std: float = 0.05) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * std


def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def test_int8_round_trip_is_within_half_a_step():
    w = _weights(48, 64)
    q = quantize_int8(w)
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127
    err = (dequantize_int8(q) - w).abs()
    assert (err <= q.scales[:, None] / 2 + 1e-7).all()


def test_int4_round_trip_is_within_half_a_min_max_step_per_group():
    w = _weights(32, 96)
    q = quantize_int4(w, group_size=32)
    assert q.codes.min() >= 0 and q.codes.max() <= 15
    groups = w.reshape(32, 3, 32)
    err = (dequantize_int4(q).reshape(32, 3, 32) - groups).abs()
    # each group takes the better of two grids, so it is never worse than min/max with 16 levels
    half_step = (groups.amax(-1) - groups.amin(-1)) / 30
    assert (err <= half_step[..., None] + 1e-6).all()


def test_int4_recovers_q4_1_style_weights_exactly():
    """Blocks of 32 of the form scale * code + min with codes spanning 0..15 (how Q4_1 stores weights) come back
    exactly, so re-quantizing a Q4_1 GGUF loses nothing but the bf16 rounding inside the kernels."""
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (16, 4, 32), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15
    scales = torch.rand(16, 4, 1, generator=gen) * 0.01 + 1e-3
    mins = -torch.rand(16, 4, 1, generator=gen) * 0.05
    w = (codes * scales + mins).reshape(16, 128)
    q = quantize_int4(w)
    assert torch.equal(q.codes.reshape(16, 4, 32), codes.to(torch.int32))
    torch.testing.assert_close(dequantize_int4(q), w, atol=1e-7, rtol=1e-6)


def test_int4_recovers_q4_0_style_weights_exactly():
    """Q4_0 blocks: scale * (code - 8), the largest-magnitude value at code 0, codes not spanning 0..15."""
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(2, 13, (16, 4, 32), generator=gen)
    codes[..., 0] = 0
    scales = (torch.rand(16, 4, 1, generator=gen) * 0.01 + 1e-3) * torch.where(torch.rand(16, 4, 1) > 0.5, 1.0, -1.0)
    w = ((codes - 8) * scales).reshape(16, 128)
    torch.testing.assert_close(dequantize_int4(quantize_int4(w)), w, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_int4_recovers_gguf_4_bit_formats_exactly(qtype):
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    kind = GGMLQuantizationType[qtype]
    w = (np.random.default_rng(0).standard_normal((32, 256)) * 0.05).astype(np.float32)
    stored = torch.from_numpy(dequantize(quantize(w, kind), kind).reshape(w.shape))
    torch.testing.assert_close(dequantize_int4(quantize_int4(stored)), stored, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 33])  # both sides of small_batch_rows=4
def test_matches_float_linear_of_the_dequantized_weights(mode, rows):
    w, b = _weights(64, 96), torch.randn(64) * 0.1
    layer = QuantizedLinear(w, b, mode, small_batch_rows=4)
    assert layer.use_small_batch_kernel
    x = torch.randn(rows, 96)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 64)
    # Same quantized weights in float32: only bf16 rounding of activations/products separates the two.
    ref = F.linear(x, layer.dequantized_weight(), b)
    assert _relative_error(y, ref) < 1e-2
    # and close to the unquantized layer: int4 (groups of 32) is coarser than int8 (per row)
    assert _relative_error(y, F.linear(x, w, b)) < (0.02 if mode == "int8" else 0.12)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_small_batch_kernel_and_dense_path_agree(mode):
    layer = QuantizedLinear(_weights(128, 64, seed=3), None, mode, small_batch_rows=4)
    x = torch.randn(6, 64).bfloat16()
    dense = layer(x)  # 6 rows > small_batch_rows: the prepacked bf16 GEMM
    rows = torch.cat([layer(x[i : i + 2]) for i in range(0, 6, 2)])  # 2 rows: the low-bit kernel
    assert dense.dtype == torch.bfloat16
    assert _relative_error(rows, dense.float()) < 1e-2


def test_keeps_leading_dimensions_and_input_dtype():
    layer = QuantizedLinear(_weights(32, 64), None, "int8")
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, layer(x.reshape(6, 64)).reshape(2, 3, 32))


def test_shapes_the_low_bit_kernels_cannot_take_use_the_dense_path():
    # int8: the kernel needs in_features % 16 == 0 (torch silently miscomputes otherwise); int4: out_features % 16.
    for mode, (n, k) in (("int8", (24, 40)), ("int4", (24, 64))):
        w = _weights(n, k)
        layer = QuantizedLinear(w, None, mode)
        assert not layer.use_small_batch_kernel
        x = torch.randn(1, k)
        assert _relative_error(layer(x), F.linear(x, layer.dequantized_weight())) < 1e-2
    with pytest.raises(ValueError, match="divisible by 32"):
        QuantizedLinear(_weights(32, 48), None, "int4")
    with pytest.raises(ValueError, match="int8 or int4"):
        QuantizedLinear(_weights(32, 64), None, "int2")


def test_works_without_onednn_prepacking(monkeypatch):
    monkeypatch.setattr(ql, "_mkldnn_bf16_available", lambda: False)
    w = _weights(32, 64)
    layer = QuantizedLinear(w, None, "int8")
    assert not layer.prepacked
    x = torch.randn(8, 64)
    assert _relative_error(layer(x), F.linear(x, layer.dequantized_weight())) < 1e-2


def test_quantize_linears_replaces_every_linear_except_skipped():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
        assert quantize_linears_(model, "int8", skip=("2.1",)) == 2
        assert isinstance(model[0], QuantizedLinear) and isinstance(model[2][0], QuantizedLinear)
        assert isinstance(model[2][1], nn.Linear)
        assert _relative_error(model(x), ref) < 0.03
