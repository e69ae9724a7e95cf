"""IncrementalDetokenizer: equals a full decode, never splits a character, bounded work per step, stop strings."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenmill.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_PIECES = [
    "Hello",
    " world",
    " ",
    "\n",
    "🎉",
    "👨‍👩‍👧",
    "中文",
    "测试",
    "é",
    "ñ",
    "<|im_end|>",
    "<|im_start|>",
    "42",
    "ab",
    "😀😃",
]
_TEXT = st.lists(st.one_of(st.sampled_from(_PIECES), st.text(max_size=3)), max_size=20).map("".join)


def _chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)] if sizes else 1
        out.append(ids[i : i + n])
        i, k = i + n, k + 1
    return out


def _stream(detok: IncrementalDetokenizer, chunks: list[list[int]]) -> tuple[list[str], str | None]:
    deltas, hit = [], None
    for chunk in chunks:
        update = detok.update(chunk)
        assert isinstance(update, DetokenizerUpdate)
        deltas.append(update.delta_text)
        if update.stop_str_hit is not None:
            hit = update.stop_str_hit
            break
    else:
        deltas.append(detok.flush().delta_text)
    return deltas, hit


def _special_heavy_ids(vocab_size: int):
    # byte tokens (ids 100-400 hold many single bytes / partial characters in SmolLM2) and special tokens 0-16
    return st.one_of(st.integers(0, vocab_size - 1), st.integers(0, 16), st.integers(100, 400))


@_SETTINGS
@given(data=st.data())
def test_random_ids_equal_full_decode(smol, data):
    ids = data.draw(st.lists(_special_heavy_ids(smol.vocab_size), max_size=40))
    prompt = data.draw(st.lists(_special_heavy_ids(smol.vocab_size), max_size=8))
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=5))
    skip = data.draw(st.booleans())
    detok = IncrementalDetokenizer(smol, prompt, skip, [], False)
    deltas, hit = _stream(detok, _chunks(ids, sizes))
    assert hit is None
    assert "".join(deltas) == detok.output_text == smol.decode(ids, skip_special_tokens=skip)


@_SETTINGS
@given(text=_TEXT, prompt_text=_TEXT, sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4), skip=st.booleans())
def test_text_streams_whole_characters(smol, text, prompt_text, sizes, skip):
    ids = smol.encode(text)
    detok = IncrementalDetokenizer(smol, smol.encode(prompt_text), skip, [], False)
    deltas, _ = _stream(detok, _chunks(ids, sizes))
    expected = smol.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == expected
    if "\ufffd" not in expected:
        assert all("\ufffd" not in d for d in deltas)  # never half of a multi-byte character


def test_emoji_is_held_until_complete(smol):
    ids = smol.encode("🎉")
    assert len(ids) > 1  # one emoji, several byte tokens
    detok = IncrementalDetokenizer(smol, [], True, [], False)
    deltas = [detok.update([t]).delta_text for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🎉"


def test_incomplete_tail_is_flushed_at_the_end(smol):
    ids = smol.encode("ok🎉")[:-1]  # cut inside the emoji
    detok = IncrementalDetokenizer(smol, [], True, [], False)
    assert "".join(detok.update([t]).delta_text for t in ids) == "ok"
    assert detok.update([], final=True).delta_text == smol.decode(ids)[2:]
    assert detok.output_text == smol.decode(ids)


class _CountingTokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.window_sizes = tokenizer, []

    def decode(self, ids, skip_special_tokens=True):
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_step_is_bounded(smol):
    text = ("The quick brown fox 🦊 jumps over 中文 the lazy dog. " * 60).strip()
    ids = smol.encode(text)
    assert len(ids) > 900
    counting = _CountingTokenizer(smol)
    detok = IncrementalDetokenizer(counting, smol.encode("prompt " * 50), True, [], False)
    for t in ids:
        detok.update([t])
    detok.flush()
    assert detok.output_text == smol.decode(ids)
    assert max(counting.window_sizes) <= 12  # a few tokens of context plus a held-back emoji, never the whole output
    assert sum(counting.window_sizes) <= 12 * len(ids)


def _reference_stop(full: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    hits = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
    if not hits:
        return full, None
    end, start, stop = min(hits)
    return full[: end if include else start], stop


@_SETTINGS
@given(
    text=st.lists(st.sampled_from(["a", "b", " ", "ab", "ba", "🎉", "中", "\n", "<|im_end|>"]), max_size=25).map(
        "".join
    ),
    stops=st.lists(
        st.lists(st.sampled_from(["a", "b", " ", "🎉", "中", "\n"]), min_size=1, max_size=4).map("".join), max_size=3
    ),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4),
    include=st.booleans(),
)
def test_stop_strings_property(smol, text, stops, sizes, include):
    ids = smol.encode(text)
    detok = IncrementalDetokenizer(smol, [], True, stops, include)
    deltas, hit = _stream(detok, _chunks(ids, sizes))
    expected, expected_stop = _reference_stop(smol.decode(ids), stops, include)
    # Deltas only ever append, so equality at the end means no client ever saw text that was later taken back.
    assert "".join(deltas) == detok.output_text == expected
    assert hit == expected_stop == detok.stop_str_hit


def test_stop_string_across_token_boundaries(smol):
    ids = smol.encode("Hello world, how are you")
    detok = IncrementalDetokenizer(smol, [], True, ["lo wor"], False)
    deltas, hit = _stream(detok, [[t] for t in ids])
    assert hit == "lo wor" and "".join(deltas) == "Hel"
    assert all("lo" not in d for d in deltas)  # "lo" was held back, then cut with the stop string
    detok = IncrementalDetokenizer(smol, [], True, ["lo wor"], True)
    deltas, hit = _stream(detok, [[t] for t in ids])
    assert "".join(deltas) == "Hello wor"


def test_partial_stop_is_held_then_released(smol):
    ids = smol.encode("The end is near")
    detok = IncrementalDetokenizer(smol, [], True, ["end of"], False)
    shown = ""
    for t in ids:
        update = detok.update([t])
        shown += update.delta_text
        assert update.stop_str_hit is None
        assert not shown.endswith(" end") and not shown.endswith("end ")  # a possible stop start stays hidden
    assert shown == "The end is near"[: len(shown)]
    assert shown + detok.flush().delta_text == "The end is near"


def test_stop_at_start_and_ignore_after_stop(smol):
    ids = smol.encode("STOP then more")
    detok = IncrementalDetokenizer(smol, [], True, ["STOP"], False)
    update = detok.update(ids)
    assert update == DetokenizerUpdate("", "STOP") and detok.output_text == ""
    assert detok.update(smol.encode(" more")) == DetokenizerUpdate("", None)
    assert detok.finished


def test_earliest_ending_stop_wins_regardless_of_batching(smol):
    ids = smol.encode("xxabcdxx")
    one_by_one = IncrementalDetokenizer(smol, [], True, ["abcd", "bc"], False)
    _, hit_single = _stream(one_by_one, [[t] for t in ids])
    all_at_once = IncrementalDetokenizer(smol, [], True, ["abcd", "bc"], False)
    _, hit_batch = _stream(all_at_once, [ids])
    assert hit_single == hit_batch == "bc"
    assert one_by_one.output_text == all_at_once.output_text == "xxa"


def test_special_tokens_shown_when_not_skipped(smol):
    ids = smol.encode("hi<|im_end|>")
    shown = IncrementalDetokenizer(smol, [], False, [], False)
    assert "".join(shown.update([t]).delta_text for t in ids) == "hi<|im_end|>"
    hidden = IncrementalDetokenizer(smol, [], True, [], False)
    assert "".join(hidden.update([t]).delta_text for t in ids) == "hi"


def test_stop_string_in_cjk_and_emoji(smol):
    ids = smol.encode("前面🎉后面")
    detok = IncrementalDetokenizer(smol, [], True, ["🎉"], False)
    deltas, hit = _stream(detok, [[t] for t in ids])
    assert hit == "🎉" and "".join(deltas) == "前面"


def test_empty_stop_string_rejected(smol):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(smol, [], True, [""], False)
