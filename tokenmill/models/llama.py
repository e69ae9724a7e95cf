"""Llama-family decoder: Llama 2/3/3.x, SmolLM2, Qwen2/2.5 (q/k/v bias), tied or untied embeddings.

Read it top to bottom: an attention block and a gated MLP per layer, pre-norm residuals, a final norm, and an LM head.
The batch is flat: T tokens from any number of sequences, each at its own position, with K/V in a paged cache
(see tokenmill/layers/attention_metadata.py). Weights are stored under our own names with fused projections
(qkv_proj = [q; k; v] rows, gate_up_proj = [gate; up] rows); `load_weights` takes Hugging Face names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config import ModelConfig
from tokenmill.layers.attention import AttentionBackend, paged_attention
from tokenmill.layers.attention_metadata import AttentionMetadata
from tokenmill.layers.linear import empty_embedding, empty_linear
from tokenmill.layers.mlp import GatedMLP
from tokenmill.layers.quantized_linear import LM_HEAD_SMALL_BATCH_ROWS, QuantizedLinear, quantize_linears_
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding, rotate


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend, dtype: torch.dtype, device) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = empty_linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias, dtype=dtype, device=device
        )
        self.o_proj = empty_linear(self.q_size, config.hidden_size, bias=False, dtype=dtype, device=device)
        self.attn_backend = attn_backend

    def project(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor):
        """x [T, hidden] -> q [T, Hq, D] and k [T, Hkv, D] rotated (cos, signed_sin: RotaryEmbedding.rotation_tables
        [T, 1, D]), v [T, Hkv, D]. Attention over the paged cache follows (attn_backend), then o_proj."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        # q and k heads rotate together in one call: [T, Hq + Hkv, D].
        qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = rotate(qk, cos, signed_sin).split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)
        return q, k, v


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: AttentionBackend, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.attn = LlamaAttention(config, attn_backend, dtype, device)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, dtype=dtype, device=device)

    def forward(self, x, cos, sin, kv_cache_layer, meta) -> torch.Tensor:
        q, k, v = self.before_attention(x, cos, sin)
        return self.after_attention(x, self.attn.attn_backend(q, k, v, kv_cache_layer, meta, self.attn.scale))

    # The pieces on either side of attention, apart so that engine/piecewise.py can capture each in a CUDA graph.
    def before_attention(self, x, cos, sin):
        return self.attn.project(self.attn_norm(x), cos, sin)

    def after_attention(self, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        h = x + self.attn.o_proj(attn_out.flatten(1))
        return h + self.mlp(self.mlp_norm(h))


class LlamaForCausalLM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attn_backend: AttentionBackend | None = None,
    ) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.config = config
        self.dtype = dtype
        self.attn_backend = attn_backend or paged_attention
        self.embed_tokens = empty_embedding(config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, device=device
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.attn_backend, dtype, device) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else empty_linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype, device=device)
        )
        # Set by quantize_(): the LM head as a QuantizedLinear (a separate copy when the embeddings are tied).
        self.quantized_lm_head: QuantizedLinear | None = None
        self.requires_grad_(False)
        self.eval()

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [num_layers, 2, num_blocks, block_size, Hkv, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        if kv_cache.shape[0] != len(self.layers):
            raise ValueError(f"kv_cache has {kv_cache.shape[0]} layers, the model has {len(self.layers)}")
        cos, sin = self.rotary.rotation_tables(positions, self.dtype)
        h = self.embed_tokens(input_ids)
        for layer, kv_cache_layer in zip(self.layers, kv_cache):
            h = layer(h, cos, sin, kv_cache_layer, meta)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (one row per sequence, chosen by the caller) -> logits [S, vocab] in float32."""
        if self.quantized_lm_head is not None:
            return self.quantized_lm_head(hidden).float()
        return F.linear(hidden, self.lm_head_weight).float()

    @torch.no_grad()
    def quantize_(self, mode: str) -> None:
        """Weight-only quantization for CPU inference (see tokenmill/layers/quantized_linear.py): every projection
        in `mode` (int8 or int4), the LM head in int8 (GGUF files keep it at 8 bits or more, and 4 bits there cost
        visibly more accuracy than anywhere else). The token embedding stays as loaded: it is only indexed."""
        quantize_linears_(self.layers, mode)
        self.quantized_lm_head = QuantizedLinear(
            self.lm_head_weight, None, "int8", small_batch_rows=LM_HEAD_SMALL_BATCH_ROWS
        )

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # ---- weights -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies (Hugging Face name, tensor) pairs into the fused parameters, converting dtype/device on the way.

        Raises ValueError for an unknown name, a shape mismatch, or a parameter the weights leave unfilled.
        """
        params = dict(self.named_parameters())
        filled: dict[str, int] = defaultdict(int)
        for hf_name, tensor in weights:
            target = self._param_rows_for(hf_name)
            if target is None:
                continue
            name, rows = target
            if name not in params:
                raise ValueError(f"checkpoint weight {hf_name!r} has no place in this model ({name!r})")
            dest = params[name] if rows is None else params[name][rows[0] : rows[1]]
            if tuple(tensor.shape) != tuple(dest.shape):
                raise ValueError(
                    f"checkpoint weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            filled[name] += dest.numel()
        bad = [name for name, p in params.items() if filled[name] != p.numel()]
        if bad:
            shown = ", ".join(bad[:6]) + (f" and {len(bad) - 6} more" if len(bad) > 6 else "")
            raise ValueError(f"checkpoint does not fill these model weights exactly once: {shown}")

    def _param_rows_for(self, hf_name: str) -> tuple[str, tuple[int, int] | None] | None:
        """Maps a HF weight name to (our parameter name, row range or None for all); None means skip it."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None  # old checkpoints store the rope table; we compute it
        if hf_name == "lm_head.weight" and self.lm_head is None:
            return None  # some tied checkpoints still store a copy of the embedding
        if not hf_name.startswith("model.layers."):
            top = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
            return top.get(hf_name, hf_name), None
        layer, _, rest = hf_name[len("model.layers.") :].partition(".")
        prefix = f"layers.{layer}."
        module, _, kind = rest.rpartition(".")  # kind: weight | bias
        attn = self.layers[0].attn
        q, kv = attn.q_size, attn.kv_size
        inter = self.config.intermediate_size
        fused = {
            "self_attn.q_proj": ("attn.qkv_proj", (0, q)),
            "self_attn.k_proj": ("attn.qkv_proj", (q, q + kv)),
            "self_attn.v_proj": ("attn.qkv_proj", (q + kv, q + 2 * kv)),
            "mlp.gate_proj": ("mlp.gate_up_proj", (0, inter)),
            "mlp.up_proj": ("mlp.gate_up_proj", (inter, 2 * inter)),
        }
        renamed = {
            "self_attn.o_proj": "attn.o_proj",
            "mlp.down_proj": "mlp.down_proj",
            "input_layernorm": "attn_norm",
            "post_attention_layernorm": "mlp_norm",
        }
        if module in fused:
            ours, rows = fused[module]
            return f"{prefix}{ours}.{kind}", rows
        return f"{prefix}{renamed.get(module, module)}.{kind}", None

    @torch.no_grad()
    def init_random_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Fills every weight from N(0, std) (norm weights from N(1, std)); for tests and backend comparisons."""
        generator = torch.Generator().manual_seed(seed)
        for name, param in self.named_parameters():
            values = torch.randn(param.shape, generator=generator) * std
            if name.endswith("norm.weight"):
                values += 1.0
            param.copy_(values)
