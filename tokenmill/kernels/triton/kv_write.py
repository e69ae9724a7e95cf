"""Writes this step's new K/V into the paged KV cache at their flat slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # A negative slot marks a padding token (e.g. a CUDA-graph batch padded to its captured size).
    block_id = slot // BLOCK_SIZE
    block_offset = slot % BLOCK_SIZE

    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM) & (tl.zeros_like(dims)[None, :] + slot >= 0)
    token64 = token.to(tl.int64)
    k = tl.load(k_ptr + token64 * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + token64 * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    cache_offsets = (
        block_id * stride_cache_block
        + block_offset * stride_cache_offset
        + heads[:, None] * stride_cache_head
        + dims[None, :]
    )
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache_layer: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Stores k[t], v[t] ([T, Hkv, D]) at flat slot slot_mapping[t] of kv_cache_layer [2, blocks, block_size, Hkv, D].

    Slots below zero are skipped. No host synchronisation: safe inside CUDA-graph capture.
    """
    check_kv_cache_layer(kv_cache_layer)
    _, _, block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    if k.shape != v.shape or k.dim() != 3 or tuple(k.shape[1:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"k and v must both be [num_tokens, {num_kv_heads}, {head_dim}] to match the cache, "
            f"got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"slot_mapping must be [num_tokens={k.shape[0]}], got {tuple(slot_mapping.shape)}")
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    k_cache, v_cache = kv_cache_layer[0], kv_cache_layer[1]
    _reshape_and_cache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )


def check_kv_cache_layer(kv_cache_layer: torch.Tensor) -> None:
    """Raises ValueError unless the tensor is one layer of the paged cache with unit-stride head_dim."""
    if kv_cache_layer.dim() != 5 or kv_cache_layer.shape[0] != 2:
        raise ValueError(
            "kv_cache_layer must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
            f"got shape {tuple(kv_cache_layer.shape)}"
        )
    if kv_cache_layer.stride(-1) != 1:
        raise ValueError("kv_cache_layer must be contiguous along head_dim")
