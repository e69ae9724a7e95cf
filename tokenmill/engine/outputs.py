"""What the engine hands back: cumulative outputs per request, plus the per-step stats observers consume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely
    decoded_token: str | None = None


# One entry per generated token: the sampled token and the requested top-k alternatives.
TokenLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative decoded text (stop strings removed unless asked to keep them)
    token_ids: list[int]  # cumulative generated token ids
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None


@dataclass
class SchedulerStats:
    """A snapshot after each engine step, for gauges and counters."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks in use by running requests
    prefix_cache_queries: int = 0  # tokens looked up since the last snapshot
    prefix_cache_hits: int = 0  # tokens found since the last snapshot
    num_preemptions: int = 0  # since the last snapshot
    num_prompt_tokens: int = 0  # computed this step
    num_generation_tokens: int = 0  # sampled this step


@dataclass
class FinishedRequestStats:
    finish_reason: str
    num_prompt_tokens: int
    num_generation_tokens: int
    num_cached_tokens: int
    e2e_latency: float
    ttft: float | None
    corrupted: bool = False  # failed because the logits held NaN/inf


class EngineObserver(Protocol):
    """Receives engine events; the server's Prometheus metrics implement this."""

    def on_step(self, stats: SchedulerStats) -> None: ...

    def on_first_token(self, ttft_s: float) -> None: ...

    def on_inter_token(self, itl_s: float) -> None: ...

    def on_finished(self, stats: FinishedRequestStats) -> None: ...


class NullObserver:
    """Ignores every event (the engine's default when nobody listens)."""

    def on_step(self, stats: SchedulerStats) -> None:
        pass

    def on_first_token(self, ttft_s: float) -> None:
        pass

    def on_inter_token(self, itl_s: float) -> None:
        pass

    def on_finished(self, stats: FinishedRequestStats) -> None:
        pass
