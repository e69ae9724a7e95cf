"""Turning cumulative engine outputs into OpenAI responses: whole responses, SSE chunk streams, logprobs, usage."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

from tokenmill.engine.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from tokenmill.serve.generation import raise_if_failed
from tokenmill.serve.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
    UsageInfo,
    make_usage,
    now,
)

# JSON has no -inf; like vLLM, a logprob of -inf (or NaN) is reported as this floor.
LOGPROB_FLOOR = -9999.0


def _safe_logprob(x: float) -> float:
    return LOGPROB_FLOOR if math.isnan(x) or x < LOGPROB_FLOOR else x


@dataclass
class LogprobFormatter:
    """Engine logprobs (token id → Logprob per position) in the completions and the chat formats."""

    tokenizer: Any

    def token_text(self, token_id: int, lp: Logprob | None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion_logprobs(self, out: CompletionOutput, start: int,
                            text_offset: int) -> tuple[CompletionLogprobs, int]:
        """Logprobs of tokens [start, end) in the completions format, and the text offset after them."""
        result = CompletionLogprobs()
        for pos in range(start, min(len(out.token_ids), len(out.logprobs or []))):
            tid = out.token_ids[pos]
            entries: TokenLogprobs = out.logprobs[pos]  # type: ignore[index]
            sampled = entries.get(tid)
            text = self.token_text(tid, sampled)
            result.tokens.append(text)
            result.token_logprobs.append(_safe_logprob(sampled.logprob) if sampled else None)
            result.top_logprobs.append({
                self.token_text(t, lp): _safe_logprob(lp.logprob)
                for t, lp in sorted(entries.items(), key=lambda kv: kv[1].rank)
            })
            result.text_offset.append(text_offset)
            text_offset += len(text)
        return result, text_offset

    def chat_logprobs(self, out: CompletionOutput, start: int, top_n: int) -> ChatChoiceLogprobs:
        content = []
        for pos in range(start, min(len(out.token_ids), len(out.logprobs or []))):
            tid = out.token_ids[pos]
            entries: TokenLogprobs = out.logprobs[pos]  # type: ignore[index]
            sampled = entries.get(tid)
            text = self.token_text(tid, sampled)
            top = [
                ChatTopLogprob(token=(t_text := self.token_text(t, lp)), logprob=_safe_logprob(lp.logprob),
                               bytes=list(t_text.encode("utf-8")))
                for t, lp in sorted(entries.items(), key=lambda kv: kv[1].rank)[:top_n]
            ]
            content.append(ChatTokenLogprob(
                token=text, logprob=_safe_logprob(sampled.logprob) if sampled else LOGPROB_FLOOR,
                bytes=list(text.encode("utf-8")), top_logprobs=top,
            ))
        return ChatChoiceLogprobs(content=content)


# -------------------------------------------------------------------------------------------------------- streaming


@dataclass
class _ChoiceProgress:
    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False


@dataclass
class _StreamState:
    """What has been sent per choice, and the latest output per prompt (for usage)."""

    n: int
    choices: dict[int, _ChoiceProgress] = field(default_factory=dict)
    latest: dict[int, RequestOutput] = field(default_factory=dict)

    def updates(self, prompt_idx: int,
                output: RequestOutput) -> Iterator[tuple[int, _ChoiceProgress, CompletionOutput]]:
        """Choices of this output with something new to send (text, tokens, or their finish)."""
        raise_if_failed(output)
        self.latest[prompt_idx] = output
        for out in sorted(output.outputs, key=lambda o: o.index):
            index = prompt_idx * self.n + out.index
            progress = self.choices.setdefault(index, _ChoiceProgress())
            if progress.finished:
                continue
            if len(out.text) == progress.text_len and len(out.token_ids) == progress.num_tokens and not out.finished:
                continue
            yield index, progress, out

    def usage(self) -> UsageInfo:
        return usage_of(list(self.latest.values()))


def usage_of(outputs: list[RequestOutput]) -> UsageInfo:
    return make_usage(
        prompt_tokens=sum(len(o.prompt_token_ids) for o in outputs),
        completion_tokens=sum(len(c.token_ids) for o in outputs for c in o.outputs),
        cached_tokens=sum(max(o.num_cached_tokens, 0) for o in outputs),
    )


# Characters that JSON leaves raw but Python's str.splitlines (and so httpx's iter_lines, which many clients read SSE
# with) treats as line breaks: a chunk of model text holding one would reach such a client cut in two. Inside a JSON
# payload they can only sit in strings, where the escaped form parses to the same text.
_LINE_BREAKS_JSON_KEEPS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(payload: str) -> str:
    """One server-sent event carrying a JSON payload."""
    # The membership tests run in C; str.translate looks up every character in Python (5 % of a busy server's time).
    if "\x85" in payload or "\u2028" in payload or "\u2029" in payload:
        payload = payload.translate(_LINE_BREAKS_JSON_KEEPS)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class _ChunkJSON:
    """The JSON of a stream's plain chunks (one choice, no logprobs) from a template, byte for byte what the pydantic
    response models dump: those chunks are nearly all a stream sends, and building and dumping two models for each
    was a fifth of a busy server's time. Other chunks (logprobs, usage) go through the models."""

    def __init__(self, response_id: str, obj: str, created: int, model_name: str) -> None:
        self.head = (f'{{"id":{_json(response_id)},"object":"{obj}","created":{created},'
                     f'"model":{_json(model_name)},"choices":[{{"index":')

    def chunk(self, index: int, body: str, finish_reason: str | None, stop_reason: int | str | None) -> str:
        return (f'{self.head}{index},{body},"logprobs":null,"finish_reason":{_json(finish_reason)},'
                f'"stop_reason":{_json(stop_reason)}}}],"usage":null}}')


