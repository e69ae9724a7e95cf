"""ParcaeForEngine: a Parcae looped model behind the engine's model contract, with a per-loop paged KV cache.

At a fixed T the unrolled model is a plain stack of blocks (`ParcaeModel.virtual_layers(T)`): the prelude, T copies
of the core, the coda. Each entry is its own layer of the engine's KV cache, so the cache holds
n_prelude + T·n_core + n_coda layers per token (the paper's "KV grows with T"), while the T copies of a core block
share one set of weights. Between layers run the steps of the loop: h_0 and e before the first core block
(`begin_recurrence`, h_0 seeded per token from its sequence's seed and position), Ā h + B̄ e before each loop
(`loop_update`), C h before the coda (`end_recurrence`).

Why this is exactly the training model's forward at fixed T: every block attends causally and the injection, the
readout and the initial state act per token, so the state of token i after loop t depends on tokens 0..i only. A step
therefore computes the loop states of its query tokens fresh, from the embedding up, and takes the K/V of earlier
tokens from the same virtual layer, which they wrote when they were computed at the same loop t. Only K/V are
cached; nothing else carries over between steps (tests/models/test_parcae_engine.py checks the equality).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import AttentionBackend, paged_attention
from tokenmill.layers.attention_metadata import AttentionMetadata
from tokenmill.models.parcae import ParcaeConfig, ParcaeModel

PARCAE_ARCHITECTURE = "ParcaeForCausalLM"


def parcae_model_config(
    config: ParcaeConfig, recurrence: int, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None
) -> ModelConfig:
    """The engine's view of a Parcae model served at T = `recurrence`: num_hidden_layers counts KV layers, i.e. the
    unrolled depth, so everything that sizes KV from a ModelConfig (kv_bytes_per_token) sizes it right."""
    return ModelConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_size,
        num_hidden_layers=config.effective_depth(recurrence),
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_seq_len,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_ids=list(eos_token_ids),
        architecture="parcae",
    )


class ParcaeForEngine(nn.Module):
    """forward(input_ids [N], positions [N], kv_cache [L, 2, blocks, block_size, Hkv, D], meta) -> hidden [N, d];
    compute_logits(hidden [S, d]) -> float32 [S, vocab]. L = num_kv_layers = n_prelude + T·n_core + n_coda.

    The seed of each token's initial loop state comes from meta.state_seeds (one per token; the runner fills it from
    Request.state_seed), or `default_state_seed` (0, ParcaeModel.forward's default) when the metadata has none."""

    # The engine keeps decode eager for this model: captured graphs carry no per-token state seeds.
    supports_cuda_graphs = False

    def __init__(
        self,
        model: ParcaeModel,
        recurrence: int | None = None,
        attn_backend: AttentionBackend | None = None,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
        default_state_seed: int = 0,
    ) -> None:
        super().__init__()
        c = model.config
        self.parcae = model  # the one set of weights; the T copies of the core are views of the same blocks
        self.recurrence = c.mean_recurrence if recurrence is None else int(recurrence)
        if self.recurrence < 1:
            raise ValueError(f"the recurrence T must be >= 1, got {self.recurrence}")
        self.virtual_layers = model.virtual_layers(self.recurrence)
        self.num_kv_layers = len(self.virtual_layers)
        self.uses_state_seed = c.is_looped  # the fixed-depth baseline (n_core = 0) has no loop state
        self.default_state_seed = default_state_seed
        self.attn_backend = attn_backend or paged_attention
        self.scale = c.head_dim**-0.5  # what scaled_dot_product_attention uses in the training forward
        self.dtype = model.embed.weight.dtype
        self.config = parcae_model_config(c, self.recurrence, eos_token_ids, bos_token_id)
        self.requires_grad_(False)
        self.eval()

    def forward(
        self,
        input_ids: torch.Tensor,  # [N] int64
        positions: torch.Tensor,  # [N] int64
        kv_cache: torch.Tensor,  # [num_kv_layers, 2, num_blocks, block_size, Hkv, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [N, d], before the final norm
        if kv_cache.shape[0] != self.num_kv_layers:
            raise ValueError(
                f"kv_cache has {kv_cache.shape[0]} layers; this Parcae model at T={self.recurrence} needs "
                f"{self.num_kv_layers}"
            )
        m = self.parcae
        cos, sin = m.rope(positions)
        value_embeds: dict[int, torch.Tensor | None] = {}  # per block: the same for every loop

        def run_block(layer, x: torch.Tensor) -> torch.Tensor:
            kv_layer = kv_cache[layer.index]

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return self.attn_backend(q, k, v, kv_layer, meta, self.scale)

            if layer.layer_id not in value_embeds:
                value_embeds[layer.layer_id] = m.value_embed(layer.layer_id, input_ids)
            return m.block_of(layer)(x, cos, sin, attend, value_embeds[layer.layer_id])

        x = m.embed(input_ids)
        h = e = None
        for layer in self.virtual_layers:
            if layer.stage == "core":
                if h is None:
                    h, e = m.begin_recurrence(x, self._state_seeds(meta, input_ids), positions)
                if layer.starts_loop:
                    h = m.loop_update(h, e)
                h = run_block(layer, h)
            else:
                if h is not None:  # the first coda block: the loop is over
                    x, h = m.end_recurrence(h), None
                x = run_block(layer, x)
        if h is not None:  # a model without a coda
            x = m.end_recurrence(h)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, d] (one row per sequence, chosen by the caller) -> logits [S, vocab] in float32."""
        return self.parcae.logits(hidden)

    def _state_seeds(self, meta: AttentionMetadata, input_ids: torch.Tensor) -> torch.Tensor:
        if meta.state_seeds is None:
            return torch.full(input_ids.shape, self.default_state_seed, dtype=torch.int64, device=input_ids.device)
        if meta.state_seeds.shape != input_ids.shape:
            raise ValueError(
                f"meta.state_seeds has shape {tuple(meta.state_seeds.shape)}; expected one seed per token "
                f"{tuple(input_ids.shape)}"
            )
        return meta.state_seeds
