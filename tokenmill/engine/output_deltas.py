"""RequestOutputs as per-step deltas, for handing them from the engine's process to the server's.

A RequestOutput is cumulative (the whole text, every token id and logprob so far): building one per step costs the
engine's process time proportional to the output's length, and sending it moves O(length²) bytes over a request's
life. The engine's process reports what is new since the request's last report instead (`LLMEngine.step_deltas`,
made by `OutputProcessor.collect_deltas`); the server side appends it to what it holds and hands on the same
cumulative RequestOutputs the in-process engine gives (`DeltaDecoder`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs


@dataclass
class SequenceDelta:
    index: int
    text: str  # appended to the text so far
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class RequestDelta:
    request_id: str
    prompt_token_ids: list[int] | None  # in a request's first delta only
    outputs: list[SequenceDelta]
    finished: bool
    num_cached_tokens: int
    error: str | None


@dataclass
class _Held:
    prompt_token_ids: list[int]
    texts: list[str]
    token_ids: list[list[int]]
    logprobs: list[list[TokenLogprobs] | None]


class DeltaDecoder:
    """Server side: RequestDeltas in, the cumulative RequestOutputs the engine made out."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}

    def decode(self, delta: RequestDelta) -> RequestOutput:
        held = self._held.get(delta.request_id)
        if held is None:
            if delta.prompt_token_ids is None:
                raise ValueError(f"the first delta of request {delta.request_id!r} has no prompt")
            held = _Held(delta.prompt_token_ids, [], [], [])
        outputs = []
        for i, s in enumerate(delta.outputs):
            if i == len(held.texts):
                held.texts.append("")
                held.token_ids.append([])
                held.logprobs.append([] if s.logprobs is not None else None)
            held.texts[i] += s.text
            held.token_ids[i].extend(s.token_ids)
            lps = held.logprobs[i]
            if lps is not None and s.logprobs is not None:
                lps.extend(s.logprobs)
            outputs.append(CompletionOutput(
                index=s.index,
                text=held.texts[i],
                token_ids=list(held.token_ids[i]),
                logprobs=list(lps) if lps is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            ))
        if delta.finished:
            self._held.pop(delta.request_id, None)
        else:
            self._held[delta.request_id] = held
        return RequestOutput(
            request_id=delta.request_id,
            prompt_token_ids=held.prompt_token_ids,
            outputs=outputs,
            finished=delta.finished,
            num_cached_tokens=delta.num_cached_tokens,
            error=delta.error,
        )

    def __len__(self) -> int:
        return len(self._held)
