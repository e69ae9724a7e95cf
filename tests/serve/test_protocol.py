"""Request models: parsing prompts and messages, and turning requests into SamplingParams."""

import pytest

from tokenmill.serve.protocol import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMessage,
    InvalidRequest,
)


def completion(**kw):
    return CompletionRequest.model_validate({"prompt": "hi", **kw})


def chat(**kw):
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **kw})


def test_prompt_shapes():
    assert completion(prompt="a").prompts() == ["a"]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert completion(prompt=[5, 6]).prompts() == [[5, 6]]
    assert completion(prompt=[[5], [6, 7]]).prompts() == [[5], [6, 7]]
    with pytest.raises(InvalidRequest):
        completion(prompt=[]).prompts()
    with pytest.raises(InvalidRequest):
        completion(prompt=[[1], []]).prompts()


def test_token_ids_must_be_integers():
    with pytest.raises(ValueError):
        CompletionRequest.model_validate({"prompt": [1, 2.5]})
    with pytest.raises(ValueError):
        CompletionRequest.model_validate({"prompt": [True, 3]})


def test_sampling_params_carry_every_field():
    req = completion(max_tokens=7, temperature=0.3, top_p=0.9, n=2, stop="x", seed=4, presence_penalty=0.5,
                     frequency_penalty=-0.5, top_k=5, min_p=0.1, repetition_penalty=1.2, min_tokens=2,
                     ignore_eos=True, stop_token_ids=[9], skip_special_tokens=False,
                     include_stop_str_in_output=True, logprobs=3)
    p = req.to_sampling_params(max_model_len=100, prompt_len=10, max_logprobs=5)
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (7, 0.3, 0.9, 2, ["x"], 4)
    assert (p.presence_penalty, p.frequency_penalty, p.top_k, p.min_p, p.repetition_penalty) == (0.5, -0.5, 5, 0.1, 1.2)
    assert (p.min_tokens, p.ignore_eos, p.stop_token_ids, p.skip_special_tokens) == (2, True, [9], False)
    assert p.include_stop_str_in_output and p.logprobs == 3


def test_max_tokens_defaults_and_limits():
    assert completion().to_sampling_params(100, 10).max_tokens == COMPLETION_DEFAULT_MAX_TOKENS
    assert completion().to_sampling_params(100, 95).max_tokens == 5  # the default shrinks to fit
    assert chat().to_sampling_params(100, 10).max_tokens == 90  # chat: up to the model length
    assert chat(max_tokens=50, max_completion_tokens=20).to_sampling_params(100, 10).max_tokens == 20
    with pytest.raises(InvalidRequest, match="maximum context length is 100") as e:
        completion(max_tokens=91).to_sampling_params(100, 10)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(InvalidRequest, match="at least 1"):
        completion(max_tokens=0).to_sampling_params(100, 10)
    with pytest.raises(InvalidRequest, match="maximum context length"):
        chat().to_sampling_params(100, 100)


def test_invalid_values_raise_invalid_request_with_param():
    with pytest.raises(InvalidRequest) as e:
        completion(top_p=0.0).to_sampling_params(100, 10)
    assert e.value.param == "top_p"
    with pytest.raises(InvalidRequest, match="logprobs must be <= 5"):
        completion(logprobs=6).to_sampling_params(100, 10, max_logprobs=5)
    with pytest.raises(InvalidRequest, match="stream_options"):
        completion(stream_options={"include_usage": True}).to_sampling_params(100, 10)
    with pytest.raises(InvalidRequest, match="echo"):
        completion(echo=True, logprobs=1).to_sampling_params(100, 10)
    with pytest.raises(InvalidRequest, match="best_of"):
        completion(best_of=3).to_sampling_params(100, 10)
    with pytest.raises(InvalidRequest, match="top_logprobs requires logprobs"):
        chat(top_logprobs=2).to_sampling_params(100, 10)
    with pytest.raises(InvalidRequest, match="min_tokens"):
        completion(max_tokens=2, min_tokens=3).to_sampling_params(100, 10)


def test_chat_logprobs_mapping():
    assert chat().to_sampling_params(100, 10).logprobs is None
    assert chat(logprobs=True).to_sampling_params(100, 10).logprobs == 0
    assert chat(logprobs=True, top_logprobs=3).to_sampling_params(100, 10).logprobs == 3


def test_chat_messages_to_template_dicts():
    req = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
    ]})
    msgs = req.template_messages()
    assert msgs[0] == {"role": "system", "content": "be brief"}
    assert msgs[1] == {"role": "user", "content": "a\nb"}
    assert msgs[2]["tool_calls"] == [{"id": "1"}]
    with pytest.raises(InvalidRequest, match="only text"):
        ChatCompletionRequest.model_validate({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).template_messages()
    with pytest.raises(InvalidRequest, match="needs a 'text' string"):  # was "only text ... got type 'text'"
        ChatCompletionRequest.model_validate({"messages": [
            {"role": "user", "content": [{"type": "text"}]}]}).template_messages()
    with pytest.raises(InvalidRequest, match="content is required"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user"}]}).template_messages()
    with pytest.raises(InvalidRequest, match="at least one"):
        ChatCompletionRequest.model_validate({"messages": []}).template_messages()


def test_delta_omits_unset_fields():
    assert DeltaMessage(content="x").model_dump() == {"content": "x"}
    assert DeltaMessage(role="assistant", content="").model_dump() == {"role": "assistant", "content": ""}


def test_sse_events_survive_clients_that_split_like_str_splitlines():
    """JSON leaves U+0085, U+2028 and U+2029 raw; httpx's iter_lines (and str.splitlines) break lines there."""
    import json

    from tokenmill.serve.render import sse

    text = "one\u2028two\x85three\u2029four\nfive"
    event = sse(json.dumps({"text": text}, ensure_ascii=False))
    lines = event.splitlines()
    assert len(lines) == 2 and lines[0].startswith("data: ") and lines[1] == ""
    assert json.loads(lines[0][len("data: "):]) == {"text": text}
