"""A small deterministic stand-in for AsyncEngine, with switchable failure modes, for the server's tests."""

from __future__ import annotations

import asyncio
import copy
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from tokenmill.config import EngineConfig, ModelConfig, SchedulerConfig
from tokenmill.engine.outputs import (
    CompletionOutput,
    FinishedRequestStats,
    Logprob,
    RequestOutput,
    SchedulerStats,
)
from tokenmill.sampling_params import SamplingParams

PAD, BOS, EOS = 0, 1, 2
SPECIALS = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
BYTE_OFFSET = 3
# Every completion spells this text, shifted by 3 characters per choice index.
PATTERN = "hello world "


class FakeTokenizer:
    """Byte-level: id = byte + 3; ids 0..2 are <pad>, <s>, </s>."""

    vocab_size = 256 + BYTE_OFFSET
    eos_token_ids = [EOS]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        return [BOS] + ids if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        out, buf = [], bytearray()
        for t in ids:
            if t in SPECIALS:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special_tokens:
                    out.append(SPECIALS[t])
            else:
                buf.append(t - BYTE_OFFSET)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        if not messages:
            raise ValueError("no messages")
        if messages[0]["role"] == "assistant":
            raise ValueError("a conversation must not start with an assistant message")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if tools:
            text = f"tools: {len(tools)}\n" + text
        return text + ("assistant: " if add_generation_prompt else "")


@dataclass
class Call:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    progress: bool = True


@dataclass
class FakeEngine:
    max_model_len: int = 128
    token_delay: float = 0.0  # seconds between steps
    fail_after: int | None = None  # after this many tokens a request ends with finish_reason "error" (NaN logits)
    fail_only_with_token: int | None = None  # restrict fail_after to prompts containing this token id
    crash_after: int | None = None  # after this many tokens generate() raises RuntimeError
    reject_message: str | None = None  # generate() raises ValueError(reject_message) before yielding
    block_size: int = 4
    healthy: bool = True
    config: EngineConfig = field(default_factory=lambda: EngineConfig(
        served_model_name="fake-model", max_logprobs=5, scheduler=SchedulerConfig(max_model_len=128)))
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    calls: list[Call] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    observers: list[Any] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # ("start" | "finish", request_id), in order
    _seen: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.model_config = ModelConfig(vocab_size=self.tokenizer.vocab_size, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                                        eos_token_ids=[EOS])

    def attach_observer(self, observer: Any) -> None:
        self.observers.append(observer)

    def is_healthy(self) -> bool:
        return self.healthy

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def _cached_tokens(self, prompt: list[int]) -> int:
        best = 0
        for seen in self._seen:
            common = 0
            for a, b in zip(seen, prompt):
                if a != b:
                    break
                common += 1
            best = max(best, common)
        self._seen.append(list(prompt))
        return min(best, len(prompt) - 1) // self.block_size * self.block_size

    @staticmethod
    def token_for(index: int, step: int) -> int:
        return ord(PATTERN[(step + 3 * index) % len(PATTERN)]) + BYTE_OFFSET

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str, progress: bool = True) -> AsyncIterator[RequestOutput]:
        if self.reject_message is not None:
            raise ValueError(self.reject_message)
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_token_ids)} tokens is too long")
        self.calls.append(Call(request_id, list(prompt_token_ids), params, progress))
        self.events.append(("start", request_id))
        start = time.monotonic()
        cached = self._cached_tokens(prompt_token_ids)
        max_tokens = min(params.max_tokens or self.max_model_len, self.max_model_len - len(prompt_token_ids))
        outs = [CompletionOutput(index=i, text="", token_ids=[], logprobs=[] if params.logprobs is not None else None)
                for i in range(params.n)]
        error = None
        step = 0
        fails = self.fail_after is not None and (self.fail_only_with_token is None
                                                 or self.fail_only_with_token in prompt_token_ids)
        while not all(o.finished for o in outs):
            await asyncio.sleep(self.token_delay)
            if request_id in self.aborted:
                for o in outs:
                    o.finish_reason = o.finish_reason or "abort"
                yield RequestOutput(request_id, list(prompt_token_ids), copy.deepcopy(outs), True, cached)
                return
            if self.crash_after is not None and step >= self.crash_after:
                raise RuntimeError("the fake engine crashed")
            for o in (o for o in outs if not o.finished):
                if fails and step >= self.fail_after:
                    o.finish_reason = "error"
                    error = "NaN or inf in the logits"
                    continue
                tok = self.token_for(o.index, step)
                o.token_ids.append(tok)
                if o.logprobs is not None:
                    entries = {tok: Logprob(-0.25, 1, None)}
                    for k in range(params.logprobs or 0):
                        entries[BYTE_OFFSET + ord("A") + k] = Logprob(-2.0 - k, k + 2, None)
                    o.logprobs.append(entries)
                text = self.tokenizer.decode(o.token_ids, params.skip_special_tokens)
                for s in params.stop:
                    at = text.find(s)
                    if at >= 0:
                        text = text[: at + (len(s) if params.include_stop_str_in_output else 0)]
                        o.finish_reason, o.stop_reason = "stop", s
                        break
                if not o.finished and tok in params.stop_token_ids:
                    o.finish_reason, o.stop_reason = "stop", tok
                if not o.finished and len(o.token_ids) >= max_tokens:
                    o.finish_reason = "length"
                o.text = text
            elapsed = time.monotonic() - start
            for obs in self.observers:
                obs.on_step(SchedulerStats(
                    num_running=1, num_waiting=0, kv_cache_usage=0.5,
                    prefix_cache_queries=len(prompt_token_ids) if step == 0 else 0,
                    prefix_cache_hits=cached if step == 0 else 0,
                    num_prompt_tokens=len(prompt_token_ids) - cached if step == 0 else 0,
                    num_generation_tokens=params.n))
                if step == 0:
                    obs.on_first_token(elapsed)
                else:
                    obs.on_inter_token(self.token_delay)
            step += 1
            done = all(o.finished for o in outs)
            if done:  # bookkeeping happens before the last yield: the server stops iterating after it
                self._finish(request_id, prompt_token_ids, outs, cached, start, error)
            yield RequestOutput(request_id, list(prompt_token_ids), copy.deepcopy(outs), done, cached, error)

    def _finish(self, request_id: str, prompt: list[int], outs: list[CompletionOutput], cached: int, start: float,
                error: str | None) -> None:
        self.finished.append(request_id)
        self.events.append(("finish", request_id))
        for obs in self.observers:
            obs.on_finished(FinishedRequestStats(
                finish_reason="error" if error else outs[0].finish_reason, num_prompt_tokens=len(prompt),
                num_generation_tokens=sum(len(o.token_ids) for o in outs), num_cached_tokens=cached,
                e2e_latency=time.monotonic() - start, ttft=None, corrupted=error is not None))
