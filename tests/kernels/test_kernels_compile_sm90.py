"""Compiles the Triton kernels for Hopper (sm_90) without a GPU: catches lowering errors the CPU interpreter
cannot, and checks the code shape that matters for speed (16-byte loads, async copies, no register spills)."""

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

SCALARS = {"qk_scale": "fp32", "num_splits": "i32"}


def compile_for_hopper(kernel, pointer_types: dict[str, str], constexprs: dict, num_warps: int = 4) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, SCALARS.get(n, "i32")) for n in names}
    # What the launcher infers for real tensors and strides: 16-byte aligned pointers, strides divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in constexprs and n not in SCALARS}
    try:
        source = ASTSource(
            fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constexprs.items()},
            attrs=attrs,
        )
    except TypeError as e:
        pytest.skip(f"this triton's ASTSource has another signature: {e}")
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=2))
    return compiled.asm["ptx"]


def test_decode_and_merge_compile_for_sm90():
    from tokenmill.kernels.triton.decode import _merge_splits_kernel, _paged_decode_kernel

    bf16 = "*bf16"
    ptx = compile_for_hopper(
        _paged_decode_kernel,
        dict(out_ptr="*fp32", lse_ptr="*fp32", q_ptr=bf16, k_cache_ptr=bf16, v_cache_ptr=bf16,
             block_tables_ptr="*i32", seq_lens_ptr="*i32"),
        dict(IS_SPLIT=True, GROUP=4, BLOCK_G=16, HEAD_DIM=64, BLOCK_D=64, BLOCK_SIZE=16, BLOCK_N=64,
             DOT_PRECISION="tf32"),
    )
    assert "ld.global.v4" in ptx, "K/V loads are not 16-byte vectors"
    assert "cp.async" in ptx, "K/V loads are not software-pipelined"
    assert "mma" in ptx
    assert ".local" not in ptx, "registers spill to local memory"
    compile_for_hopper(_merge_splits_kernel, dict(out_ptr=bf16, partial_ptr="*fp32", lse_ptr="*fp32"),
                       dict(BLOCK_S=32, HEAD_DIM=64, BLOCK_D=64), num_warps=1)


def test_prefill_and_cache_write_compile_for_sm90():
    from tokenmill.kernels.triton.kv_write import _reshape_and_cache_kernel
    from tokenmill.kernels.triton.prefill import _paged_prefill_kernel

    bf16 = "*bf16"
    for planned in (False, True):  # the step-shaped grid, and the plan-driven one CUDA graphs capture
        ptx = compile_for_hopper(
            _paged_prefill_kernel,
            dict(out_ptr=bf16, plan_ptr="*i32", q_ptr=bf16, k_cache_ptr=bf16, v_cache_ptr=bf16,
                 block_tables_ptr="*i32", seq_lens_ptr="*i32", query_start_loc_ptr="*i32"),
            dict(GROUP=4, HEAD_DIM=64, BLOCK_D=64, BLOCK_SIZE=16, BLOCK_Q=32, BLOCK_M=128, BLOCK_N=64,
                 DOT_PRECISION="tf32", PLANNED=planned),
            num_warps=8,
        )
        assert "wgmma" in ptx, "prefill does not use Hopper's warpgroup MMA"
        assert ".local" not in ptx, "registers spill to local memory"
    compile_for_hopper(_reshape_and_cache_kernel,
                       dict(k_ptr=bf16, v_ptr=bf16, k_cache_ptr=bf16, v_cache_ptr=bf16, slot_mapping_ptr="*i64"),
                       dict(NUM_KV_HEADS=8, HEAD_DIM=64, BLOCK_H=8, BLOCK_D=64, BLOCK_SIZE=16))
