"""A request as the scheduler and runner see it: one sequence of tokens and how much of it has KV in the cache."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenmill.sampling_params import SamplingParams


# An output token whose id is still on the device (the engine's async scheduling; Scheduler.advance_ahead).
PLACEHOLDER_TOKEN = -1


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after losing its blocks; recomputed from scratch (or the prefix cache)
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass(eq=False)
class Request:
    """One sequence. `n > 1` in the API becomes n Requests sharing a prompt (and, through the prefix cache, its KV)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16  # resolved: min(sampling_params.max_tokens, max_model_len - prompt length)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are written in the cache (prefix-cache hits included). Tokens past this still need a forward.
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache on the first schedule (reported as usage.cached_tokens).
    num_cached_tokens: int = -1
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of this request's full blocks, extended as tokens are appended.
    block_hashes: list[int] = field(default_factory=list)
    # Parent of the first block's hash when the KV depends on more than the tokens (kv.block_hash.cache_salt);
    # None: hashes depend on the tokens alone, so the prefix cache shares blocks with every other unsalted request.
    cache_salt: int | None = None
    # Seed of a looped model's initial state (Parcae), resolved by the engine; None for models without one.
    state_seed: int | None = None
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
