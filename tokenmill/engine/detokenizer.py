"""Incremental detokenization of one sequence, with stop strings.

Each step decodes only a small window of tokens (vLLM's prefix-offset / read-offset scheme): the tokens
`prefix_offset..read_offset` are already emitted and kept as left context, so merges and leading-space rules see the
same neighbours as a full decode would. The new text is `decode(ids[prefix:])` minus `decode(ids[prefix:read])`.
While that text ends in U+FFFD the last token(s) hold part of a multi-byte character, so nothing is emitted until the
character completes.

Stop strings are searched in the newly settled text plus the few characters before it (a stop string can span token
boundaries). While streaming, a tail that could still grow into a stop string is held back, so a client never sees
text that is later cut off.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, Sequence

_REPLACEMENT = "\ufffd"
# Tokens of prompt kept as left context for the first output tokens (SentencePiece decoders drop the leading space of
# the first token in a window; context makes " Paris" after "is" come out with its space).
_PROMPT_CONTEXT_TOKENS = 5


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class DetokenizerUpdate(NamedTuple):
    delta_text: str  # new text for the client (may be "")
    stop_str_hit: str | None  # the stop string that ended the sequence this step, else None


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas for one sequence.

    Without a stop-string hit, the deltas of all `update` calls (the last with `final=True`) join to exactly
    `tokenizer.decode(output_ids)` for byte-level BPE tokenizers. For SentencePiece tokenizers the text also keeps
    the leading space of the first output token, which a standalone decode strips.
    """

    def __init__(
        self,
        tokenizer: _Decoder,
        prompt_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
        stop: Sequence[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        # tokenmill's Tokenizer wraps a `tokenizers.Tokenizer`: call it directly (two decodes per token and step).
        backend = getattr(tokenizer, "backend", None)
        self._decode_ids = backend.decode if callable(getattr(backend, "decode", None)) else tokenizer.decode
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or [])]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

        context = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # Context that ends inside a character would glue its bytes onto the first output token; go without then.
        if context and self._decode(context).endswith(_REPLACEMENT):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._num_context = len(context)

        # Emitted text lives in `_pieces` (joined lazily). Settled text not yet emitted is `_held`: a tail that may be
        # the start of a stop string (shorter than the longest stop). `_tail` keeps the last characters of emitted
        # text so a stop string that begins there is still found; every step touches only these short strings.
        self._pieces: list[str] = []
        self._joined = ""
        self._num_joined = 0
        self._held = ""
        self._tail = ""
        self.stop_str_hit: str | None = None
        self.finished = False

    # --- public -----------------------------------------------------------------------------------------------------
    @property
    def output_text(self) -> str:
        """The text emitted so far: the concatenation of every delta returned."""
        if self._num_joined < len(self._pieces):
            self._joined += "".join(self._pieces[self._num_joined :])
            self._num_joined = len(self._pieces)
        return self._joined

    def text_since(self, num_pieces: int) -> tuple[str, int]:
        """The text emitted after the first `num_pieces` deltas, and how many deltas there are now: what is new
        since a caller last asked, in time proportional to it (output_text copies the whole text)."""
        return "".join(self._pieces[num_pieces:]), len(self._pieces)

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._num_context :]

    def update(self, new_token_ids: Sequence[int], final: bool = False) -> DetokenizerUpdate:
        """Add newly sampled tokens; return the text that may be shown now.

        `final=True` marks the sequence's last update (EOS, length limit, abort): everything still held back (an
        incomplete character, a possible stop-string prefix) is flushed. After a stop string hits, the sequence is
        finished and further tokens are ignored.
        """
        if self.finished:
            return DetokenizerUpdate("", None)
        self._ids.extend(new_token_ids)
        new_text = self._decode_new(flush=final)
        if not self.stop:  # nothing to search or hold back (the common case; the general path gives the same)
            self.finished = final
            if new_text:
                self._pieces.append(new_text)
            return DetokenizerUpdate(new_text, None)
        pending = self._held + new_text  # settled, not yet shown
        if not pending:
            self.finished = final
            return DetokenizerUpdate("", None)

        hit = self._find_stop(self._tail + pending)
        if hit is not None:
            stop, index = hit
            cut = index + len(stop) if self.include_stop_str_in_output else index
            # The hold-back guarantees a stop string never starts inside text already shown, so cut >= len(tail).
            self.stop_str_hit = stop
            self.finished = True
            self._held = ""
            return DetokenizerUpdate(self._emit(pending[: max(0, cut - len(self._tail))]), stop)

        held = 0 if final else self._stop_prefix_len(pending)
        self._held = pending[len(pending) - held :] if held else ""
        self.finished = final
        return DetokenizerUpdate(self._emit(pending[: len(pending) - held]), None)

    def flush(self) -> DetokenizerUpdate:
        """Release everything held back; the same as `update([], final=True)`."""
        return self.update([], final=True)

    # --- internals --------------------------------------------------------------------------------------------------
    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_new(self, flush: bool) -> str:
        """Text of tokens past read_offset, or "" while it ends in an incomplete character (unless flushing)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if not flush and (len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT)):
            # Nothing visible yet (e.g. a skipped special token), or a character still incomplete: wait.
            return ""
        delta = full_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return delta

    def _find_stop(self, window: str) -> tuple[str, int] | None:
        """The stop string that completes first in `window` (recent shown text + unshown text), and where it starts.

        Ranking by end position (then by start) gives the same answer however the tokens were batched into updates.
        Stops that lie wholly in earlier text were caught by an earlier step, so searching this window suffices.
        """
        best: tuple[int, int, str] | None = None
        for s in self.stop:
            index = window.find(s)
            if index >= 0 and (best is None or (index + len(s), index) < best[:2]):
                best = (index + len(s), index, s)
        return (best[2], best[1]) if best is not None else None

    def _stop_prefix_len(self, pending: str) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of a stop string (held back for now)."""
        if not self.stop or self.include_stop_str_in_output:
            # Text kept with the stop string is never cut back, so there is nothing to hold.
            return 0
        held = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(pending)), held, -1):
                if pending.endswith(s[:k]):
                    held = k
                    break
        return held

    def _emit(self, delta: str) -> str:
        if delta:
            self._pieces.append(delta)
            if self._max_stop_len > 1:
                self._tail = (self._tail + delta)[-(self._max_stop_len - 1) :]
        return delta
