"""Helpers for model tests: tiny random HF checkpoints, and a mini runner that feeds a model a schedule of steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tokenmill.layers.attention_metadata import AttentionMetadata

TINY_SHAPE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def make_tiny_hf_model(arch: str = "llama", seed: int = 0, **overrides):
    """A transformers model of the tiny shape with every weight (norms and biases too) randomized."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_cls(**{**TINY_SHAPE, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            else:
                p.normal_(0.0, 0.2)
    return model


def save_tiny_hf_model(folder: Path, arch: str = "llama", seed: int = 0, **overrides):
    model = make_tiny_hf_model(arch, seed, **overrides)
    model.save_pretrained(folder)
    return model


def hf_logprobs(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def run_schedule(
    model,
    sequences: list[list[int]],
    steps: list[list[tuple[int, int]]],
    block_size: int = 4,
    extra_blocks: int = 7,
    cache_fill: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
) -> list[torch.Tensor]:
    """Runs `steps` (each a list of (sequence index, new tokens)) through the paged model; returns every
    sequence's logits at every position [len, vocab]. Block ids are a shuffled permutation, so a sequence's blocks
    are not contiguous, and each step passes only the blocks that hold the context so far."""
    cfg = model.config
    blocks_needed = [math.ceil(len(s) / block_size) for s in sequences]
    num_blocks = sum(blocks_needed) + extra_blocks
    # Block 0 is never handed out (as in the engine's pool): padded rows of captured graphs write there.
    perm = (torch.randperm(num_blocks - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    tables, at = [], 0
    for n in blocks_needed:
        tables.append(perm[at : at + n])
        at += n
    kv_cache = torch.full(
        (cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim),
        cache_fill,
        dtype=model.dtype,
        device=device,
    )
    done = [0] * len(sequences)
    logits: list[list[torch.Tensor]] = [[] for _ in sequences]
    for step in steps:
        ids, positions, query_lens, seq_lens, block_tables = [], [], [], [], []
        for seq, n in step:
            start, end = done[seq], done[seq] + n
            assert end <= len(sequences[seq])
            ids += sequences[seq][start:end]
            positions += range(start, end)
            query_lens.append(n)
            seq_lens.append(end)
            block_tables.append(tables[seq][: math.ceil(end / block_size)])
            done[seq] = end
        meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, block_size, device)
        with torch.inference_mode():
            hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), kv_cache, meta)
            step_logits = model.compute_logits(hidden)
        for (seq, _), chunk in zip(step, step_logits.split(query_lens)):
            logits[seq].append(chunk)
    assert done == [len(s) for s in sequences], "schedule must cover every token"
    return [torch.cat(chunks) for chunks in logits]


def one_step_schedule(lengths: list[int]) -> list[list[tuple[int, int]]]:
    return [[(i, n) for i, n in enumerate(lengths)]]


def token_by_token_schedule(lengths: list[int]) -> list[list[tuple[int, int]]]:
    return [[(i, 1) for i, n in enumerate(lengths) if n > t] for t in range(max(lengths))]


def prefill_then_decode_schedule(lengths: list[int], prompt_lens: list[int]) -> list[list[tuple[int, int]]]:
    """One prefill step of each prompt, then decode steps of one token per unfinished sequence: decode batches
    whose sequences have different lengths, as in serving."""
    steps = [[(i, p) for i, p in enumerate(prompt_lens)]]
    done = list(prompt_lens)
    while any(d < n for d, n in zip(done, lengths)):
        steps.append([(i, 1) for i, n in enumerate(lengths) if done[i] < n])
        done = [min(d + 1, n) for d, n in zip(done, lengths)]
    return steps


def chunked_schedule(lengths: list[int], seed: int = 0, max_chunk: int = 5) -> list[list[tuple[int, int]]]:
    """Every step advances each unfinished sequence by a random 1..max_chunk tokens: prefill chunks and
    single-token (decode-shaped) queries mix in one batch."""
    gen = torch.Generator().manual_seed(seed)
    done, steps = [0] * len(lengths), []
    while any(d < n for d, n in zip(done, lengths)):
        step = []
        for i, n in enumerate(lengths):
            if done[i] < n:
                take = min(n - done[i], int(torch.randint(1, max_chunk + 1, (1,), generator=gen)))
                step.append((i, take))
                done[i] += take
        steps.append(step)
    return steps


@pytest.fixture
def paged() -> type:
    """The mini runner and schedule builders, as one namespace for the test files."""

    class Paged:
        run = staticmethod(run_schedule)
        one_step = staticmethod(one_step_schedule)
        token_by_token = staticmethod(token_by_token_schedule)
        prefill_then_decode = staticmethod(prefill_then_decode_schedule)
        chunked = staticmethod(chunked_schedule)

    return Paged


@pytest.fixture
def tiny_hf():
    """Builders for tiny transformers models: make(arch, seed, **config), save(folder, arch, seed, **config),
    logprobs(hf_model, token_ids)."""

    class TinyHF:
        shape = TINY_SHAPE
        llama3_rope = LLAMA3_ROPE
        make = staticmethod(make_tiny_hf_model)
        save = staticmethod(save_tiny_hf_model)
        logprobs = staticmethod(hf_logprobs)

    return TinyHF
