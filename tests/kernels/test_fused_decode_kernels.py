"""Each fused decode kernel vs a float64 PyTorch reference, on fresh random inputs with poisoned outputs.

Runs on CUDA when present. Without CUDA it runs only under TRITON_INTERPRET=1, which
test_fused_decode_interpreted.py arranges in a subprocess (fp32/fp16 there: the interpreter has no bf16 tl.dot).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from tokenmill.kernels.triton.fused_config import GemvConfig, check_gemv_config, choose_gemv_config  # noqa: E402
from tokenmill.kernels.triton.fused_decode import (  # noqa: E402
    gate_up_silu,
    linear_residual,
    lm_head,
    qkv_rope_cache,
    rmsnorm,
)
from tokenmill.layers.rotary import RotaryEmbedding  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
# Relative error ||out - ref|| / ||ref|| against float64 math on the same (rounded) inputs.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
EPS = 1e-5

_CONFIGS = [  # (id, rows, forced config or None for the heuristic): both paths, split-K and batch tiling
    ("m1-heuristic", 1, None),
    ("m5-heuristic", 5, None),
    ("m3-cudacore-bm4", 3, GemvConfig(8, 16, 4, 1, False, 4, 1)),
    ("m5-dot-split2", 5, GemvConfig(16, 16, 16, 2, True, 4, 2)),
    ("m20-dot-split4-2mtiles", 20, GemvConfig(16, 16, 16, 4, True, 4, 3)),
    ("m1-cudacore-split2", 1, GemvConfig(8, 16, 1, 2, False, 4, 1)),
]


def _cases() -> list:
    """(rows, config, dtype, flag): every config in bf16 and fp32 on CUDA (fp16 for two), each config once in the
    slow interpreter with fp32 and fp16 alternating. `flag` alternates the op's option (bias, norm) so both values
    are covered without doubling the compile count."""
    combos = []
    for i, (name, rows, cfg) in enumerate(_CONFIGS):
        if ON_CUDA:
            dtypes = [torch.bfloat16, torch.float32] + ([torch.float16] if i < 2 else [])
        else:
            dtypes = [(torch.float32, torch.float16)[i % 2]]
        combos += [(name, rows, cfg, dt, (i + j) % 2 == 1) for j, dt in enumerate(dtypes)]
    return [pytest.param(rows, cfg, dt, flag, id=f"{name}-{str(dt).removeprefix('torch.')}-{'on' if flag else 'off'}")
            for name, rows, cfg, dt, flag in combos]


CASES = _cases()
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or poisoned elements)"
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def randn(*shape, dtype, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


def ref_rmsnorm_scaled(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * weight.double()


def fit(config, n, k, pair_half=0):
    """Skips a forced config that this shape cannot use."""
    if config is None:
        return None
    try:
        check_gemv_config(config, n, k, pair_half)
    except ValueError as e:
        pytest.skip(str(e))
    return config


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("rows,config,dtype,bias", CASES)
def test_qkv_rope_cache(rows, config, dtype, bias, gen):
    hidden, num_q, num_kv, head_dim, block_size, num_blocks = 64, 4, 2, 16, 4, 12
    n = (num_q + 2 * num_kv) * head_dim
    config = fit(config, n, hidden, head_dim // 2)
    x = randn(rows, hidden, dtype=dtype, gen=gen)
    norm_w = randn(hidden, dtype=dtype, scale=0.1, gen=gen) + 1
    w = randn(n, hidden, dtype=dtype, scale=hidden**-0.5, gen=gen)
    b = randn(n, dtype=dtype, scale=0.5, gen=gen) if bias else None
    rotary = RotaryEmbedding(head_dim, 256, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                             device=DEVICE)
    positions = torch.randint(0, 256, (rows,), generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:rows].to(DEVICE)
    if rows > 2:
        slots[1] = -1  # a padding row: its K/V must not be written
    cache = torch.full((2, num_blocks, block_size, num_kv, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    q_out = torch.full((rows, num_q, head_dim), float("nan"), dtype=dtype, device=DEVICE)

    q = qkv_rope_cache(x, norm_w, EPS, w, b, positions, rotary.cos_cache, rotary.sin_cache, slots, cache, num_q,
                       q_out=q_out, config=config)

    qkv = ref_rmsnorm_scaled(x, norm_w) @ w.double().T + (b.double() if bias else 0)
    q_ref, k_ref, v_ref = qkv.split([num_q * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
    cos = rotary.cos_cache[positions].double()[:, None, :]
    sin = rotary.sin_cache[positions].double()[:, None, :]

    def rope(t, heads):
        t1, t2 = t.view(rows, heads, head_dim).chunk(2, dim=-1)
        return torch.cat((t1 * cos - t2 * sin, t2 * cos + t1 * sin), dim=-1)

    tol = TOLERANCE[dtype]
    assert q.data_ptr() == q_out.data_ptr()
    assert rel_err(q, rope(q_ref, num_q)) < tol
    flat_k = cache[0].view(-1, num_kv, head_dim)
    flat_v = cache[1].view(-1, num_kv, head_dim)
    written = slots >= 0
    assert rel_err(flat_k[slots[written]], rope(k_ref, num_kv)[written]) < tol
    assert rel_err(flat_v[slots[written]], v_ref.view(rows, num_kv, head_dim)[written]) < tol
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    untouched[slots[written]] = False
    assert torch.isnan(flat_k[untouched]).all() and torch.isnan(flat_v[untouched]).all(), "wrote outside its slots"


@pytest.mark.parametrize("rows,config,dtype,_", CASES)
def test_linear_residual_in_place_and_counters_reset(rows, config, dtype, _, gen):
    k, n = 128, 96
    config = fit(config, n, k)
    x = randn(rows, k, dtype=dtype, gen=gen)
    w = randn(n, k, dtype=dtype, scale=k**-0.5, gen=gen)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    for _ in range(2):  # the second call checks that split-K left its counters at zero
        residual = randn(rows, n, dtype=dtype, gen=gen)
        ref = residual.double() + x.double() @ w.double().T
        out = linear_residual(x, w, residual, config=config, counters=counters)
        assert out.data_ptr() == residual.data_ptr()
        assert rel_err(out, ref) < TOLERANCE[dtype]
        assert int(counters.abs().sum()) == 0
    poisoned = torch.full((rows, n), float("nan"), dtype=dtype, device=DEVICE)
    residual = randn(rows, n, dtype=dtype, gen=gen)
    out = linear_residual(x, w, residual, out=poisoned, config=config)
    assert rel_err(out, residual.double() + x.double() @ w.double().T) < TOLERANCE[dtype]


@pytest.mark.parametrize("rows,config,dtype,_", CASES)
def test_gate_up_silu(rows, config, dtype, _, gen):
    hidden, inter = 64, 96
    config = fit(config, 2 * inter, hidden, inter)
    x = randn(rows, hidden, dtype=dtype, scale=3.0, gen=gen)
    norm_w = randn(hidden, dtype=dtype, scale=0.1, gen=gen) + 1
    w = randn(2 * inter, hidden, dtype=dtype, scale=2 * hidden**-0.5, gen=gen)
    out = torch.full((rows, inter), float("nan"), dtype=dtype, device=DEVICE)
    gate_up_silu(x, norm_w, EPS, w, out=out, config=config)
    gate, up = (ref_rmsnorm_scaled(x, norm_w) @ w.double().T).split(inter, dim=-1)
    assert rel_err(out, torch.nn.functional.silu(gate) * up) < TOLERANCE[dtype]


@pytest.mark.parametrize("rows,config,dtype,norm", CASES)
def test_lm_head_logits_and_argmax(rows, config, dtype, norm, gen):
    hidden, vocab = 64, 72  # vocab not a multiple of the tile: the last tile is masked
    config = fit(config, vocab, hidden)
    x = randn(rows, hidden, dtype=dtype, gen=gen)
    w = randn(vocab, hidden, dtype=dtype, scale=hidden**-0.5, gen=gen)
    norm_w = randn(hidden, dtype=dtype, scale=0.1, gen=gen) + 1 if norm else None
    poisoned = torch.full((rows, vocab), float("nan"), dtype=torch.float32, device=DEVICE)
    out = lm_head(x, w, norm_weight=norm_w, eps=EPS, argmax=True, logits_out=poisoned, config=config)
    ref = (ref_rmsnorm_scaled(x, norm_w) if norm else x.double()) @ w.double().T
    assert out.logits.dtype == torch.float32
    assert rel_err(out.logits, ref) < TOLERANCE[dtype]
    assert torch.equal(out.tokens, out.logits.argmax(-1)), "fused argmax differs from argmax of its own logits"
    only_tokens = lm_head(x, w, norm_weight=norm_w, eps=EPS, write_logits=False, argmax=True, config=config)
    assert only_tokens.logits is None and torch.equal(only_tokens.tokens, out.tokens)


def test_argmax_ties_pick_the_lowest_row():
    hidden, vocab = 32, 100
    x = torch.ones(2, hidden, device=DEVICE)
    w = torch.zeros(vocab, hidden, device=DEVICE)
    w[[7, 60, 99]] = 1.0  # three rows tie for the maximum, in different tiles
    out = lm_head(x, w, argmax=True, config=GemvConfig(16, 16, 16, 1, True, 4, 1))
    assert out.tokens.tolist() == [7, 7]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_rmsnorm_matches_hf_rounding(dtype, gen):
    from tokenmill.layers.norm import RMSNorm

    x = randn(5, 96, dtype=dtype, scale=2.0, gen=gen)
    norm = RMSNorm(96, EPS, dtype=dtype, device=DEVICE)
    with torch.no_grad():
        norm.weight.copy_(randn(96, dtype=dtype, scale=0.2, gen=gen) + 1)
    out = rmsnorm(x, norm.weight, EPS, out=torch.full_like(x, float("nan")))
    assert rel_err(out, norm(x)) < TOLERANCE[dtype] / 4


def test_heuristic_configs_are_valid_for_llama_shapes():
    shapes = dict(qkv=(3072, 2048, 32), o=(2048, 2048, 0), gate_up=(16384, 2048, 8192), down=(2048, 8192, 0),
                  lm_head=(128256, 2048, 0))
    for rows in (1, 2, 3, 4, 8, 16, 24, 32, 48, 64, 128, 256):
        for n, k, pair_half in shapes.values():
            cfg = choose_gemv_config(rows, n, k, sm_count=132, pair_half=pair_half)
            check_gemv_config(cfg, n, k, pair_half)
            assert cfg.use_dot == (rows > 1)
