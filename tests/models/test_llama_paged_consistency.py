"""The same tokens give the same logits however the paged cache is filled: one prefill step, chunked prefill mixed
with decodes, or token-by-token decode; several sequences per batch, non-contiguous blocks, NaN in unused slots."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.models.llama import LlamaForCausalLM

LENGTHS = [11, 18, 5, 9]
PROMPT_LENS = [3, 12, 1, 6]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    config = ModelConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    model = LlamaForCausalLM(config, dtype=torch.float32, device="cpu")
    model.init_random_weights(seed=0, std=0.2)
    return model


@pytest.fixture(scope="module")
def sequences() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 128, (n,), generator=gen).tolist() for n in LENGTHS]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 1e-4) -> None:
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.isfinite(x).all() and torch.isfinite(y).all()
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


def test_single_sequence_equals_batched(model, sequences, paged):
    batched = paged.run(model, sequences, paged.one_step(LENGTHS))
    alone = [paged.run(model, [seq], paged.one_step([len(seq)]))[0] for seq in sequences]
    _assert_same(batched, alone)


def _steps(paged, schedule: str, seed: int = 0):
    return {
        "one_step": lambda: paged.one_step(LENGTHS),
        "chunked": lambda: paged.chunked(LENGTHS, seed=seed),
        "token_by_token": lambda: paged.token_by_token(LENGTHS),
        "prefill_then_decode": lambda: paged.prefill_then_decode(LENGTHS, PROMPT_LENS),
    }[schedule]()


@pytest.mark.parametrize("schedule", ["chunked", "token_by_token", "prefill_then_decode"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_schedules_agree_with_one_step_prefill(model, sequences, paged, schedule, block_size):
    reference = paged.run(model, sequences, paged.one_step(LENGTHS), block_size=block_size)
    steps = _steps(paged, schedule, seed=block_size)
    _assert_same(paged.run(model, sequences, steps, block_size=block_size, seed=3), reference)


@pytest.mark.parametrize("schedule", ["one_step", "chunked", "token_by_token", "prefill_then_decode"])
def test_nan_in_unused_cache_slots_changes_nothing(model, sequences, paged, schedule):
    """The cache starts all-NaN: any read of a slot at or past a sequence's length would poison the logits."""
    steps = _steps(paged, schedule, seed=11)
    clean = paged.run(model, sequences, steps, cache_fill=0.0)
    poisoned = paged.run(model, sequences, steps, cache_fill=float("nan"))
    _assert_same(poisoned, clean, atol=0.0)


def test_forward_rejects_a_cache_with_the_wrong_layer_count(model, paged):
    from tokenmill.layers.attention_metadata import AttentionMetadata

    meta = AttentionMetadata.build([2], [2], [[0]], block_size=4)
    kv_cache = torch.zeros(3, 2, 1, 4, 2, 16)
    with pytest.raises(ValueError, match="layers"):
        model(torch.tensor([1, 2]), torch.tensor([0, 1]), kv_cache, meta)
