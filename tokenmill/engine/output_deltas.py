"""RequestOutputs as per-step deltas, for handing them from the engine's process to the server's.

A RequestOutput is cumulative (the whole text, every token id and logprob so far), so sending one per step would
move O(length²) bytes over a request's life. The engine side sends what is new since the last output of that
request (`DeltaEncoder`); the server side appends it to what it holds and hands on the same cumulative
RequestOutputs the in-process engine gives (`DeltaDecoder`). Text, token ids and logprobs only grow; where one is
shorter than what was sent the delta carries it whole (`reset`); only lengths are compared.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.outputs import CompletionOutput, RequestOutput, TokenLogprobs


@dataclass
class SequenceDelta:
    index: int
    text: str  # appended to the text so far (the whole text where `reset`)
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    stop_reason: int | str | None
    reset: bool = False


@dataclass
class RequestDelta:
    request_id: str
    prompt_token_ids: list[int] | None  # in a request's first delta only
    outputs: list[SequenceDelta]
    finished: bool
    num_cached_tokens: int
    error: str | None


class DeltaEncoder:
    """Engine side: cumulative RequestOutputs in, RequestDeltas out. Forgets a request once it has finished."""

    def __init__(self) -> None:
        self._sent: dict[str, list[tuple[int, int, int]]] = {}  # request id -> per sequence (text, tokens, logprobs)

    def encode(self, out: RequestOutput) -> RequestDelta:
        sent = self._sent.get(out.request_id)
        first = sent is None
        seqs, lengths = [], []
        for i, c in enumerate(out.outputs):
            n_text, n_tok, n_lp = sent[i] if not first and i < len(sent) else (0, 0, 0)
            now = (len(c.text), len(c.token_ids), len(c.logprobs) if c.logprobs is not None else 0)
            reset = now[0] < n_text or now[1] < n_tok or now[2] < n_lp
            if reset:
                n_text = n_tok = n_lp = 0
            seqs.append(SequenceDelta(
                index=c.index,
                text=c.text[n_text:],
                token_ids=c.token_ids[n_tok:],
                logprobs=c.logprobs[n_lp:] if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                reset=reset,
            ))
            lengths.append(now)
        if out.finished:
            self._sent.pop(out.request_id, None)
        else:
            self._sent[out.request_id] = lengths
        return RequestDelta(
            request_id=out.request_id,
            prompt_token_ids=out.prompt_token_ids if first else None,
            outputs=seqs,
            finished=out.finished,
            num_cached_tokens=out.num_cached_tokens,
            error=out.error,
        )


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
            if s.reset:
                held.texts[i], held.token_ids[i] = "", []
                held.logprobs[i] = [] if s.logprobs is not None else None
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
