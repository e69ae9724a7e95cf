"""Chat templates: equal to transformers' apply_chat_template, HF template helpers, message validation."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models

from tokenmill.tokenizer import CHATML_TEMPLATE, Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 🎉 中文"},
    ],
    [
        {"role": "user", "content": "line one\n\n  indented <b>html</b> & 'quotes'"},
        {"role": "assistant", "content": ""},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(smol, hf_smol, conversation, add_generation_prompt):
    ours = smol.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    theirs = hf_smol.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert smol.encode(ours) == hf_smol.encode(theirs)


def test_smollm2_template_shape(smol):
    text = smol.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<|im_start|>system\n")  # SmolLM2 injects its default system prompt
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = smol.encode(text)
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> first, two <|im_end|>


def test_text_parts_are_joined(smol, hf_smol):
    parts = [{"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]
    joined = [{"role": "user", "content": "first\nsecond"}]
    assert smol.apply_chat_template(parts) == hf_smol.apply_chat_template(
        joined, tokenize=False, add_generation_prompt=True
    )


def test_messages_are_not_mutated(smol):
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    smol.apply_chat_template(messages)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "x"}]}]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a list"),
        ([{"content": "no role"}], "no 'role'"),
        ([{"role": "", "content": "x"}], "no 'role'"),
        ([{"role": "user"}], "has no 'content'"),
        ([{"role": "user", "content": None}], "content None"),
        (["just a string"], r"messages\[0\] must be a dict"),
        ([{"role": "user", "content": 5}], "must be a string or a list"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "unsupported type 'image_url'",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "without a string 'text'"),
        ([{"role": "user", "content": ["bare"]}], r"content\[0\] must be a dict"),
    ],
)
def test_bad_messages_raise(smol, messages, match):
    with pytest.raises(ValueError, match=match):
        smol.apply_chat_template(messages)


def test_assistant_tool_call_without_content_is_accepted():
    tok = _tiny_tokenizer(
        "{% for m in messages %}{{ m.role }}:{{ m.tool_calls | length if m.tool_calls else m.content }};{% endfor %}"
    )
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]},
        ],
        add_generation_prompt=False,
    )
    assert text == "user:weather?;assistant:1;"


def _tiny_tokenizer(template: str | None) -> Tokenizer:
    backend = RustTokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return Tokenizer(backend, bos_token_id=1, eos_token_ids=[2], chat_template=template)


def test_template_helpers_like_transformers():
    template = (
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m | tojson }}|{% endfor %}{{ tools | tojson(indent=2) }}|{{ strftime_now('%Y') }}|{{ eos_token }}"
    )
    tok = _tiny_tokenizer(template)
    messages = [
        {"role": "user", "content": "<b>&'é"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    tools = [{"type": "function", "function": {"name": "f"}}]
    text = tok.apply_chat_template(messages, tools=tools)
    expected = (
        "<s>"
        + json.dumps(messages[0], ensure_ascii=False)
        + "|"
        + json.dumps(messages[1], ensure_ascii=False)
        + "|"
        + json.dumps(tools, indent=2, ensure_ascii=False)
        + "|"
        + str(datetime.now().year)
        + "|</s>"
    )
    assert text == expected


def test_trim_and_lstrip_blocks():
    tok = _tiny_tokenizer("{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb\n"


def test_raise_exception_becomes_value_error():
    tok = _tiny_tokenizer(
        "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    )
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ValueError, match="Conversation must start with user"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_generation_tag_and_kwargs():
    tok = _tiny_tokenizer(
        "{% for m in messages %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endfor %}"
        "{% if enable_thinking %}<think>{% endif %}"
    )
    msgs = [{"role": "assistant", "content": "a"}]
    assert tok.apply_chat_template(msgs) == "[a]"
    assert tok.apply_chat_template(msgs, enable_thinking=True) == "[a]<think>"


def test_sandbox_blocks_unsafe_template():
    tok = _tiny_tokenizer("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_syntax_error_is_value_error():
    tok = _tiny_tokenizer("{% for m in messages %}")
    with pytest.raises(ValueError, match="does not parse"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_chatml_fallback():
    tok = _tiny_tokenizer(None)
    assert not tok.has_chat_template and tok.chat_template == CHATML_TEMPLATE
    text = tok.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert text == "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template([{"role": "user", "content": "u"}], add_generation_prompt=False).endswith(
        "<|im_end|>\n"
    )


def test_named_templates_pick_tool_use():
    tok = _tiny_tokenizer({"default": "plain", "tool_use": "tools:{{ tools | length }}"})
    msgs = [{"role": "user", "content": "x"}]
    assert tok.apply_chat_template(msgs) == "plain"
    assert tok.apply_chat_template(msgs, tools=[{"name": "a"}]) == "tools:1"


def test_continue_final_message(smol):
    msgs = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello, I am"}]
    text = smol.apply_chat_template(msgs, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nHello, I am")
    with pytest.raises(ValueError, match="cannot both be set"):
        smol.apply_chat_template(msgs, add_generation_prompt=True, continue_final_message=True)
