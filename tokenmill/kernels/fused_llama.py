"""FusedLlamaDecoder: the decode step of a loaded LlamaForCausalLM as five fused Triton kernels per layer.

Same contract as the model for decode-only batches (one new token per sequence):
    forward(input_ids [M], positions [M], kv_cache, meta) -> hidden [M, hidden] (after the final norm)
    compute_logits(hidden) -> [M, vocab] fp32
so the runner can capture it in the same per-batch-size CUDA graphs. decode_step() goes one kernel further and
fuses the final norm into the LM head (optionally with a greedy argmax), for callers that want logits directly.

Per layer (see tokenmill/kernels/triton/fused_decode.py):
    qkv_rope_cache -> paged_decode (+ split merge) -> linear_residual(o) -> gate_up_silu -> linear_residual(down)
The decoder reads the model's parameters in place (no copies): [N, K] row-major weights with q/k/v and gate/up
rows stacked, which is also the layout a persistent megakernel streams tile by tile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokenmill.layers.attention_metadata import AttentionMetadata

if TYPE_CHECKING:  # importing tokenmill.kernels.triton imports triton
    from tokenmill.kernels.triton.fused_config import GemvConfig
    from tokenmill.kernels.triton.fused_decode import LMHeadOutput

logger = logging.getLogger(__name__)

FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
GEMV_OPS = ("qkv", "o", "gate_up", "down", "lm_head")


class FusedDecodeUnsupported(ValueError):
    """The fused decode path does not apply to this model or device (the caller falls back to the model)."""


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(Hq + 2 Hkv) D, hidden]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hkv) D] (Qwen2)
    o: torch.Tensor  # [hidden, Hq D]
    mlp_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 I, hidden]
    down: torch.Tensor  # [hidden, I]


def unsupported_reason(model: torch.nn.Module, device: torch.device | str) -> str | None:
    """Why the fused decoder cannot run this model on this device, or None when it can."""
    from tokenmill.kernels.backends import triton_available, triton_interpreted
    from tokenmill.models.llama import LlamaForCausalLM

    device = torch.device(device)
    if type(model) is not LlamaForCausalLM:
        return f"the fused decoder implements the Llama family only, not {type(model).__name__}"
    if model.dtype not in FUSED_DTYPES:
        return f"dtype {model.dtype} is not one of {FUSED_DTYPES}"
    linears = [m for layer in model.layers for m in (layer.attn.qkv_proj, layer.attn.o_proj,
                                                     layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    if getattr(model, "quantized_lm_head", None) is not None or any(type(m) is not torch.nn.Linear for m in linears):
        return "the model's weights are quantized; the fused kernels read plain bf16/fp16/fp32 weights"
    cfg = model.config
    head_dim = cfg.head_dim or 0
    # Tensor-core tiles hold 16 weight rows = 8 RoPE pairs of one head, and reduce K in steps of at least 16.
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16"
    if cfg.hidden_size % 16 or cfg.intermediate_size % 16 or (cfg.num_attention_heads * head_dim) % 16:
        return "hidden_size, intermediate_size and num_heads * head_dim must be multiples of 16"
    if not triton_available():
        return "triton is not installed"
    if device.type != "cuda" and not triton_interpreted():
        return f"the fused kernels run on CUDA (got {device}; TRITON_INTERPRET=1 runs them on the CPU, slowly)"
    params = [model.embed_tokens.weight, model.lm_head_weight, model.norm.weight]
    for layer in model.layers:
        params += [layer.attn.qkv_proj.weight, layer.attn.o_proj.weight, layer.mlp.gate_up_proj.weight,
                   layer.mlp.down_proj.weight, layer.attn_norm.weight, layer.mlp_norm.weight]
    if any(p.device.type != device.type for p in params):
        return "the model's weights are not on the decoder's device"
    if any(p.stride(-1) != 1 for p in params):
        return "a weight is not contiguous along its last dimension"
    return None


# The ops whose kernels RMSNorm their input tile (the heuristic widens their tiles at 32-64 rows).
NORM_FOLDING_OPS = frozenset({"qkv", "gate_up", "lm_head"})


def gemm_shape(config, op: str) -> tuple[int, int, int]:
    """(n, k, pair_half) of a GEMM op, as the fused decoder launches it."""
    c = config
    q_size = c.num_attention_heads * c.head_dim
    return {
        "qkv": (q_size + 2 * c.num_key_value_heads * c.head_dim, c.hidden_size, c.head_dim // 2),
        "o": (c.hidden_size, q_size, 0),
        "gate_up": (2 * c.intermediate_size, c.hidden_size, c.intermediate_size),
        "down": (c.hidden_size, c.intermediate_size, 0),
        "lm_head": (c.vocab_size, c.hidden_size, 0),
    }[op]


class FusedLlamaDecoder:
    # Decode batches above this size run the torch path instead. Measured on H100 (docs/bench/decode_h100_v2.log,
    # 2026-11-26; docs/bench/decode_h100_fused_32_64.json, 2026-11-27, with the 32-64-row tile rules): fused beats
    # torch + graphs at every context up to batch 64 (1.53 vs 2.02 ms at 16 × 1k, 1.75 vs 2.24 at 32 × 1k, 2.39 vs
    # 2.71 at 64 × 1k; 1.69 vs 2.00 at 64 × 128).
    max_batch_size: int = 64

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        use_pdl: bool = True,
        config_overrides: dict[str, dict] | None = None,
    ) -> None:
        """Wraps `model` (a LlamaForCausalLM) without copying its weights.

        use_pdl launches the fused kernels with programmatic dependent launch (Hopper+, when triton supports it;
        otherwise it is turned off with a log line). On by default: on the H100 it is 0.017-0.029 ms per step
        faster in all 15 measured cells, batch 1-16 x context 128-4k (docs/bench/decode_h100_v2.log, 2026-11-26).
        config_overrides maps an op name (qkv, o, gate_up, down, lm_head) to GemvConfig fields that replace the
        heuristic's choice, e.g. {"down": {"split_k": 4}}.
        """
        device = next(model.parameters()).device
        reason = unsupported_reason(model, device)
        if reason is not None:
            raise FusedDecodeUnsupported(reason)
        from tokenmill.kernels.triton.fused_decode import pdl_supported

        unknown = set(config_overrides or {}) - set(GEMV_OPS)
        if unknown:
            raise ValueError(f"unknown ops in config_overrides: {sorted(unknown)}; known: {', '.join(GEMV_OPS)}")
        self.model = model
        self.config = model.config
        self.device = device
        self.dtype = model.dtype
        if use_pdl and not (device.type == "cuda" and pdl_supported(device.index or 0)):
            logger.info("programmatic dependent launch is not available here; launching without it")
            use_pdl = False
        self.use_pdl = use_pdl
        self.config_overrides = {op: dict(v) for op, v in (config_overrides or {}).items()}
        cfg = model.config
        self.num_q_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.scale = model.layers[0].attn.scale
        self.embed = model.embed_tokens.weight
        self.lm_head_weight = model.lm_head_weight
        self.final_norm = model.norm.weight
        self.cos = model.rotary.cos_cache
        self.sin = model.rotary.sin_cache
        self.layers = [
            LayerWeights(
                attn_norm=layer.attn_norm.weight,
                qkv=layer.attn.qkv_proj.weight,
                qkv_bias=layer.attn.qkv_proj.bias,
                o=layer.attn.o_proj.weight,
                mlp_norm=layer.mlp_norm.weight,
                gate_up=layer.mlp.gate_up_proj.weight,
                down=layer.mlp.down_proj.weight,
            )
            for layer in model.layers
        ]
        # Split-K arrival counters; every launch leaves them at zero. Sized for the largest grid at batch 256.
        self.counters = torch.zeros(1 << 16, dtype=torch.int32, device=device)
        self._configs: dict[tuple[str, int], GemvConfig] = {}
        # Debug aid for tests: fill every buffer a kernel is meant to overwrite with NaN first, so an element
        # that no program wrote shows up in the result.
        self.poison_scratch = False

    def _buffer(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        if self.poison_scratch:
            return torch.full(shape, float("nan"), dtype=dtype, device=self.device)
        return torch.empty(shape, dtype=dtype, device=self.device)

    # ---- tile shapes ------------------------------------------------------------------------------------------

    def gemv_config(self, op: str, num_rows: int) -> GemvConfig:
        """The GemvConfig used for `op` at this batch size (heuristic + overrides), cached."""
        key = (op, num_rows)
        if key not in self._configs:
            from tokenmill.kernels.triton.fused_config import check_gemv_config, choose_gemv_config
            from tokenmill.kernels.triton.fused_decode import sm_count

            n, k, pair_half = gemm_shape(self.config, op)
            chosen = choose_gemv_config(num_rows, n, k, sm_count=sm_count(self.device), pair_half=pair_half,
                                        folds_norm=op in NORM_FOLDING_OPS)
            if op in self.config_overrides:
                chosen = chosen.with_(**self.config_overrides[op])
                check_gemv_config(chosen, n, k, pair_half)
            self._configs[key] = chosen
        return self._configs[key]

    # ---- the step ---------------------------------------------------------------------------------------------

    def _check_batch(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                     meta: AttentionMetadata) -> None:
        if not meta.is_decode_only:
            raise ValueError("the fused decoder runs decode-only batches (one new token per sequence)")
        num_rows = input_ids.shape[0]
        if input_ids.dim() != 1 or positions.shape != input_ids.shape or meta.slot_mapping.shape != input_ids.shape:
            raise ValueError("input_ids, positions and meta.slot_mapping must be [num_tokens]")
        if meta.block_tables.shape[0] != num_rows:
            raise ValueError(f"{num_rows} tokens but {meta.block_tables.shape[0]} sequences in a decode batch")
        if kv_cache.shape[0] != len(self.layers):
            raise ValueError(f"kv_cache has {kv_cache.shape[0]} layers, the model has {len(self.layers)}")
        if kv_cache.dtype != self.dtype:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} differs from the model dtype {self.dtype}")

    def residual_stream(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Runs every layer; returns the residual stream [M, hidden] before the final norm."""
        from tokenmill.kernels.triton.decode import paged_decode
        from tokenmill.kernels.triton.fused_decode import gate_up_silu, linear_residual, qkv_rope_cache

        self._check_batch(input_ids, positions, kv_cache, meta)
        num_rows = input_ids.shape[0]
        pdl, counters = self.use_pdl, self.counters
        cfg_qkv, cfg_o = self.gemv_config("qkv", num_rows), self.gemv_config("o", num_rows)
        cfg_gate_up, cfg_down = self.gemv_config("gate_up", num_rows), self.gemv_config("down", num_rows)
        h = F.embedding(input_ids, self.embed)
        q = self._buffer(num_rows, self.num_q_heads, self.head_dim)
        attn = self._buffer(num_rows, self.num_q_heads, self.head_dim)
        act = self._buffer(num_rows, self.config.intermediate_size)
        for layer, kv_cache_layer in zip(self.layers, kv_cache):
            qkv_rope_cache(
                h, layer.attn_norm, self.eps, layer.qkv, layer.qkv_bias, positions, self.cos, self.sin,
                meta.slot_mapping, kv_cache_layer, self.num_q_heads, q_out=q, config=cfg_qkv, counters=counters,
                use_pdl=pdl,
            )
            paged_decode(q, kv_cache_layer, meta.block_tables, meta.seq_lens, self.scale, out=attn)
            linear_residual(attn.view(num_rows, -1), layer.o, h, config=cfg_o, counters=counters, use_pdl=pdl)
            gate_up_silu(h, layer.mlp_norm, self.eps, layer.gate_up, out=act, config=cfg_gate_up,
                         counters=counters, use_pdl=pdl)
            linear_residual(act, layer.down, h, config=cfg_down, counters=counters, use_pdl=pdl)
        return h

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """hidden [M, hidden] after the final norm, as LlamaForCausalLM.forward returns for a decode batch."""
        from tokenmill.kernels.triton.fused_decode import rmsnorm

        h = self.residual_stream(input_ids, positions, kv_cache, meta)
        return rmsnorm(h, self.final_norm, self.eps, out=self._buffer(*h.shape), use_pdl=self.use_pdl)

    __call__ = forward

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] (already normed) -> logits [S, vocab] fp32, like LlamaForCausalLM.compute_logits."""
        from tokenmill.kernels.triton.fused_decode import lm_head

        if hidden.stride(-1) != 1:
            hidden = hidden.contiguous()
        config = self.gemv_config("lm_head", hidden.shape[0]) if hidden.shape[0] else None
        logits = self._buffer(hidden.shape[0], self.config.vocab_size, dtype=torch.float32)
        return lm_head(hidden, self.lm_head_weight, logits_out=logits, config=config, counters=self.counters,
                       use_pdl=self.use_pdl).logits

    @torch.no_grad()
    def decode_step(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        *,
        write_logits: bool = True,
        argmax: bool = False,
    ) -> LMHeadOutput:
        """The whole step with the final norm fused into the LM head: LMHeadOutput(logits | None, tokens | None)."""
        from tokenmill.kernels.triton.fused_decode import lm_head

        h = self.residual_stream(input_ids, positions, kv_cache, meta)
        logits = self._buffer(h.shape[0], self.config.vocab_size, dtype=torch.float32) if write_logits else None
        return lm_head(
            h, self.lm_head_weight, norm_weight=self.final_norm, eps=self.eps, write_logits=write_logits,
            logits_out=logits,
            argmax=argmax, config=self.gemv_config("lm_head", h.shape[0]), counters=self.counters,
            use_pdl=self.use_pdl,
        )


def make_fused_decoder(model: torch.nn.Module, device: torch.device | str, quiet: bool = False,
                       **kwargs) -> FusedLlamaDecoder | None:
    """The fused decoder for `model`, or None (with a log line saying why: a warning, or with `quiet` an info line)
    where it does not apply."""
    reason = unsupported_reason(model, device)
    if reason is not None:
        logger.log(logging.INFO if quiet else logging.WARNING,
                   "decode backend 'fused' does not apply (%s); decoding with the torch model instead", reason)
        return None
    return FusedLlamaDecoder(model, **kwargs)
