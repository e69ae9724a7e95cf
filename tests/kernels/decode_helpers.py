"""Shared by the decoder tests (fused Triton, megakernel): tiny random Llama models, a NaN-filled paged cache filled
by the torch model's prefill, one decode step through any runner, KL."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokenmill.config import ModelConfig
from tokenmill.layers.attention_metadata import AttentionMetadata
from tokenmill.models.llama import LlamaForCausalLM

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
BLOCK_SIZE = 4
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiny_config(qwen_style: bool = False, **overrides) -> ModelConfig:
    fields = dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
        rope_scaling=None if qwen_style else LLAMA3_ROPE, max_position_embeddings=512,
        tie_word_embeddings=not qwen_style, attention_bias=qwen_style,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def make_model(config: ModelConfig, dtype: torch.dtype, seed: int) -> LlamaForCausalLM:
    model = LlamaForCausalLM(config, dtype=dtype, device=DEVICE)
    # std 0.2 spreads the logits, so greedy choices are far from ties.
    model.init_random_weights(seed=seed, std=0.2)
    return model


@dataclass
class Batch:
    tables: list[list[int]]
    lens: list[int]  # tokens in the cache so far
    last: list[int]  # last token of each sequence
    cache: torch.Tensor


def prefill(model: LlamaForCausalLM, prompts: list[list[int]], room: int, seed: int) -> Batch:
    cfg = model.config
    blocks = [math.ceil((len(p) + room) / BLOCK_SIZE) for p in prompts]
    gen = torch.Generator().manual_seed(seed)
    order = (torch.randperm(sum(blocks) + 2, generator=gen) + 1).tolist()  # block 0 stays unused
    tables, used = [], 0
    for n in blocks:
        tables.append(order[used: used + n])
        used += n
    cache = torch.full((cfg.num_hidden_layers, 2, sum(blocks) + 3, BLOCK_SIZE, cfg.num_key_value_heads,
                        cfg.head_dim), float("nan"), dtype=model.dtype, device=DEVICE)
    lens = [len(p) for p in prompts]
    meta = AttentionMetadata.build(lens, lens, tables, BLOCK_SIZE, device=DEVICE)
    ids = torch.tensor([t for p in prompts for t in p], device=DEVICE)
    positions = torch.tensor([i for p in prompts for i in range(len(p))], device=DEVICE)
    with torch.no_grad():
        hidden = model(ids, positions, cache, meta)
    ends = torch.tensor(meta.query_start_loc_cpu[1:], device=DEVICE) - 1
    first = model.compute_logits(hidden[ends]).argmax(-1).tolist()
    return Batch(tables, lens, first, cache)


def decode_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    seq_lens = [n + 1 for n in batch.lens]
    meta = AttentionMetadata.build([1] * len(seq_lens), seq_lens, batch.tables, BLOCK_SIZE, device=DEVICE)
    ids = torch.tensor(batch.last, device=DEVICE)
    positions = torch.tensor(batch.lens, device=DEVICE)
    return ids, positions, meta


def step(batch: Batch, run, token_source: list[int] | None = None) -> torch.Tensor:
    """One decode step through `run(ids, positions, cache, meta) -> logits`; advances the batch greedily (or
    with the given tokens, for teacher forcing) and returns the float32 logits."""
    ids, positions, meta = decode_inputs(batch)
    logits = run(ids, positions, batch.cache, meta).float()
    batch.lens = [n + 1 for n in batch.lens]
    batch.last = token_source if token_source is not None else logits.argmax(-1).tolist()
    return logits


def model_runner(model):
    return lambda ids, pos, cache, meta: model.compute_logits(model(ids, pos, cache, meta))


def kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(ref || other) per row, in float64."""
    ref_logp = ref_logits.double().log_softmax(-1)
    return (ref_logp.exp() * (ref_logp - logits.double().log_softmax(-1))).sum(-1)


def random_prompts(num_seqs: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 11, (num_seqs,), generator=gen).tolist()
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]




def check_graph_replay_matches_eager(run, model: LlamaForCausalLM, prompts: list[list[int]], seed: int,
                                     steps: int, warmups: int = 1, before_capture=None) -> None:
    """Captures `run(ids, positions, cache, meta) -> logits` once in a CUDA graph over static inputs, then replays
    it step after step next to eager calls of `run` on a copy of the batch: logits must be bit-identical. The
    replayed logits are copied before the eager call, since a decoder may hand back the same buffer from both.
    before_capture(cache): per-cache set-up to do outside the graph."""
    eager, graphed = prefill(model, prompts, 40, seed), prefill(model, prompts, 40, seed)
    ids, positions, meta = decode_inputs(graphed)
    static_ids, static_positions = ids.clone(), positions.clone()
    for _ in range(warmups):  # compile and allocate outside the graph
        run(static_ids, static_positions, graphed.cache.clone(), meta)
    if before_capture is not None:
        before_capture(graphed.cache)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(static_ids, static_positions, graphed.cache, meta)
    for i in range(steps):
        ids, positions, step_meta = decode_inputs(graphed)
        static_ids.copy_(ids)
        static_positions.copy_(positions)
        meta.slot_mapping.copy_(step_meta.slot_mapping)
        meta.seq_lens.copy_(step_meta.seq_lens)
        graph.replay()
        replayed = out.clone()
        ref_logits = step(eager, lambda *args: run(*args).clone())
        graphed.lens = [n + 1 for n in graphed.lens]
        graphed.last = replayed.argmax(-1).tolist()
        assert torch.equal(replayed, ref_logits), f"seed {seed}: step {i}: graph replay differs from eager"
