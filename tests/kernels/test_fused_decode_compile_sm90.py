"""Compiles the fused decode kernels for Hopper (sm_90) without a GPU, at the Llama-3.2-1B shapes the heuristic
picks: catches lowering errors the CPU interpreter cannot, and checks the code shape that matters for speed
(16-byte weight loads, tensor-core MMAs on the batched path, no register spills, griddepcontrol with PDL)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel tests compile and run them for real"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="kernels are interpreted"),
]

from tokenmill.kernels.triton.fused_config import choose_gemv_config  # noqa: E402

BF16 = "*bf16"
FLOAT_SCALARS = {"eps"}
SM_COUNT = 132  # H100 SXM
HIDDEN, INTER, VOCAB, NUM_Q, NUM_KV, HEAD_DIM = 2048, 8192, 128256, 32, 8, 64


def compile_for_hopper(kernel, pointer_types: dict[str, str], constexprs: dict, num_warps: int,
                       num_stages: int) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    # What the launcher infers for real tensors and strides: 16-byte aligned pointers, strides divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in constexprs and n not in FLOAT_SCALARS and n != "M"}
    try:
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(names.index(n),): v for n, v in constexprs.items()}, attrs=attrs)
    except TypeError as e:
        pytest.skip(f"this triton's ASTSource has another signature: {e}")
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled.asm["ptx"]


def tile_constexprs(rows: int, n: int, k: int, pair_half: int = 0, use_gdc: bool = False,
                    folds_norm: bool = False) -> tuple[dict, object]:
    cfg = choose_gemv_config(rows, n, k, sm_count=SM_COUNT, pair_half=pair_half, folds_norm=folds_norm)
    return dict(BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
                USE_DOT=cfg.use_dot, DOT_PRECISION="tf32", USE_GDC=use_gdc), cfg


def ptxas_spill_bytes(ptx: str) -> int | None:
    """Spill stores ptxas reports for sm_90a, or None where this triton does not expose its ptxas."""
    import re
    import subprocess
    import tempfile

    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except (ImportError, AttributeError, RuntimeError):
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True,
                                text=True).stderr
    found = re.search(r"(\d+) bytes spill stores", report)
    return int(found.group(1)) if found else None


def check_ptx(ptx: str, cfg) -> None:
    assert ".local" not in ptx, "registers spill to local memory"
    assert ptxas_spill_bytes(ptx) in (0, None), "ptxas spills registers for this tile shape"
    if cfg.use_dot:
        assert "mma" in ptx, "the batched path does not use tensor cores"
        assert "cp.async" in ptx or "cp.async.bulk" in ptx, "weight loads are not software-pipelined"
    else:
        assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx, "weight loads are not 16-byte vectors"
        # The fp32 multiply-adds contract to FMAs (tokenmill.kernels.triton pins TRITON_DEFAULT_FP_FUSION, whose
        # default Triton 3.10 turns off): the numerics every result was measured with.
        assert "fma.rn.f32" in ptx, "fp32 multiply-adds are not fused"


GPU_PTRS = dict(partial_ptr="*fp32", partial_sumsq_ptr="*fp32", counter_ptr="*i32")


@pytest.mark.parametrize("rows", [1, 8, 32, 64])
def test_qkv_rope_cache_compiles_for_sm90(rows):
    from tokenmill.kernels.triton.fused_decode import _qkv_rope_cache_kernel

    n = (NUM_Q + 2 * NUM_KV) * HEAD_DIM
    tiles, cfg = tile_constexprs(rows, n, HIDDEN, HEAD_DIM // 2, use_gdc=rows == 1, folds_norm=True)
    ptx = compile_for_hopper(
        _qkv_rope_cache_kernel,
        dict(x_ptr=BF16, w_ptr=BF16, norm_w_ptr=BF16, bias_ptr=BF16, q_ptr=BF16, positions_ptr="*i64",
             cos_ptr="*fp32", sin_ptr="*fp32", slot_ptr="*i64", k_cache_ptr=BF16, v_cache_ptr=BF16, **GPU_PTRS),
        dict(K=HIDDEN, NUM_Q_HEADS=NUM_Q, NUM_KV_HEADS=NUM_KV, HEAD_DIM=HEAD_DIM, CACHE_BLOCK_SIZE=16,
             HAS_BIAS=False, **tiles),
        cfg.num_warps, cfg.num_stages,
    )
    check_ptx(ptx, cfg)
    if rows == 1:
        assert "griddepcontrol.wait" in ptx, "USE_GDC did not emit griddepcontrol.wait"


@pytest.mark.parametrize("rows", [1, 8, 32, 64])
@pytest.mark.parametrize("op", ["o", "down"])
def test_linear_residual_compiles_for_sm90(rows, op):
    from tokenmill.kernels.triton.fused_decode import _linear_residual_kernel

    k = HIDDEN if op == "o" else INTER
    tiles, cfg = tile_constexprs(rows, HIDDEN, k)
    ptx = compile_for_hopper(
        _linear_residual_kernel,
        dict(x_ptr=BF16, w_ptr=BF16, residual_ptr=BF16, out_ptr=BF16, partial_ptr="*fp32", counter_ptr="*i32"),
        dict(K=k, **tiles), cfg.num_warps, cfg.num_stages,
    )
    check_ptx(ptx, cfg)
    if cfg.split_k > 1:
        atomics = [line for line in ptx.splitlines() if "atom." in line]
        assert atomics and all("acq_rel" in a and ".gpu" in a for a in atomics), "split-K counter is not acq_rel.gpu"


@pytest.mark.parametrize("rows", [1, 8, 32, 64])
def test_gate_up_silu_compiles_for_sm90(rows):
    from tokenmill.kernels.triton.fused_decode import _gate_up_silu_kernel

    tiles, cfg = tile_constexprs(rows, 2 * INTER, HIDDEN, INTER, folds_norm=True)
    ptx = compile_for_hopper(
        _gate_up_silu_kernel, dict(x_ptr=BF16, w_ptr=BF16, norm_w_ptr=BF16, out_ptr=BF16, **GPU_PTRS),
        dict(K=HIDDEN, INTERMEDIATE=INTER, **tiles), cfg.num_warps, cfg.num_stages,
    )
    check_ptx(ptx, cfg)


@pytest.mark.parametrize("rows", [1, 16, 64])
def test_lm_head_and_argmax_compile_for_sm90(rows):
    from tokenmill.kernels.triton.fused_decode import _argmax_reduce_kernel, _lm_head_kernel, _rmsnorm_kernel

    tiles, cfg = tile_constexprs(rows, VOCAB, HIDDEN, folds_norm=True)
    ptx = compile_for_hopper(
        _lm_head_kernel,
        dict(x_ptr=BF16, w_ptr=BF16, norm_w_ptr=BF16, logits_ptr="*fp32", tile_max_ptr="*fp32",
             tile_arg_ptr="*i32", **GPU_PTRS),
        dict(K=HIDDEN, NORM=True, WRITE_LOGITS=True, ARGMAX=True, **tiles), cfg.num_warps, cfg.num_stages,
    )
    check_ptx(ptx, cfg)
    compile_for_hopper(_argmax_reduce_kernel, dict(tile_max_ptr="*fp32", tile_arg_ptr="*i32", tokens_ptr="*i64"),
                       dict(NUM_TILES=2004, BLOCK_T=1024), 4, 1)
    compile_for_hopper(_rmsnorm_kernel, dict(x_ptr=BF16, w_ptr=BF16, out_ptr=BF16),
                       dict(N=HIDDEN, BLOCK=HIDDEN, USE_GDC=False), 4, 1)
