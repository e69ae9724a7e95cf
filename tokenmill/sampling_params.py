"""SamplingParams: what a request asks of the sampler, validated once on entry."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16  # None: up to the model length
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per sampled token (0 = only the sampled one)
    skip_special_tokens: bool = True
    # Looped models (Parcae) only: seed of the loop's initial state. None: the engine's default (its --seed), whose
    # KV the prefix cache shares; any other seed gets its own cache namespace. Other models reject it.
    state_seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(msg)

        if self.n < 1:
            fail(f"n must be >= 1, got {self.n}")
        if self.temperature < 0.0:
            fail(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            fail(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            fail(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0.0:
            fail(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            fail(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.logprobs is not None and self.logprobs < 0:
            fail(f"logprobs must be >= 0, got {self.logprobs}")
        if any(not s for s in self.stop):
            fail("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            fail("stop_token_ids must be non-negative")
        if self.state_seed is not None and (
            isinstance(self.state_seed, bool) or not isinstance(self.state_seed, int)
            or not -(2**63) <= self.state_seed < 2**63
        ):
            fail(f"state_seed must be a 64-bit integer, got {self.state_seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
