"""Pydantic models of the OpenAI HTTP API (completions, chat completions, models, errors) plus vLLM's extras.

Requests turn themselves into SamplingParams via `to_sampling_params`, which raises `InvalidRequest` (a ValueError)
with a message a client can act on; the server maps that to an HTTP 400 in OpenAI's error format.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, model_serializer, model_validator

from tokenmill.sampling_params import SamplingParams

# A token id must be a JSON integer: no bools, floats or numeric strings sneaking in as ids.
TokenId = Annotated[int, Strict()]

# max_tokens default for /v1/completions when the client omits it (OpenAI's and vLLM's default).
COMPLETION_DEFAULT_MAX_TOKENS = 16

# OpenAI's limit on n. Each choice is a sequence in the engine, so an unbounded n could exhaust the host's memory.
MAX_N = 128


class InvalidRequest(ValueError):
    """A request the server refuses (HTTP 400); `param` names the offending field, `code` is OpenAI's error code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# ----------------------------------------------------------------------------------------------------------- errors


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# ----------------------------------------------------------------------------------------------------- shared parts


class StreamOptions(BaseModel):
    include_usage: bool = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


def make_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


class _SamplingFields(BaseModel):
    """Fields shared by both endpoints: OpenAI's sampling knobs and vLLM's extras."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # tokenmill extra (openai client: extra_body={"state_seed": 7}): Parcae models' initial loop-state seed
    state_seed: int | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's API (and vLLM) take an explicit null for any optional field (n, stream, presence_penalty, ...) as
        # "use the default", and some clients send one.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    def _check_common(self) -> None:
        if self.n > MAX_N:
            raise InvalidRequest(f"n must be <= {MAX_N}, got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        if self.logit_bias:
            raise InvalidRequest("logit_bias is not supported", param="logit_bias")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise InvalidRequest(f"response_format {self.response_format.get('type')!r} is not supported (no guided "
                                 "decoding): only {'type': 'text'}", param="response_format")

    def _build_params(
        self, max_tokens: int | None, default_max_tokens: int | None, max_model_len: int, prompt_len: int,
        logprobs: int | None,
    ) -> SamplingParams:
        room = max_model_len - prompt_len
        if room < 1:
            raise InvalidRequest(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
                f"{prompt_len} tokens, which leaves no room for the completion. "
                "Please reduce the length of the prompt.",
                param="messages" if isinstance(self, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        if max_tokens is None:
            # The server's default never fails a request: it shrinks to what fits.
            resolved = room if default_max_tokens is None else min(default_max_tokens, room)
        else:
            if max_tokens < 1:
                raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
            if max_tokens > room:
                raise InvalidRequest(
                    f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                    f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the completion). "
                    "Please reduce the length of the prompt or completion.",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
            resolved = max_tokens
        kwargs: dict[str, Any] = dict(
            n=self.n,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            max_tokens=resolved,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            state_seed=self.state_seed,
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            param = str(e).split(" ", 1)[0]
            raise InvalidRequest(str(e), param=param if param in kwargs else None) from None


def _check_logprobs_count(count: int | None, max_logprobs: int | None, param: str) -> None:
    if count is None:
        return
    if count < 0:
        raise InvalidRequest(f"{param} must be >= 0, got {count}", param=param)
    if max_logprobs is not None and count > max_logprobs:
        raise InvalidRequest(f"{param} must be <= {max_logprobs}, got {count}", param=param)


# ------------------------------------------------------------------------------------------------------ completions


class CompletionRequest(_SamplingFields):
    # Smart-mode union: a list of ints is token ids, a list of lists is a batch of token-id prompts.
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, one entry per prompt (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            items: list[str | list[int]] = [p]
        elif not p:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        elif isinstance(p[0], int):
            items = [list(p)]  # type: ignore[arg-type]
        else:
            items = list(p)  # type: ignore[arg-type]
        for item in items:
            if isinstance(item, list) and not item:
                raise InvalidRequest("a token-id prompt must not be empty", param="prompt")
        return items

    def to_sampling_params(self, max_model_len: int, prompt_len: int,
                           max_logprobs: int | None = None) -> SamplingParams:
        self._check_common()
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of is not supported (it must be omitted or equal to n)", param="best_of")
        if self.suffix:
            raise InvalidRequest("suffix is not supported", param="suffix")
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo together with logprobs is not supported (no prompt logprobs)", param="echo")
        _check_logprobs_count(self.logprobs, max_logprobs, "logprobs")
        return self._build_params(self.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, max_model_len, prompt_len,
                                  self.logprobs)


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionStreamChoice]
    usage: UsageInfo | None = None


# ------------------------------------------------------------------------------------------------------------- chat


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def to_template_dict(self, position: int) -> dict[str, Any]:
        """The plain dict a chat template expects: text parts joined with newlines."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type == "text" and part.text is None:
                    raise InvalidRequest(f"messages[{position}]: a text content part needs a 'text' string",
                                         param=f"messages.{position}.content")
                if part.type != "text":
                    raise InvalidRequest(
                        f"messages[{position}]: only text content parts are supported, got type {part.type!r}",
                        param=f"messages.{position}.content",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and not (self.role == "assistant" and self.tool_calls):
            raise InvalidRequest(f"messages[{position}]: content is required for role {self.role!r}",
                                 param=f"messages.{position}.content")
        out: dict[str, Any] = {"role": self.role, "content": content}
        for key in ("name", "tool_calls", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM extra

    def template_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise InvalidRequest("messages must contain at least one message", param="messages")
        return [m.to_template_dict(i) for i, m in enumerate(self.messages)]

    def to_sampling_params(self, max_model_len: int, prompt_len: int,
                           max_logprobs: int | None = None) -> SamplingParams:
        self._check_common()
        if self.tool_choice not in (None, "none", "auto"):
            # The tools reach the chat template, but nothing can make the model call one.
            raise InvalidRequest("tool_choice must be 'none' or 'auto': forcing a tool call is not supported",
                                 param="tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
        _check_logprobs_count(self.top_logprobs, max_logprobs, "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._build_params(max_tokens, None, max_model_len, prompt_len, logprobs)


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_nones(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only the fields that changed ({"content": "x"}), never explicit nulls.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: UsageInfo | None = None


# ------------------------------------------------------------------------------------------- models, tokenization


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "tokenmill"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(BaseModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None

    def template_messages(self) -> list[dict[str, Any]]:
        if not self.messages:
            raise InvalidRequest("messages must contain at least one message", param="messages")
        return [m.to_template_dict(i) for i, m in enumerate(self.messages)]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str
