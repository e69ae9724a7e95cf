"""The stream chunks' template JSON against the pydantic response models it stands in for."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.serve.protocol import (
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionStreamChoice,
    CompletionStreamResponse,
    DeltaMessage,
)
from tokenmill.serve.render import _ChunkJSON, sse

texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40)  # any text but lone surrogates
names = st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
finish_reasons = st.sampled_from([None, "stop", "length", "abort"])
stop_reasons = st.one_of(st.none(), st.integers(-1, 200_000), texts)


@settings(max_examples=300, deadline=None)
@given(text=texts, index=st.integers(0, 16), finish=finish_reasons, stop=stop_reasons, model=names, rid=names,
       created=st.integers(0, 2**40))
def test_completion_chunk_matches_the_model(text, index, finish, stop, model, rid, created):
    template = _ChunkJSON(rid, "text_completion", created, model)
    got = template.chunk(index, f'"text":{json.dumps(text, ensure_ascii=False)}', finish, stop)
    want = CompletionStreamResponse(id=rid, created=created, model=model, choices=[CompletionStreamChoice(
        index=index, text=text, finish_reason=finish, stop_reason=stop)]).model_dump_json()
    assert got == want
    assert sse(got) == sse(want)


@settings(max_examples=300, deadline=None)
@given(text=texts, index=st.integers(0, 16), finish=finish_reasons, stop=stop_reasons, model=names, rid=names)
def test_chat_chunk_matches_the_model(text, index, finish, stop, model, rid):
    template = _ChunkJSON(rid, "chat.completion.chunk", 1_700_000_000, model)
    delta = f'"delta":{{"content":{json.dumps(text, ensure_ascii=False)}}}' if text else '"delta":{}'
    got = template.chunk(index, delta, finish, stop)
    want = ChatCompletionStreamResponse(id=rid, created=1_700_000_000, model=model, choices=[
        ChatCompletionStreamChoice(index=index, delta=DeltaMessage(content=text or None), finish_reason=finish,
                                   stop_reason=stop)]).model_dump_json()
    assert got == want


@given(text=texts)
def test_sse_keeps_each_event_on_one_line_for_splitlines_readers(text):
    payload = json.dumps({"text": text}, ensure_ascii=False)
    event = sse(payload)
    assert event.startswith("data: ") and event.endswith("\n\n")
    line = event[len("data: "):-2]
    assert line.splitlines() == [line] or line == ""
    assert json.loads(line) == {"text": text}
