"""Configuration dataclasses. Configuration enters once (CLI/API) and flows down; nothing reads globals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(set(_DTYPES))}") from None


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.2, SmolLM2, Qwen2), in Hugging Face's terms."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    architecture: str = "llama"  # llama | qwen2 | parcae (num_hidden_layers: its unrolled KV layers at the served T)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        # transformers 5 writes RoPE settings under "rope_parameters" (rope_theta inside) instead of "rope_scaling".
        rope_parameters = dict(cfg.get("rope_parameters") or {})
        rope_theta = rope_parameters.pop("rope_theta", None)
        rope_scaling = cfg.get("rope_scaling")
        if not rope_scaling and rope_parameters.get("rope_type", rope_parameters.get("type", "default")) != "default":
            rope_scaling = rope_parameters
        eos = cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        qwen = cfg.get("model_type") == "qwen2" or arch.startswith("Qwen2")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
            head_dim=cfg.get("head_dim"),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=cfg.get("rope_theta") or rope_theta or 10000.0,
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", qwen),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            architecture="qwen2" if qwen else "llama",
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elem


@dataclass
class CacheConfig:
    block_size: int = 16
    # Exactly one of these sizes the pool; num_blocks wins when both are given.
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    # A prefill chunk never exceeds this many tokens, so decodes keep flowing while long prompts prefill.
    long_prefill_token_threshold: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len")


# Batch limits where the caller sets none and the engine runs on a GPU (the CLI's and the Python API's; vLLM's
# defaults): enough sequences per step to reach the GPU's throughput at high concurrency.
GPU_MAX_NUM_SEQS = 256
GPU_MAX_NUM_BATCHED_TOKENS = 8192


def batch_limits(on_gpu: bool, max_num_seqs: int | None, max_num_batched_tokens: int | None,
                 cpu_defaults: tuple[int, int]) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens): the given ones, else the GPU defaults or `cpu_defaults`; a defaulted
    token budget is raised to hold one token of every sequence."""
    seqs_default, tokens_default = (GPU_MAX_NUM_SEQS, GPU_MAX_NUM_BATCHED_TOKENS) if on_gpu else cpu_defaults
    seqs = seqs_default if max_num_seqs is None else max_num_seqs  # a given 0 must reach the config's check
    return seqs, max(tokens_default, seqs) if max_num_batched_tokens is None else max_num_batched_tokens

ASYNC_SCHEDULING_CHOICES = ("auto", "on", "off")
CUDAGRAPH_MODES = ("full_and_piecewise", "full_decode_only", "none")


@dataclass
class EngineConfig:
    model: str | None = None  # path, GGUF file, hub id, or None for the default model
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    device: str = "auto"
    seed: int = 0
    # auto | torch | triton | fused | megakernel. auto: on a GPU as megakernel (where each applies: megakernel ->
    # fused -> model, without warnings), on the CPU the model with the best attention.
    decode_backend: str = "auto"
    # With decode_backend megakernel: the largest decode batch it runs at any context; larger ones go to the fused
    # kernels, except steps of up to megakernel_short_context_batch sequences whose longest holds at most
    # megakernel_short_context tokens (0: none; None: the card's default, kernels/megakernel/decoder.py
    # default_short_context: 4096 on H200s, where the megakernel beat fused + PDL at batch 9-16 by 6-17 % up to 4k
    # (docs/bench/decode_h200_m25a_b9_16.json, 2026-11-29), 1536 elsewhere: on the H100 (docs/bench/
    # decode_h100_megakernel_m13.log, 2026-11-27) it won at batch 16 by 3.7 / 2.2 % at 128 / 1k but lost by 6 % at 4k).
    # Batches 1-8 take it at every context (it won every cell measured: 128 to 4k, on both cards).
    megakernel_max_batch: int = 8
    megakernel_short_context_batch: int = 16
    megakernel_short_context: int | None = None
    # Weight-only quantization: auto | none | int8 | int4 (CPU). auto: int4/int8 for a quantized GGUF on CPU when
    # dtype is auto, else none (tokenmill/models/quantization.py).
    quantization: str = "auto"
    enforce_eager: bool = False  # disable CUDA graphs (the same as cudagraph_mode "none")
    # full_and_piecewise | full_decode_only | none (vLLM's names). Decode steps replay whole-step CUDA graphs; with
    # full_and_piecewise, steps with prompt chunks replay each layer's dense parts from graphs around eager attention
    # (engine/piecewise.py).
    cudagraph_mode: str = "full_and_piecewise"
    # auto | on | off. Plan and launch each step before the previous step's tokens reach the host, so host work
    # overlaps the GPU (LLMEngine.step). auto: on for CUDA devices.
    async_scheduling: str = "auto"
    max_logprobs: int = 20
    # On a GPU, draw greedy and plain temperature rows (no penalties, logprobs, top-k/p, min-p or seed) in one fused
    # Triton path (kernels/triton/sample.py) instead of the sampler's ~15 torch operations.
    fused_sampling: bool = True
    # Looped models (Parcae): loops T to serve at; None: the model's own (its config's mean recurrence). The KV cache
    # holds n_prelude + T * n_core + n_coda layers. Other models reject it.
    parcae_recurrence: int | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.parcae_recurrence is not None and self.parcae_recurrence < 1:
            raise ValueError(f"parcae_recurrence must be >= 1, got {self.parcae_recurrence}")
        if self.async_scheduling not in ASYNC_SCHEDULING_CHOICES:
            raise ValueError(f"async_scheduling must be auto, on or off, got {self.async_scheduling!r}")
        if self.cudagraph_mode not in CUDAGRAPH_MODES:
            raise ValueError(f"cudagraph_mode must be one of {', '.join(CUDAGRAPH_MODES)}, got {self.cudagraph_mode!r}")
        if self.megakernel_max_batch < 1:
            raise ValueError(f"megakernel_max_batch must be >= 1, got {self.megakernel_max_batch}")
        if self.megakernel_short_context_batch < 1:
            raise ValueError(f"megakernel_short_context_batch must be >= 1, got {self.megakernel_short_context_batch}")
        if self.megakernel_short_context is not None and self.megakernel_short_context < 0:
            raise ValueError(f"megakernel_short_context must be >= 0, got {self.megakernel_short_context}")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N") from None

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return parse_dtype(self.dtype)
