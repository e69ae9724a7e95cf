"""LLM: the offline Python API.

    from tokenmill import LLM, SamplingParams
    llm = LLM()  # the default model, SmolLM2-135M-Instruct
    for out in llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0)):
        print(out.outputs[0].text)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig, batch_limits
from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

_CACHE_KEYS = {"block_size", "num_blocks", "kv_cache_memory_bytes", "gpu_memory_utilization", "enable_prefix_caching"}
_SCHED_KEYS = {"max_num_seqs", "max_num_batched_tokens", "max_model_len", "enable_chunked_prefill",
               "long_prefill_token_threshold"}


def make_engine_config(model: str | None = None, **kwargs: Any) -> EngineConfig:
    """Builds an EngineConfig from flat keyword arguments (vLLM's LLM(...) style). On a GPU, batch limits left
    unset are the CLI's GPU defaults (config.batch_limits)."""
    cache = CacheConfig(**{k: kwargs.pop(k) for k in list(kwargs) if k in _CACHE_KEYS})
    sched_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in _SCHED_KEYS}
    config = EngineConfig(model=model, cache=cache, scheduler=SchedulerConfig(**sched_kwargs), **kwargs)
    if config.resolved_device().type == "cuda":
        sched = config.scheduler
        sched.max_num_seqs, sched.max_num_batched_tokens = batch_limits(
            True, sched_kwargs.get("max_num_seqs"), sched_kwargs.get("max_num_batched_tokens"),
            cpu_defaults=(sched.max_num_seqs, sched.max_num_batched_tokens))
    return config


class LLM:
    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = LLMEngine(make_engine_config(model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        token_prompts = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        return self.engine.generate_blocking(token_prompts, sampling_params or SamplingParams())

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            self.tokenizer.encode(self.tokenizer.apply_chat_template(c), add_special_tokens=False)
            for c in conversations
        ]
        return self.engine.generate_blocking(prompts, sampling_params or SamplingParams())
