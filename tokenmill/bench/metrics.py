"""Per-request measurements of a replay and their aggregates (latency percentiles, throughput, cache hits)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds; start_s is relative to the start of the run."""

    session_id: int
    turn: int
    workload: str
    scheduled_s: float  # when the request became due (arrival or previous answer + gap)
    start_s: float  # when it was sent
    ok: bool = False
    error: str | None = None
    status_code: int | None = None
    ttft_s: float | None = None  # first chunk that carries a token
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between token-carrying chunks
    output_tokens: int = 0  # usage.completion_tokens, else token-carrying chunks
    prompt_tokens: int | None = None  # usage.prompt_tokens
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens (or llama.cpp timings.cache_n)
    expected_input_tokens: int = 0  # tokens of the workload's prompt text (without chat-template tokens)
    expected_output_tokens: int = 0
    output_chunks: int = 0

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def end_s(self) -> float | None:
        return None if self.e2e_s is None else self.start_s + self.e2e_s

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tpot_s"] = self.tpot_s
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunResult:
    """Everything one replay produced."""

    requests: list[RequestResult]
    duration_s: float  # first send to last answer
    abandoned_turns: int = 0  # turns never sent because an earlier turn of the session failed
    clipped_gaps: int = 0  # gaps cut to max_gap_s
    label: str = ""
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stat:
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        a = np.asarray([v for v in values if v is not None], dtype=float)
        if a.size == 0:
            return None
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(float(a.mean()), float(p50), float(p90), float(p99), float(a.max()), int(a.size))


@dataclass
class RunSummary:
    num_requests: int
    num_ok: int
    num_failed: int
    num_abandoned: int
    duration_s: float
    request_throughput: float  # successful requests per second
    input_token_throughput: float  # prompt tokens of successful requests per second
    output_token_throughput: float
    total_token_throughput: float
    ttft: Stat | None
    tpot: Stat | None
    itl: Stat | None
    e2e: Stat | None
    prompt_tokens: int
    cached_tokens: int | None  # None when the server reported no cached-token counts
    cache_hit_ratio: float | None  # cached / prompt tokens over requests that reported both
    output_length_match: float | None  # fraction of successful requests that produced the workload's output length
    errors: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def error_kind(error: str | None) -> str:
    if not error:
        return "unknown"
    return error.split(":", 1)[0]


def summarize_run(run: RunResult) -> RunSummary:
    reqs = run.requests
    ok = [r for r in reqs if r.ok]
    dur = run.duration_s if run.duration_s > 0 else math.nan
    prompt = [r.prompt_tokens if r.prompt_tokens is not None else r.expected_input_tokens for r in ok]
    in_tokens = int(sum(prompt))
    out_tokens = int(sum(r.output_tokens for r in ok))
    reported = [r for r in ok if r.cached_tokens is not None and r.prompt_tokens]
    cached = int(sum(r.cached_tokens for r in reported)) if reported else None
    ratio = cached / sum(r.prompt_tokens for r in reported) if reported else None
    match = sum(r.output_tokens == r.expected_output_tokens for r in ok) / len(ok) if ok else None
    return RunSummary(
        num_requests=len(reqs),
        num_ok=len(ok),
        num_failed=len(reqs) - len(ok),
        num_abandoned=run.abandoned_turns,
        duration_s=run.duration_s,
        request_throughput=len(ok) / dur,
        input_token_throughput=in_tokens / dur,
        output_token_throughput=out_tokens / dur,
        total_token_throughput=(in_tokens + out_tokens) / dur,
        ttft=Stat.of([r.ttft_s for r in ok]),
        tpot=Stat.of([r.tpot_s for r in ok]),
        itl=Stat.of([x for r in ok for x in r.itl_s]),
        e2e=Stat.of([r.e2e_s for r in ok]),
        prompt_tokens=in_tokens,
        cached_tokens=cached,
        cache_hit_ratio=ratio,
        output_length_match=match,
        errors=dict(Counter(error_kind(r.error) for r in reqs if not r.ok)),
    )
