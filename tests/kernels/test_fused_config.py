"""The tile-shape heuristic (pure Python): its picks at the shapes the H100 sweep measured, and that every pick is
legal and depends only on the shapes and the SM count."""

from __future__ import annotations

import pytest

from tokenmill.kernels.triton.fused_config import (
    MIN_SPLIT_K_SPAN,
    GemvConfig,
    check_gemv_config,
    choose_gemv_config,
)

H100_SMS = 132
# (n, k, pair_half) at Llama-3.2-1B.
LLAMA_1B = dict(qkv=(3072, 2048, 32), o=(2048, 2048, 0), gate_up=(16384, 2048, 8192), down=(2048, 8192, 0),
                lm_head=(128256, 2048, 0))
SMOLLM_135M = dict(qkv=(960, 576, 32), o=(576, 576, 0), gate_up=(3072, 576, 1536), down=(576, 1536, 0),
                   lm_head=(49152, 576, 0))


NORM_OPS = ("qkv", "gate_up", "lm_head")


def pick(op: str, rows: int, shapes=LLAMA_1B, sms: int = H100_SMS) -> GemvConfig:
    n, k, pair_half = shapes[op]
    return choose_gemv_config(rows, n, k, sm_count=sms, pair_half=pair_half, folds_norm=op in NORM_OPS)


# Winners of docs/bench/decode_h100_sweep.log (2026-11-26) as (block_n, block_k, block_m, split_k, use_dot,
# num_warps, num_stages). Batch 1: 4 x 1024 everywhere (qkv's 8 x 512 was 0.5 us faster, within run-to-run spread).
# Batch 16, o: 16 x 256 unsplit (39.1 %) rather than split 2 (40.2 %): the same within noise.
SWEEP_WINNERS = {
    (1, "qkv"): (4, 1024, 1, 1, False, 4, 1),
    (1, "o"): (4, 1024, 1, 1, False, 4, 1),
    (1, "gate_up"): (4, 1024, 1, 1, False, 4, 1),
    (1, "down"): (4, 1024, 1, 1, False, 4, 1),
    (1, "lm_head"): (4, 1024, 1, 1, False, 4, 1),
    (16, "qkv"): (32, 256, 16, 1, True, 4, 3),
    (16, "o"): (16, 256, 16, 1, True, 4, 3),
    (16, "gate_up"): (64, 128, 16, 1, True, 4, 3),
    (16, "down"): (16, 128, 16, 4, True, 4, 4),
    (16, "lm_head"): (64, 128, 16, 1, True, 4, 3),
    # docs/bench/decode_h100_sweep_32_64.json (2026-11-27): the best measured shape, or within 1 us of it (o at 32
    # rows: 7.19 vs 7.15; down at 64: 21.7 vs 19.9 for 32 x 256 split 2, lm_head at 32: 203.6 vs 202.6).
    (32, "qkv"): (64, 256, 32, 1, True, 4, 3),
    (32, "o"): (16, 256, 32, 1, True, 4, 3),
    (32, "gate_up"): (64, 128, 32, 1, True, 4, 3),
    (32, "down"): (16, 128, 32, 4, True, 4, 4),
    (32, "lm_head"): (64, 128, 32, 1, True, 4, 3),
    (64, "qkv"): (64, 256, 64, 1, True, 4, 3),
    (64, "o"): (16, 256, 64, 1, True, 4, 3),
    (64, "gate_up"): (64, 128, 64, 1, True, 8, 3),
    (64, "down"): (16, 128, 64, 2, True, 4, 4),
    (64, "lm_head"): (64, 128, 64, 1, True, 8, 3),
}


@pytest.mark.parametrize("rows,op", sorted(SWEEP_WINNERS))
def test_picks_the_h100_sweep_winners(rows, op):
    assert pick(op, rows) == GemvConfig(*SWEEP_WINNERS[(rows, op)])


@pytest.mark.parametrize("op", sorted(LLAMA_1B))
def test_batches_2_to_16_share_the_batch_16_tile(op):
    # The batch is padded to 16 columns of the MMA, so these batches stream the same weight tiles.
    assert {pick(op, rows) for rows in range(2, 17)} == {pick(op, 16)}


def test_wide_tiles_need_half_a_wave_of_tiles():
    # qkv: 64-row tiles would be 48 programs on 132 SMs; on a 64-SM part they are enough.
    assert pick("qkv", 16).block_n == 32
    assert pick("qkv", 16, sms=64).block_n == 64
    # o and down have 2048 rows: 32-row tiles give 64 < 66 programs.
    assert pick("o", 16).block_n == pick("down", 16).block_n == 16
    # More batch tiles count as programs too.
    assert pick("o", 128).block_n == 32
    # From 32 rows on, the ops that normalise their x tile take 64-row tiles however few (qkv: 48 tiles).
    assert pick("qkv", 32).block_n == pick("qkv", 64).block_n == 64
    assert pick("o", 32).block_n == pick("down", 64).block_n == 16


def test_split_k_only_for_long_reductions():
    for rows in (2, 16, 64):
        for op, (_, k, _) in LLAMA_1B.items():
            cfg = pick(op, rows)
            assert k // cfg.split_k >= MIN_SPLIT_K_SPAN or cfg.split_k == 1
    assert pick("down", 16).split_k == 4
    assert pick("down", 64).split_k == 2  # 64 batch rows per program: fewer programs keep the SMs busy
    assert pick("qkv", 16).split_k == pick("o", 16).split_k == 1
    assert pick("down", 1).split_k == 1  # 512 four-row tiles already stream on every SM


@pytest.mark.parametrize("shapes", [LLAMA_1B, SMOLLM_135M], ids=["llama-1b", "smollm-135m"])
@pytest.mark.parametrize("sms", [4, 78, 114, 132])
def test_every_pick_is_legal(shapes, sms):
    for rows in (1, 2, 3, 5, 8, 16, 17, 24, 32, 48, 64, 65, 128, 256):
        for op, (n, k, pair_half) in shapes.items():
            cfg = choose_gemv_config(rows, n, k, sm_count=sms, pair_half=pair_half, folds_norm=op in NORM_OPS)
            check_gemv_config(cfg, n, k, pair_half)
            assert cfg.use_dot == (rows > 1)
            if cfg.use_dot:
                assert cfg.block_m == min(64, max(16, 1 << (rows - 1).bit_length()))
                assert cfg.block_k <= 256


def test_rejects_empty_gemms():
    with pytest.raises(ValueError, match="empty GEMM"):
        choose_gemv_config(0, 2048, 2048, sm_count=132)
