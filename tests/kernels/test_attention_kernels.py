"""Triton attention kernels vs a plain-torch reference, on fresh random paged batches.

Runs on CUDA when present. Without CUDA it runs only under TRITON_INTERPRET=1, which
test_kernels_interpreted.py arranges in a subprocess so other tests keep a normally imported triton.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from tokenmill.kernels import get_attention_backend  # noqa: E402
from tokenmill.kernels.triton import (  # noqa: E402
    choose_num_splits,
    paged_attention,
    paged_decode,
    paged_prefill,
    reshape_and_cache,
)
from tokenmill.kernels.triton.prefill import (  # noqa: E402
    paged_prefill_planned,
    plan_capacity,
    plan_prefill,
    prefill_block_m,
)
from tokenmill.layers.attention_metadata import AttentionMetadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def attention_case(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    # Triton's CPU interpreter multiplies bf16 tl.dot operands as their raw uint16 bits: bf16 runs on CUDA only.
    skip_bf16 = pytest.mark.skipif(
        dtype == torch.bfloat16 and DEVICE.type != "cuda", reason="the Triton interpreter has no bf16 tl.dot"
    )
    name = f"{num_q_heads}q-{num_kv_heads}kv-d{head_dim}-{str(dtype).removeprefix('torch.')}"
    return pytest.param(num_q_heads, num_kv_heads, head_dim, dtype, marks=skip_bf16, id=name)
TOLERANCE = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def reference_attention(q, k, v, kv_cache_layer, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Writes k/v at the slots, then causal attention per sequence over its gathered context, in fp32."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache_layer.shape
    kv_cache_layer[0].view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = k
    kv_cache_layer[1].view(-1, num_kv_heads, head_dim)[meta.slot_mapping] = v
    group = q.shape[1] // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        blocks = meta.block_tables[i, : math.ceil(seq_len / block_size)].long()
        keys = kv_cache_layer[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        values = kv_cache_layer[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys) * scale
        query_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out


@dataclass
class PagedBatch:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache_layer: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_batch(
    query_lens: list[int],
    seq_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    spare_blocks: int = 5,
    poison: float | None = None,
    table_pad: int = 0,
    seed: int = 0,
) -> PagedBatch:
    """Random batch whose sequences own shuffled, non-contiguous blocks.

    Past context (positions before this step's tokens) holds random K/V; every other cache slot holds `poison`
    when given (random otherwise), and block tables are padded with `table_pad`.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in blocks_needed:
        tables.append(order[used : used + n])
        used += n
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if poison is None:
        cache = torch.randn(shape, generator=gen).to(dtype)
    else:
        cache = torch.full(shape, poison, dtype=dtype)
        flat = cache.view(2, -1, num_kv_heads, head_dim)
        for table, seq_len, query_len in zip(tables, seq_lens, query_lens):
            for pos in range(seq_len - query_len):
                slot = table[pos // block_size] * block_size + pos % block_size
                flat[:, slot] = torch.randn(2, num_kv_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=DEVICE)
    width = meta.block_tables.shape[1]
    meta.block_tables = torch.tensor(
        [t + [table_pad] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE
    )
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype)
    return PagedBatch(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cache.to(DEVICE), meta, scale=1.0 / math.sqrt(head_dim)
    )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all(), "kernel output has NaN/inf"
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= TOLERANCE[dtype], f"max abs error {err} > {TOLERANCE[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_writes_only_mapped_slots(dtype):
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = 7, 3, 64, 16, 6
    gen = torch.Generator().manual_seed(1)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    # k as a strided view of a wider projection output, as a fused QKV layer would hand it over.
    kv = torch.randn(num_tokens, 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k, v = kv[:, :num_kv_heads], kv[:, num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[3] = -1  # padding token: must be skipped
    slots = slots.to(DEVICE)
    expected = cache.clone()
    keep = slots >= 0
    expected[0].view(-1, num_kv_heads, head_dim)[slots[keep]] = k[keep]
    expected[1].view(-1, num_kv_heads, head_dim)[slots[keep]] = v[keep]
    reshape_and_cache(k, v, cache, slots)
    assert torch.equal(cache, expected)


DECODE_CASES = [
    attention_case(4, 4, 64, torch.float32),
    attention_case(6, 2, 64, torch.float16),
    attention_case(8, 2, 128, torch.bfloat16),
    attention_case(8, 2, 64, torch.float32),
    attention_case(3, 1, 128, torch.float16),
    attention_case(32, 8, 64, torch.bfloat16),
]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,dtype", DECODE_CASES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(num_q_heads, num_kv_heads, head_dim, dtype, num_splits):
    seq_lens = [1, 17, 64, 150]
    batch = make_batch(
        [1] * len(seq_lens), seq_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, dtype=dtype, seed=num_q_heads * head_dim,
    )
    meta = batch.meta
    expected = reference_attention(batch.q, batch.k, batch.v, batch.kv_cache_layer, meta, batch.scale)
    # reference_attention wrote this step's K/V into the cache; the decode kernel reads them from there.
    out = paged_decode(batch.q, batch.kv_cache_layer, meta.block_tables, meta.seq_lens, batch.scale,
                       num_splits=num_splits)
    assert_close(out, expected, dtype)


PREFILL_CASES = [
    attention_case(4, 4, 64, torch.float32),
    attention_case(6, 2, 64, torch.bfloat16),
    attention_case(8, 2, 128, torch.float16),
    attention_case(3, 1, 64, torch.float16),
    attention_case(8, 2, 128, torch.bfloat16),
]


@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,dtype", PREFILL_CASES)
def test_mixed_batch_matches_reference(num_q_heads, num_kv_heads, head_dim, dtype):
    # fresh prefill, decode, chunk after a cached prefix, prefill past a block boundary, single token
    query_lens = [5, 1, 7, 33, 1]
    seq_lens = [5, 20, 40, 33, 1]
    batch = make_batch(query_lens, seq_lens, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, dtype=dtype, seed=7)
    ref_cache = batch.kv_cache_layer.clone()
    expected = reference_attention(batch.q, batch.k, batch.v, ref_cache, batch.meta, batch.scale)
    out = paged_attention(batch.q, batch.k, batch.v, batch.kv_cache_layer, batch.meta, batch.scale)
    assert torch.equal(batch.kv_cache_layer, ref_cache)
    assert_close(out, expected, dtype)


def test_prefill_with_small_tiles_covers_many_query_and_key_tiles():
    query_lens, seq_lens = [40, 9], [70, 9]
    batch = make_batch(query_lens, seq_lens, num_q_heads=4, num_kv_heads=1, head_dim=64,
                       dtype=torch.float32, block_size=8, seed=3)
    meta = batch.meta
    expected = reference_attention(batch.q, batch.k, batch.v, batch.kv_cache_layer, meta, batch.scale)
    out = paged_prefill(batch.q, batch.kv_cache_layer, meta.block_tables, meta.seq_lens,
                        meta.query_start_loc, meta.max_query_len, batch.scale, block_m=16, block_n=16)
    assert_close(out, expected, torch.float32)


@pytest.mark.parametrize("query_lens,seq_lens", [([5, 1, 7, 33, 1], [5, 20, 40, 33, 1]), ([40, 9], [70, 9]),
                                                  ([1, 1, 1], [3, 17, 64])])
def test_planned_prefill_equals_the_unplanned_launch(query_lens, seq_lens):
    """The planned launch (the form a CUDA graph captures) reads its lengths, tables and plan from buffers sized
    for more sequences and tokens than the step has: it gives the unplanned launch's output bit for bit, and its
    padding items write nothing (the rows past the step's tokens keep their NaN)."""
    batch = make_batch(query_lens, seq_lens, num_q_heads=4, num_kv_heads=1, head_dim=64, dtype=torch.float32,
                       block_size=8, seed=5)
    meta = batch.meta
    block_m = prefill_block_m(meta.max_query_len, 4, 64)
    expected = paged_prefill(batch.q, batch.kv_cache_layer, meta.block_tables, meta.seq_lens,
                             meta.query_start_loc, meta.max_query_len, batch.scale, block_m=block_m)

    tokens, max_seqs, spare = batch.q.shape[0], 8, 5  # buffers for 8 sequences and `spare` more tokens
    n = len(query_lens)
    qsl = torch.full((max_seqs + 1,), tokens, dtype=torch.int32, device=DEVICE)
    qsl[: n + 1] = meta.query_start_loc
    lens = torch.zeros(max_seqs, dtype=torch.int32, device=DEVICE)
    lens[:n] = meta.seq_lens
    tables = torch.full((max_seqs, meta.block_tables.shape[1] + 3), 10**6, dtype=torch.int32, device=DEVICE)
    tables[:n, : meta.block_tables.shape[1]] = meta.block_tables
    capacity = plan_capacity(tokens + spare, max_seqs, block_m // 4)
    plan = torch.tensor(plan_prefill(query_lens, seq_lens, block_m // 4, capacity), dtype=torch.int32,
                        device=DEVICE)
    q = torch.cat([batch.q, torch.randn(spare, 4, 64, device=DEVICE)])
    out = torch.full_like(q, float("nan"))
    paged_prefill_planned(q, batch.kv_cache_layer, tables, lens, qsl, plan, batch.scale, block_m, out=out)
    assert torch.equal(out[:tokens], expected)
    assert out[tokens:].isnan().all()


def test_planned_prefill_refuses_a_malformed_plan():
    batch = make_batch([3], [3], num_q_heads=4, num_kv_heads=1, head_dim=64, dtype=torch.float32, block_size=8)
    meta, out = batch.meta, torch.empty_like(batch.q)
    args = (batch.q, batch.kv_cache_layer, meta.block_tables, meta.seq_lens, meta.query_start_loc)
    for plan in (torch.tensor([0, 0], dtype=torch.int64, device=DEVICE),  # wrong dtype
                 torch.tensor([0, 0, -1], dtype=torch.int32, device=DEVICE)):  # not (seq, tile) pairs
        with pytest.raises(ValueError, match="plan must be int32"):
            paged_prefill_planned(*args, plan, batch.scale, 64, out=out)
    plan = torch.tensor([0, 0], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        paged_prefill_planned(*args, plan, batch.scale, 64, out=torch.empty(64, 4, 3, device=DEVICE)[:3, :, :1]
                              .expand(3, 4, 64))


def test_prefill_plan_orders_longest_items_first_and_pads():
    # sequence 0: 3 query tokens ending at position 10 (tiles of 2: keys 0..9 and 0..10); sequence 1: 1 token at 4
    plan = plan_prefill([3, 1], [11, 5], block_q=2, capacity=plan_capacity(4, 2, 2))
    assert plan == [0, 1, 0, 0, 1, 0, -1, 0]
    with pytest.raises(ValueError, match="capacity"):
        plan_prefill([3, 1], [11, 5], block_q=2, capacity=2)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_never_reads_past_seq_len(poison):
    """Unused slots (tails of partly filled blocks, spare blocks) hold NaN/inf and block tables are padded with
    an id far past the cache: the output must match the reference and stay finite."""
    dtype = torch.float16
    common = dict(num_q_heads=8, num_kv_heads=2, head_dim=64, dtype=dtype, poison=poison, table_pad=10**6)
    decode = make_batch([1, 1, 1], [3, 70, 129], seed=11, spare_blocks=20, **common)
    expected = reference_attention(decode.q, decode.k, decode.v, decode.kv_cache_layer.clone(), decode.meta,
                                   decode.scale)
    for num_splits in (1, 4):
        cache = decode.kv_cache_layer.clone()
        reshape_and_cache(decode.k, decode.v, cache, decode.meta.slot_mapping)
        out = paged_decode(decode.q, cache, decode.meta.block_tables, decode.meta.seq_lens, decode.scale,
                           num_splits=num_splits)
        assert_close(out, expected, dtype)

    mixed = make_batch([6, 1, 18], [6, 30, 50], seed=12, **common)
    expected = reference_attention(mixed.q, mixed.k, mixed.v, mixed.kv_cache_layer.clone(), mixed.meta,
                                   mixed.scale)
    out = paged_attention(mixed.q, mixed.k, mixed.v, mixed.kv_cache_layer, mixed.meta, mixed.scale)
    assert_close(out, expected, dtype)


def test_decode_zero_length_padding_rows_give_zeros():
    batch = make_batch([1, 1], [9, 40], num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    seq_lens = torch.tensor([9, 0], dtype=torch.int32, device=DEVICE)  # second row: CUDA-graph padding
    for num_splits in (1, 2):
        out = paged_decode(batch.q, batch.kv_cache_layer, batch.meta.block_tables, seq_lens, batch.scale,
                           num_splits=num_splits)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.isfinite(out[0]).all()


def test_triton_backend_matches_reference_for_decode_and_prefill():
    backend = get_attention_backend("triton", DEVICE)
    assert backend.name == "triton"
    assert backend.supports_cuda_graphs == (DEVICE.type == "cuda")
    for query_lens, seq_lens in (([1, 1, 1], [5, 16, 33]), ([4, 1], [4, 23])):
        batch = make_batch(query_lens, seq_lens, num_q_heads=6, num_kv_heads=2, head_dim=64,
                           dtype=torch.float32, seed=len(seq_lens))
        ref_cache = batch.kv_cache_layer.clone()
        expected = reference_attention(batch.q, batch.k, batch.v, ref_cache, batch.meta, batch.scale)
        out = backend(batch.q, batch.k, batch.v, batch.kv_cache_layer, batch.meta, batch.scale)
        assert torch.equal(batch.kv_cache_layer, ref_cache)
        assert_close(out, expected, torch.float32)


def test_project_reference_agrees_with_test_reference():
    attention = pytest.importorskip("tokenmill.layers.attention")
    batch = make_batch([5, 1, 7], [5, 20, 40], num_q_heads=6, num_kv_heads=2, head_dim=64,
                       dtype=torch.float32, seed=5)
    ref_cache = batch.kv_cache_layer.clone()
    expected = reference_attention(batch.q, batch.k, batch.v, ref_cache, batch.meta, batch.scale)
    out = attention.paged_attention(batch.q, batch.k, batch.v, batch.kv_cache_layer, batch.meta, batch.scale)
    assert torch.equal(batch.kv_cache_layer, ref_cache)
    assert_close(out, expected, torch.float32)


def test_choose_num_splits_fills_small_batches_and_leaves_large_ones_alone():
    assert choose_num_splits(1, 8, 8192, sm_count=132) > 8
    assert choose_num_splits(1, 8, 128, sm_count=132) == 1  # too little context to share out
    assert choose_num_splits(128, 8, 8192, sm_count=132) == 1
    assert choose_num_splits(1, 1, 10**6, sm_count=132) <= 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_decode_path_replays_in_a_cuda_graph():
    backend = get_attention_backend("triton", DEVICE)
    batch = make_batch([1] * 4, [30, 200, 7, 513], num_q_heads=32, num_kv_heads=8, head_dim=64,
                       dtype=torch.bfloat16, spare_blocks=40)
    meta = batch.meta
    backend(batch.q, batch.k, batch.v, batch.kv_cache_layer, meta, batch.scale)  # compile outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        graph_out = backend(batch.q, batch.k, batch.v, batch.kv_cache_layer, meta, batch.scale)
    torch.cuda.current_stream().wait_stream(stream)
    # Next step: new tokens, every sequence one longer, written into the captured input buffers.
    new_lens = [31, 201, 8, 514]
    new_meta = AttentionMetadata.build([1] * 4, new_lens, [row.tolist() for row in meta.block_tables.cpu()],
                                       16, device=DEVICE)
    meta.slot_mapping.copy_(new_meta.slot_mapping)
    meta.seq_lens.copy_(new_meta.seq_lens)
    for t in (batch.q, batch.k, batch.v):
        t.copy_(torch.randn_like(t))
    ref_cache = batch.kv_cache_layer.clone()
    expected = reference_attention(batch.q, batch.k, batch.v, ref_cache, new_meta, batch.scale)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(batch.kv_cache_layer, ref_cache)
    assert_close(graph_out, expected, torch.bfloat16)
