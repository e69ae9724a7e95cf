"""Reference layers on their own: paged attention vs dense attention, rotary vs transformers, RMSNorm numerics."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.layers.attention import paged_attention
from tokenmill.layers.attention_metadata import AttentionMetadata
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding, apply_rotary, compute_inv_freq, rotate


def _dense_causal_attention(q, k, v, scale):
    """q [Q, Hq, D] at the last Q positions of k/v [S, Hkv, D]; plain softmax, GQA by repeating kv heads."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    q_len, s_len = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale
    q_pos = torch.arange(s_len - q_len, s_len)[:, None]
    scores = scores.masked_fill(torch.arange(s_len)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqs,shd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize(
    "query_lens, seq_lens",
    [
        ([1, 1, 1], [7, 1, 13]),
        ([1, 1], [9, 9]),  # decode lengths in lockstep: no mask
        ([5, 1, 9, 1], [5, 6, 20, 3]),
        ([4], [10]),
        ([6, 3], [6, 11]),
        ([4, 4, 1, 4], [4, 4, 9, 4]),  # identical prompts: one batched SDPA call
        ([3, 3, 3], [8, 8, 3]),  # identical chunks after a cached prefix, and one fresh prompt
    ],
)
def test_paged_attention_matches_dense(query_lens, seq_lens):
    gen = torch.Generator().manual_seed(0)
    hq, hkv, d, block_size = 6, 2, 8, 4
    num_blocks = sum(math.ceil(s / block_size) for s in seq_lens) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for s in seq_lens:
        n = math.ceil(s / block_size)
        tables.append(perm[:n])
        perm = perm[n:]
    kv_cache = torch.full((2, num_blocks, block_size, hkv, d), float("nan"))
    full_k = [torch.randn(s, hkv, d, generator=gen) for s in seq_lens]
    full_v = [torch.randn(s, hkv, d, generator=gen) for s in seq_lens]
    # The context before this step's queries is already in the cache.
    for table, k, v, s, q_len in zip(tables, full_k, full_v, seq_lens, query_lens):
        for pos in range(s - q_len):
            kv_cache[0, table[pos // block_size], pos % block_size] = k[pos]
            kv_cache[1, table[pos // block_size], pos % block_size] = v[pos]
    q = torch.randn(sum(query_lens), hq, d, generator=gen)
    k_new = torch.cat([k[s - ql :] for k, s, ql in zip(full_k, seq_lens, query_lens)])
    v_new = torch.cat([v[s - ql :] for v, s, ql in zip(full_v, seq_lens, query_lens)])
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, block_size)
    out = paged_attention(q, k_new, v_new, kv_cache, meta, scale=0.3)
    assert out.shape == q.shape
    start = 0
    for k, v, ql in zip(full_k, full_v, query_lens):
        expected = _dense_causal_attention(q[start : start + ql], k, v, 0.3)
        torch.testing.assert_close(out[start : start + ql], expected, atol=1e-5, rtol=1e-5)
        start += ql
    # and this step's K/V landed in the cache at slot_mapping
    flat_k = kv_cache[0].flatten(0, 1)
    torch.testing.assert_close(flat_k[meta.slot_mapping], k_new)


def test_decode_attention_is_the_same_with_one_or_more_threads():
    """With several intra-op threads, decode attention folds the GQA query heads into rows of their KV head."""
    gen = torch.Generator().manual_seed(5)
    cache = torch.randn(2, 20, 4, 2, 8, generator=gen)
    q, k, v = (torch.randn(3, h, 8, generator=gen) for h in (6, 2, 2))
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            meta = AttentionMetadata.build([1, 1, 1], [7, 3, 12], [[1, 2], [3], [4, 5, 6]], block_size=4)
            outs.append(paged_attention(q, k, v, cache.clone(), meta, scale=0.3))
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)


def test_paged_attention_rejects_a_misshaped_cache():
    meta = AttentionMetadata.build([1], [1], [[0]], block_size=4)
    q = torch.zeros(1, 2, 8)
    k = torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="kv_cache_layer"):
        paged_attention(q, k, k, torch.zeros(1, 4, 2, 8), meta, 1.0)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default"},
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_inv_freq_matches_transformers(rope_parameters):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        rope_theta=500000.0,
        max_position_embeddings=1024,
        rope_scaling=rope_parameters if rope_parameters["rope_type"] != "default" else None,
    )
    rope_type = rope_parameters["rope_type"]
    if rope_type == "default":
        expected = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    scaling = None if rope_type == "default" else rope_parameters
    torch.testing.assert_close(compute_inv_freq(64, 500000.0, scaling), expected, atol=0, rtol=0)


def test_freq_factors_divide_inv_freq():
    base = compute_inv_freq(16, 10000.0)
    factors = [1.0, 2.0, 4.0, 8.0, 1.0, 1.0, 3.0, 5.0]
    scaled = compute_inv_freq(16, 10000.0, {"rope_type": "freq_factors", "freq_factors": factors})
    torch.testing.assert_close(scaled, base / torch.tensor(factors))


def test_unknown_rope_type_is_a_clear_error():
    with pytest.raises(ValueError, match="yarn"):
        compute_inv_freq(16, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_rotary_matches_rotate_half_formula():
    rotary = RotaryEmbedding(head_dim=8, max_positions=32, theta=100.0)
    x = torch.randn(5, 3, 8)
    positions = torch.tensor([0, 3, 31, 7, 7])
    cos, sin = rotary.cos_sin(positions, torch.float32)
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    rotate_half = torch.cat([-x[..., 4:], x[..., :4]], -1)
    torch.testing.assert_close(apply_rotary(x, cos, sin), x * full_cos + rotate_half * full_sin)
    torch.testing.assert_close(apply_rotary(x, cos, sin)[0], x[0])  # position 0 is the identity


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_with_full_tables_is_bit_identical_to_apply_rotary(dtype):
    rotary = RotaryEmbedding(head_dim=64, max_positions=512, theta=100000.0)
    positions = torch.tensor([0, 5, 511, 77])
    x = (torch.randn(4, 12, 64) * 3).to(dtype)
    cos, sin = rotary.cos_sin(positions, dtype)
    full_cos, signed_sin = rotary.rotation_tables(positions, dtype)
    assert torch.equal(rotate(x, full_cos, signed_sin), apply_rotary(x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = (torch.randn(4, 32) * 3).to(dtype)
    ours = RMSNorm(32, eps=1e-6, dtype=dtype)
    theirs = LlamaRMSNorm(32, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.normal_()
        theirs.weight.copy_(ours.weight)
    torch.testing.assert_close(ours(x), theirs(x), atol=0, rtol=0)


def test_empty_modules_skip_random_initialisation():
    """Building a model allocates its weights and nothing more: no random init, and so no torch._dynamo import
    (nn.Embedding's normal_ pulls it in even on "meta"; ~1-2 s of start-up on a small machine)."""
    import subprocess
    import sys

    code = ("import sys, torch; from tokenmill.layers.linear import empty_embedding, empty_linear; "
            "e = empty_embedding(1000, 64, torch.bfloat16, 'cpu'); l = empty_linear(64, 32, True, torch.float32); "
            "assert e.weight.shape == (1000, 64) and e.weight.dtype == torch.bfloat16 and not e.weight.requires_grad; "
            "assert l.weight.shape == (32, 64) and l.bias.shape == (32,); "
            "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
