"""Prefill and mixed steps in CUDA graphs, piece by piece.

A decode step has one launch shape per batch size, so the runner captures it whole (runner._DecodeGraph). A step
with prompt chunks does not: the attention kernel's grid follows the step's sequences and query lengths. Run
eagerly, such a step costs the host ~230 launches (plus cuBLAS's per-call set-up) for a 16-layer 1B model, 8–13 ms
on an H100 machine's host whatever the prompt length, several times its GPU time at short chunks. Here the layers'
dense parts, whose shapes depend only on the token count, are captured per padded token count (vLLM's "piecewise"
CUDA graphs): per layer one graph for norm + QKV + RoPE + the K/V write into the cache, and one for O projection +
residual + norm + MLP + residual; the paged attention kernel runs eagerly between them on the step's real tokens.
A prologue graph embeds the tokens and builds the rotary tables.

Where the attention backend has a planned prefill (the Triton kernels: a launch whose grid depends only on the
token count and the sequence limit, kernels/triton/prefill.py) and the runner gives the sequence limit, attention
goes into the graph too: each token count's whole forward is one graph, and a step stages its metadata (query
starts, lengths, block tables, the attention plan) into static buffers first. Otherwise attention runs eagerly
between the pieces.

Padded rows carry an earlier step's token and position (zeros at first) and a zero attention output: finite
values; every captured op works row by row, so they never touch the real rows; their K/V go to a padding slot that
no sequence reads, and attention never sees them (it takes the first n rows; the planned launch has no item for
them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenmill.device_copy import to_device
from tokenmill.kernels.backends import AttentionBackend
from tokenmill.layers.attention import write_kv_cache
from tokenmill.layers.attention_metadata import AttentionMetadata

# Padded token counts (the step's tokens round up to the next): spaced by at most 1.5x, so padding wastes at most a
# third of a piece's work, and the matmuls of long chunks (compute-bound) stay close to their real size.
_TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
# Larger steps run eagerly: their GPU time dwarfs the launches, and a graph's temporaries grow with its tokens.
PIECEWISE_MAX_TOKENS = 4096
# Sizes up to this many tokens capture the whole step, attention included (where the backend allows). Above it the
# planned attention launch's padding items (one per sequence the step might hold) cost more than the launches they
# save: H100, Llama-3.2-1B shape, 256 sequences: 16 tokens 2.15 vs 2.73 ms, 64 tokens 2.26 vs 2.66, 256 tokens 2.98
# vs 2.83 (whole vs piecewise, docs/BENCHMARKS.md).
WHOLE_STEP_MAX_TOKENS = 128


def token_buckets(max_tokens: int) -> list[int]:
    """The padded sizes for steps of up to max_tokens tokens: the standard buckets below it, then max_tokens."""
    sizes = [s for s in _TOKEN_BUCKETS if s < max_tokens]
    return sizes + [max_tokens]


def supports_piecewise(model) -> bool:
    """A model whose layers split around attention (models/llama.py: before_attention / after_attention)."""
    layers = getattr(model, "layers", None)
    return bool(layers) and all(hasattr(layer, "before_attention") and hasattr(layer, "after_attention")
                                for layer in layers) and hasattr(model, "rotary") and hasattr(model, "embed_tokens")


def _planned_prefill(model) -> Callable | None:
    """The attention backend's capturable prefill launch, where every layer has the same backend and it has one."""
    backends = {id(b): b for b in (getattr(getattr(layer, "attn", None), "attn_backend", None)
                                   for layer in model.layers)}
    if len(backends) != 1:
        return None
    (backend,) = backends.values()
    return backend.planned_prefill if isinstance(backend, AttentionBackend) else None