def _json(value: Any) -> str:
    """Compact JSON of a str, int or None, as pydantic writes it (non-ASCII characters unescaped)."""
    return json.dumps(value, ensure_ascii=False)


class CompletionStream:
    """SSE payloads of a /v1/completions stream: one chunk per choice that moved, then (if asked) usage."""

    def __init__(self, model_name: str, tokenizer: Any, response_id: str, n: int, echo_texts: list[str] | None,
                 want_logprobs: bool, include_usage: bool) -> None:
        self.model_name = model_name
        self.id = response_id
        self.created = now()  # one timestamp for every chunk of the response, as OpenAI's streams have
        self.plain = _ChunkJSON(response_id, "text_completion", self.created, model_name)
        self.state = _StreamState(n)
        self.echo_texts = echo_texts
        self.want_logprobs = want_logprobs
        self.include_usage = include_usage
        self.formatter = LogprobFormatter(tokenizer)

    def start(self) -> list[str]:
        return []

    def chunks(self, prompt_idx: int, output: RequestOutput) -> Iterator[str]:
        for index, progress, out in self.state.updates(prompt_idx, output):
            text = out.text[progress.text_len:]
            if not progress.started and self.echo_texts is not None:
                text = self.echo_texts[prompt_idx] + text
            progress.started = True
            logprobs = None
            if self.want_logprobs and out.logprobs is not None:
                logprobs, progress.text_offset = self.formatter.completion_logprobs(out, progress.num_tokens,
                                                                                progress.text_offset)
            progress.text_len, progress.num_tokens = len(out.text), len(out.token_ids)
            progress.finished = out.finished
            if logprobs is None:
                yield self.plain.chunk(index, f'"text":{_json(text)}', out.finish_reason, out.stop_reason)
                continue
            choice = CompletionStreamChoice(index=index, text=text, logprobs=logprobs,
                                            finish_reason=out.finish_reason, stop_reason=out.stop_reason)
            yield self._chunk([choice])

    def usage_chunk(self) -> str:
        return self._chunk([], self.state.usage())

    def _chunk(self, choices: list[CompletionStreamChoice], usage: UsageInfo | None = None) -> str:
        return CompletionStreamResponse(id=self.id, created=self.created, model=self.model_name, choices=choices,
                                        usage=usage).model_dump_json()


