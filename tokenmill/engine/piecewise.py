"""Prefill and mixed steps in CUDA graphs, piece by piece.

A decode step has one launch shape per batch size, so the runner captures it whole (runner._DecodeGraph). A step
with prompt chunks does not: the attention kernel's grid follows the step's sequences and query lengths. Run
eagerly, such a step costs the host ~230 launches (plus cuBLAS's per-call set-up) for a 16-layer 1B model, 8–13 ms
on an H100 machine's host whatever the prompt length, several times its GPU time at short chunks. Here the layers'
dense parts, whose shapes depend only on the token count, are captured per padded token count (vLLM's "piecewise"
CUDA graphs): per layer one graph for norm + QKV + RoPE + the K/V write into the cache, and one for O projection +
residual + norm + MLP + residual; the paged attention kernel runs eagerly between them on the step's real tokens.
A prologue graph embeds the tokens and builds the rotary tables.

Padded rows carry an earlier step's token and position (zeros at first) and a zero attention output: finite
values; every captured op works row by row, so they never touch the real rows; their K/V go to a padding slot that
no sequence reads, and attention never sees them (it takes the first n rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenmill.kernels.backends import AttentionBackend
from tokenmill.layers.attention import write_kv_cache
from tokenmill.layers.attention_metadata import AttentionMetadata

# Padded token counts (the step's tokens round up to the next): spaced by at most 1.5x, so padding wastes at most a
# third of a piece's work, and the matmuls of long chunks (compute-bound) stay close to their real size.
_TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
# Larger steps run eagerly: their GPU time dwarfs the launches, and a graph's temporaries grow with its tokens.
PIECEWISE_MAX_TOKENS = 4096


def token_buckets(max_tokens: int) -> list[int]:
    """The padded sizes for steps of up to max_tokens tokens: the standard buckets below it, then max_tokens."""
    sizes = [s for s in _TOKEN_BUCKETS if s < max_tokens]
    return sizes + [max_tokens]


def supports_piecewise(model) -> bool:
    """A model whose layers split around attention (models/llama.py: before_attention / after_attention)."""
    layers = getattr(model, "layers", None)
    return bool(layers) and all(hasattr(layer, "before_attention") and hasattr(layer, "after_attention")
                                for layer in layers) and hasattr(model, "rotary") and hasattr(model, "embed_tokens")


class PiecewiseForward:
    """model.forward for steps of up to max_tokens tokens (at most PIECEWISE_MAX_TOKENS), its dense pieces replayed
    from CUDA graphs.

    capture=False runs the same pieces eagerly on the same padded buffers (CPU tests of the decomposition and the
    padding; the graphs themselves are checked on a GPU).
    """

    def __init__(self, model, max_tokens: int, device: torch.device, kv_cache: torch.Tensor, pad_slot: int = 0,
                 capture: bool = True) -> None:
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
        # size -> [prologue, then (before, after) for each layer]
        self.pieces: dict[int, list[Callable[[], None]]] = {}
        pool = torch.cuda.graph_pool_handle() if capture else None
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its temporaries' memory
            pieces = [self._prologue(size)]
            for layer, kv_cache_layer in zip(model.layers, kv_cache):
                pieces += [self._before(layer, kv_cache_layer, size), self._after(layer, size)]
            self.pieces[size] = [self._graph(p, pool) for p in pieces] if capture else pieces

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

    @staticmethod
    def _graph(piece: Callable[[], None], pool) -> Callable[[], None]:
        piece()  # warm up outside the capture (cuBLAS handles, lazy initialisation)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            piece()
        return graph.replay

    # ---- a step ----------------------------------------------------------------------------------------------------

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_tokens

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
        """model(input_ids, positions, kv_cache, meta): the final hidden states [n, hidden] of the step's tokens."""
        n = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= n)
        if kv_cache is not self.kv_cache:
            raise ValueError("the graphs write the KV cache they were captured with; got another tensor")
        # Rows n..size keep an earlier step's ids and positions: valid inputs, and no row reads another. Their K/V
        # go to the padding slot.
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(meta.slot_mapping)
        if size > n:
            self.slots[n:size].fill_(self.pad_slot)
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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)