class PiecewiseForward:
    """model.forward for steps of up to max_tokens tokens (at most PIECEWISE_MAX_TOKENS), its dense pieces replayed
    from CUDA graphs.

    max_seqs > 0 (the most sequences a step holds) and max_blocks_per_seq: steps of up to whole_max_tokens tokens
    in one graph each where the attention backend allows (see the module doc); self.whole_sizes says which.
    capture=False runs the same pieces eagerly on the same padded buffers (CPU tests of the decomposition and the
    padding; the graphs themselves are checked on a GPU).
    """

    def __init__(self, model, max_tokens: int, device: torch.device, kv_cache: torch.Tensor, pad_slot: int = 0,
                 capture: bool = True, max_seqs: int = 0, max_blocks_per_seq: int = 0,
                 whole_max_tokens: int = WHOLE_STEP_MAX_TOKENS) -> None:
        if not supports_piecewise(model):
            raise ValueError(f"{type(model).__name__} does not split its layers around attention")
        self.model = model
        self.kv_cache = kv_cache  # [num_layers, 2, num_blocks, block_size, Hkv, D]: the graphs write K/V into it
        self.pad_slot = pad_slot  # where padded rows write their K/V (a slot of a block no sequence holds)
        self.sizes = token_buckets(min(max_tokens, PIECEWISE_MAX_TOKENS))
        self.max_tokens = self.sizes[-1]
        cfg = model.config
        heads, dim = cfg.num_attention_heads, cfg.head_dim
        t, dtype = self.max_tokens, model.dtype

        def buffer(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        # Static buffers shared by every size (a size's graphs use the first `size` rows).
        self.input_ids = buffer(t, dtype=torch.long)
        self.positions = buffer(t, dtype=torch.long)
        self.slots = torch.full((t,), pad_slot, dtype=torch.long, device=device)
        self.hidden = buffer(t, cfg.hidden_size)  # the residual stream, layer to layer
        self.cos = buffer(t, 1, dim)
        self.sin = buffer(t, 1, dim)
        self.q = buffer(t, heads, dim)
        self.attn_out = buffer(t, heads, dim)
        self.planned_prefill = _planned_prefill(model) if max_seqs > 0 and max_blocks_per_seq > 0 else None
        self.whole_sizes = ({s for s in self.sizes if s <= whole_max_tokens}
                            if self.planned_prefill is not None else set())
        self.max_seqs = max_seqs
        if self.whole_sizes:
            self._make_step_metadata(max_seqs, max_blocks_per_seq, device)
        # size -> [prologue, then (before, after) for each layer], or [the whole step]
        self.pieces: dict[int, list[Callable[[], None]]] = {}
        pool = torch.cuda.graph_pool_handle() if capture else None
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its temporaries' memory
            pieces = [self._prologue(size)]
            for layer, kv_cache_layer in zip(model.layers, kv_cache):
                pieces += [self._before(layer, kv_cache_layer, size), self._after(layer, size)]
            if size in self.whole_sizes:
                pieces = [self._whole_step(pieces, size)]
            self.pieces[size] = [self._graph(p, pool) for p in pieces] if capture else pieces

    def _make_step_metadata(self, max_seqs: int, max_blocks_per_seq: int, device: torch.device) -> None:
        """Static attention metadata for whole-step graphs: one int32 buffer [query_start_loc (max_seqs + 1) |
        seq_lens (max_seqs) | plan (2 * the largest size's capacity)] staged by one copy per step, and the block
        tables [max_seqs, max_blocks_per_seq]."""
        from tokenmill.kernels.triton.prefill import plan_capacity, prefill_block_m

        cfg = self.model.config
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        # size -> (rows per attention program, query tokens per item, plan capacity in items)
        self.plan_shape = {}
        for size in sorted(self.whole_sizes):
            block_m = prefill_block_m(size, group, cfg.head_dim)
            self.plan_shape[size] = (block_m, block_m // group, plan_capacity(size, max_seqs, block_m // group))
        capacity = max(c for _, _, c in self.plan_shape.values())
        self.step_metadata = torch.zeros(2 * max_seqs + 1 + 2 * capacity, dtype=torch.int32, device=device)
        self.query_start_loc = self.step_metadata[: max_seqs + 1]
        self.seq_lens = self.step_metadata[max_seqs + 1: 2 * max_seqs + 1]
        self.plan = self.step_metadata[2 * max_seqs + 1:]
        self.plan.view(-1, 2)[:, 0] = -1  # every item padding until a step stages its plan
        self.block_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)

    # ---- the pieces (every tensor they read or write outside their own temporaries is a static buffer) ----------

    def _prologue(self, n: int) -> Callable[[], None]:
        def run() -> None:
            self.hidden[:n].copy_(self.model.embed_tokens(self.input_ids[:n]))
            cos, sin = self.model.rotary.rotation_tables(self.positions[:n], self.model.dtype)
            self.cos[:n].copy_(cos)
            self.sin[:n].copy_(sin)
            self.attn_out[:n].zero_()
        return run

    def _before(self, layer, kv_cache_layer: torch.Tensor, n: int) -> Callable[[], None]:
        def run() -> None:
            q, k, v = layer.before_attention(self.hidden[:n], self.cos[:n], self.sin[:n])
            write_kv_cache(k, v, kv_cache_layer, self.slots[:n])
            self.q[:n].copy_(q)
        return run

    def _after(self, layer, n: int) -> Callable[[], None]:
        def run() -> None:
            self.hidden[:n].copy_(layer.after_attention(self.hidden[:n], self.attn_out[:n]))
        return run

    def _whole_step(self, pieces: list[Callable[[], None]], n: int) -> Callable[[], None]:
        """The prologue, then each layer's pieces around the planned attention launch, then the final norm into
        self.hidden (in place: the step's output)."""
        prologue, *layer_pieces = pieces
        block_m, _, capacity = self.plan_shape[n]
        plan = self.plan[: 2 * capacity]
        tables, lens, starts = self.block_tables, self.seq_lens, self.query_start_loc

        def run() -> None:
            prologue()
            for i, (layer, kv_cache_layer) in enumerate(zip(self.model.layers, self.kv_cache)):
                layer_pieces[2 * i]()
                self.planned_prefill(self.q[:n], kv_cache_layer, tables, lens, starts, plan, layer.attn.scale,
                                     block_m, out=self.attn_out[:n])
                layer_pieces[2 * i + 1]()
            self.hidden[:n].copy_(self.model.norm(self.hidden[:n]))
        return run

    @staticmethod
    def _graph(piece: Callable[[], None], pool) -> Callable[[], None]:
        piece()  # warm up outside the capture (cuBLAS handles, lazy initialisation)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            piece()
        return graph.replay

    # ---- a step ----------------------------------------------------------------------------------------------------

    def _size_for(self, num_tokens: int) -> int:
        """The padded size a step of num_tokens tokens replays (at most max_tokens)."""
        return next(s for s in self.sizes if s >= num_tokens)

    def fits(self, num_tokens: int, num_seqs: int = 1) -> bool:
        if num_tokens > self.max_tokens:
            return False
        return self._size_for(num_tokens) not in self.whole_sizes or num_seqs <= self.max_seqs

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """model(input_ids, positions, kv_cache, meta): the final hidden states [n, hidden] of the step's tokens."""
        n = input_ids.shape[0]
        size = self._size_for(n)
        if kv_cache is not self.kv_cache:
            raise ValueError("the graphs write the KV cache they were captured with; got another tensor")
        # Rows n..size keep an earlier step's ids and positions: valid inputs, and no row reads another. Their K/V
        # go to the padding slot.
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        if size > n:
            self.slots[n:size].fill_(self.pad_slot)
        if size in self.whole_sizes:
            self._stage_metadata(meta, size)
            self.pieces[size][0]()
            return self.hidden[:n]
        prologue, *layer_pieces = self.pieces[size]
        prologue()
        for i, (layer, kv_cache_layer) in enumerate(zip(self.model.layers, kv_cache)):
            before, after = layer_pieces[2 * i], layer_pieces[2 * i + 1]
            before()
            attn, out = layer.attn, self.attn_out[:n]
            # The graph wrote this step's K/V into the cache (write_kv False): attention reads only q and the cache,
            # so q stands in for the k and v it does not read.
            q = self.q[:n]
            if isinstance(attn.attn_backend, AttentionBackend):
                attn.attn_backend(q, q, q, kv_cache_layer, meta, attn.scale, False, out=out)
            else:  # a bare attention function (the reference, paged_attention)
                out.copy_(attn.attn_backend(q, q, q, kv_cache_layer, meta, attn.scale, False))
            after()
        return self.model.norm(self.hidden[:n])

    def _stage_metadata(self, meta: AttentionMetadata, size: int) -> None:
        from tokenmill.kernels.triton.prefill import plan_prefill

        num_seqs = meta.num_seqs
        if num_seqs > self.max_seqs:
            raise ValueError(f"the step holds {num_seqs} sequences; the graphs were captured for {self.max_seqs}")
        starts = meta.query_start_loc_cpu
        query_lens = [b - a for a, b in zip(starts, starts[1:])]
        _, block_q, capacity = self.plan_shape[size]
        padding = self.max_seqs - num_seqs
        staged = (starts + [starts[-1]] * padding + meta.seq_lens_cpu + [0] * padding
                  + plan_prefill(query_lens, meta.seq_lens_cpu, block_q, capacity))
        self.step_metadata[: len(staged)].copy_(to_device(staged, torch.int32, self.step_metadata.device))
        width = meta.block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(f"block tables of {width} blocks; the graphs hold {self.block_tables.shape[1]}")
        # Columns past a sequence's blocks are never read (keys stop at its length): no need to clear them.
        self.block_tables[:num_seqs, :width].copy_(meta.block_tables)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)