class ChatStream:
    """SSE payloads of a /v1/chat/completions stream: role chunks first, then content deltas, then (if asked) usage."""

    def __init__(self, model_name: str, tokenizer: Any, response_id: str, n: int, top_logprobs: int | None,
                 include_usage: bool) -> None:
        self.model_name = model_name
        self.id = response_id
        self.created = now()
        self.plain = _ChunkJSON(response_id, "chat.completion.chunk", self.created, model_name)
        self.n = n
        self.state = _StreamState(n)
        self.top_logprobs = top_logprobs
        self.include_usage = include_usage
        self.formatter = LogprobFormatter(tokenizer)

    def start(self) -> list[str]:
        # OpenAI's first chunk of each choice announces the role with empty content.
        return [self._chunk([ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
                for i in range(self.n)]

    def chunks(self, prompt_idx: int, output: RequestOutput) -> Iterator[str]:
        for index, progress, out in self.state.updates(prompt_idx, output):
            text = out.text[progress.text_len:]
            logprobs = None
            if self.top_logprobs is not None and out.logprobs is not None:
                logprobs = self.formatter.chat_logprobs(out, progress.num_tokens, self.top_logprobs)
            progress.text_len, progress.num_tokens = len(out.text), len(out.token_ids)
            progress.finished = out.finished
            if logprobs is None:
                delta = f'"delta":{{"content":{_json(text)}}}' if text else '"delta":{}'
                yield self.plain.chunk(index, delta, out.finish_reason, out.stop_reason)
                continue
            choice = ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=text or None),
                                                logprobs=logprobs, finish_reason=out.finish_reason,
                                                stop_reason=out.stop_reason)
            yield self._chunk([choice])

    def usage_chunk(self) -> str:
        return self._chunk([], self.state.usage())

    def _chunk(self, choices: list[ChatCompletionStreamChoice], usage: UsageInfo | None = None) -> str:
        return ChatCompletionStreamResponse(id=self.id, created=self.created, model=self.model_name,
                                            choices=choices, usage=usage).model_dump_json()


def completion_response(model_name: str, tokenizer: Any, response_id: str, n: int, outputs: list[RequestOutput],
                        echo_texts: list[str] | None) -> CompletionResponse:
    formatter = LogprobFormatter(tokenizer)
    choices = []
    for prompt_idx, output in enumerate(outputs):
        for out in sorted(output.outputs, key=lambda o: o.index):
            prefix = echo_texts[prompt_idx] if echo_texts is not None else ""
            logprobs = formatter.completion_logprobs(out, 0, len(prefix))[0] if out.logprobs is not None else None
            choices.append(CompletionChoice(index=prompt_idx * n + out.index, text=prefix + out.text,
                                            logprobs=logprobs, finish_reason=out.finish_reason,
                                            stop_reason=out.stop_reason))
    return CompletionResponse(id=response_id, model=model_name, choices=choices, usage=usage_of(outputs))


def chat_response(model_name: str, tokenizer: Any, response_id: str, output: RequestOutput,
                  top_logprobs: int | None) -> ChatCompletionResponse:
    formatter = LogprobFormatter(tokenizer)
    choices = []
    for out in sorted(output.outputs, key=lambda o: o.index):
        logprobs = None
        if top_logprobs is not None and out.logprobs is not None:
            logprobs = formatter.chat_logprobs(out, 0, top_logprobs)
        choices.append(ChatCompletionChoice(index=out.index, message=ChatResponseMessage(content=out.text),
                                            logprobs=logprobs, finish_reason=out.finish_reason,
                                            stop_reason=out.stop_reason))
    return ChatCompletionResponse(id=response_id, model=model_name, choices=choices, usage=usage_of([output]))
