"""Per-step deltas between the engine's process and the server's rebuild exactly the cumulative outputs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.engine.output_deltas import DeltaDecoder, DeltaEncoder
from tokenmill.engine.outputs import CompletionOutput, Logprob, RequestOutput


def _history(draw, n_seqs: int, steps: int, with_logprobs: bool, shrink_at: int | None) -> list[RequestOutput]:
    """A request's cumulative outputs over `steps` steps; the last one finished."""
    texts = [""] * n_seqs
    tokens: list[list[int]] = [[] for _ in range(n_seqs)]
    logprobs: list[list] = [[] for _ in range(n_seqs)]
    history = []
    for step in range(steps):
        last = step == steps - 1
        outputs = []
        for i in range(n_seqs):
            grow = draw(st.integers(0, 3))
            if step == shrink_at and tokens[i]:  # shorter than before (the engine never does it): travels whole
                texts[i], tokens[i], logprobs[i] = texts[i][:1], tokens[i][:-1], logprobs[i][:-1]
                grow = 0
            else:
                texts[i] += draw(st.text(max_size=4))
            new = draw(st.lists(st.integers(0, 50_000), min_size=grow, max_size=grow))
            tokens[i] += new
            logprobs[i] += [{t: Logprob(-0.5, 1, str(t))} for t in new]
            outputs.append(CompletionOutput(
                index=i, text=texts[i], token_ids=list(tokens[i]),
                logprobs=list(logprobs[i]) if with_logprobs else None,
                finish_reason="length" if last else None, stop_reason=None,
            ))
        history.append(RequestOutput("req", [1, 2, 3], outputs, finished=last, num_cached_tokens=step,
                                     error="boom" if last and shrink_at == 0 else None))
    return history


@st.composite
def histories(draw):
    n_requests = draw(st.integers(1, 3))
    result = []
    for r in range(n_requests):
        steps = draw(st.integers(1, 6))
        shrink_at = draw(st.one_of(st.none(), st.integers(0, steps - 1)))
        history = _history(draw, draw(st.integers(1, 3)), steps, draw(st.booleans()), shrink_at)
        for out in history:
            out.request_id = f"req{r}"
        result.append(history)
    return result


@settings(max_examples=150, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_decoded_outputs_equal_the_engines(histories, rng):
    encoder, decoder = DeltaEncoder(), DeltaDecoder()
    # interleave the requests' steps as the engine's steps would
    queues = [list(h) for h in histories]
    while any(queues):
        q = rng.choice([q for q in queues if q])
        out = q.pop(0)
        assert decoder.decode(encoder.encode(out)) == out
    assert len(decoder) == 0  # finished requests are forgotten on both sides


def test_deltas_carry_only_what_is_new():
    encoder = DeltaEncoder()
    out = RequestOutput("r", [7] * 100, [CompletionOutput(0, "ab", [1, 2])], finished=False)
    first = encoder.encode(out)
    assert first.prompt_token_ids == [7] * 100 and first.outputs[0].token_ids == [1, 2]
    out = RequestOutput("r", [7] * 100, [CompletionOutput(0, "abc", [1, 2, 3])], finished=False)
    second = encoder.encode(out)
    assert second.prompt_token_ids is None
    assert (second.outputs[0].text, second.outputs[0].token_ids, second.outputs[0].reset) == ("c", [3], False)
