"""How a flattened, mixed prefill+decode batch maps onto the paged KV cache.

Tokens of all scheduled sequences are concatenated, sequence after sequence. Sequence i contributes
query_lens[i] new tokens, which sit at positions seq_lens[i] - query_lens[i] ... seq_lens[i] - 1 of its
context; its K/V for the whole context live in the blocks listed in block_tables[i]. A query at position p
attends to context positions 0..p (causal). Nothing reads a slot at or past seq_lens[i].

KV cache layout (one tensor for the whole model): [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim];
index 0 of dim 1 is K, 1 is V. Flat slot s = block_id * block_size + offset.

`state_seeds` is the one field that is not about attention: looped models (Parcae) draw each token's initial loop
state from its sequence's seed, so the runner passes one seed per token here; other models ignore it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.device_copy import to_device


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat slot where each new token's K/V is written
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so reference paths can loop without device syncs.
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    # Tensors an attention backend derives from the fields above (gather indices, masks), computed by the first
    # layer and reused by the others. Only valid while the fields are not changed in place, so metadata reused across
    # steps (captured CUDA graphs) must not be given to a backend that fills this.
    derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    # [num_tokens] int64: the loop-state seed of each token's sequence (Parcae); None: the model's default seed.
    state_seeds: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc_cpu[-1]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        state_seeds: list[int] | None = None,
    ) -> "AttentionMetadata":
        """Builds metadata on the host, then moves it to `device` in one copy per tensor. `state_seeds`: one per
        sequence (expanded to one per token), for models with a seeded loop state."""
        if not (len(query_lens) == len(seq_lens) == len(block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
        if state_seeds is not None and len(state_seeds) != len(query_lens):
            raise ValueError("state_seeds must have one entry per sequence")
        starts = [0]
        slots: list[int] = []
        for q, s, table in zip(query_lens, seq_lens, block_tables):
            if not 0 < q <= s:
                raise ValueError(f"need 0 < query_len <= seq_len, got {q}, {s}")
            if len(table) * block_size < s:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {s} tokens")
            starts.append(starts[-1] + q)
            for pos in range(s - q, s):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            slot_mapping=to_device(slots, torch.int64, device),
            query_start_loc=to_device(starts, torch.int32, device),
            seq_lens=to_device(seq_lens, torch.int32, device),
            block_tables=to_device(padded, torch.int32, device),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_start_loc_cpu=starts,
            seq_lens_cpu=list(seq_lens),
            state_seeds=None
            if state_seeds is None
            else to_device([seed for seed, q in zip(state_seeds, query_lens) for _ in range(q)], torch.int64, device),
        )
