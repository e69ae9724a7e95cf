"""Turns sampled tokens into RequestOutputs: detokenization, stop strings, logprobs, n>1 fan-in, latency events."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.output_deltas import RequestDelta, SequenceDelta
from tokenmill.engine.outputs import (
    CompletionOutput,
    EngineObserver,
    FinishedRequestStats,
    RequestOutput,
    TokenLogprobs,
)
from tokenmill.engine.request import Request


@dataclass
class SequenceState:
    """Output-side state of one sequence (one Request)."""

    request: Request
    index: int
    detokenizer: IncrementalDetokenizer
    logprobs: list[TokenLogprobs] | None
    num_emitted_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    corrupted: bool = False
    # What to_delta has reported: text pieces, token ids, logprob entries.
    reported_pieces: int = 0
    reported_tokens: int = 0
    reported_logprobs: int = 0


@dataclass
class ParentRequest:
    """The API-level request: `n` sequences over one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    arrival_time: float
    sequences: list[SequenceState] = field(default_factory=list)
    reported_finished: bool = False
    report_progress: bool = True  # False: its caller wants only the final output (collect skips the rest)
    reported_delta: bool = False  # to_delta has run (its first delta carries the prompt)

    @property
    def finished(self) -> bool:
        return all(s.request.is_finished for s in self.sequences)

    def to_output(self) -> RequestOutput:
        outputs = []
        for s in self.sequences:
            req = s.request
            outputs.append(
                CompletionOutput(
                    index=s.index,
                    text=s.detokenizer.output_text,
                    token_ids=list(req.output_token_ids),
                    logprobs=list(s.logprobs) if s.logprobs is not None else None,
                    finish_reason=req.status.finish_reason,
                    stop_reason=req.stop_reason,
                )
            )
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=self._num_cached_tokens(),
            error=self._error(),
        )

    def to_delta(self) -> RequestDelta:
        """What is new since the last to_delta (DeltaDecoder turns the deltas back into to_output's outputs): the
        work is proportional to the news, where to_output copies every sequence's whole text and token ids."""
        outputs = []
        for s in self.sequences:
            req = s.request
            text, s.reported_pieces = s.detokenizer.text_since(s.reported_pieces)
            token_ids = req.output_token_ids[s.reported_tokens:]
            s.reported_tokens += len(token_ids)
            logprobs = None
            if s.logprobs is not None:
                logprobs = s.logprobs[s.reported_logprobs:]
                s.reported_logprobs += len(logprobs)
            outputs.append(SequenceDelta(s.index, text, token_ids, logprobs, req.status.finish_reason,
                                         req.stop_reason))
        first, self.reported_delta = not self.reported_delta, True
        return RequestDelta(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids if first else None,
            outputs=outputs,
            finished=self.finished,
            num_cached_tokens=self._num_cached_tokens(),
            error=self._error(),
        )

    def _num_cached_tokens(self) -> int:
        return max(0, self.sequences[0].request.num_cached_tokens)

    def _error(self) -> str | None:
        return next((s.request.error for s in self.sequences if s.request.error), None)


class OutputProcessor:
    def __init__(self, tokenizer, observer: EngineObserver) -> None:
        self.tokenizer = tokenizer
        self.observer = observer
        self.parents: dict[str, ParentRequest] = {}
        self.seq_by_request: dict[str, tuple[ParentRequest, SequenceState]] = {}

    def add(self, parent_id: str, prompt_token_ids: list[int], requests: list[Request],
            report_progress: bool = True) -> None:
        parent = ParentRequest(parent_id, prompt_token_ids, requests[0].arrival_time, report_progress=report_progress)
        for i, req in enumerate(requests):
            params = req.sampling_params
            detok = IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            state = SequenceState(req, i, detok, [] if params.logprobs is not None else None)
            parent.sequences.append(state)
            self.seq_by_request[req.request_id] = (parent, state)
        self.parents[parent_id] = parent

    def child_ids(self, parent_id: str) -> list[str]:
        parent = self.parents.get(parent_id)
        return [s.request.request_id for s in parent.sequences] if parent else []

    def record_tokens(
        self, request: Request, logprobs: TokenLogprobs | None, corrupted: bool, now: float
    ) -> str | None:
        """Called after the scheduler appended the newly sampled token(s). Returns a stop string if one was hit."""
        entry = self.seq_by_request.get(request.request_id)
        if entry is None:
            return None
        _, state = entry
        if corrupted:
            state.corrupted = True
            return None
        new_ids = request.output_token_ids[state.num_emitted_tokens :]
        state.num_emitted_tokens = len(request.output_token_ids)
        if not new_ids:
            return None
        if state.first_token_time is None:
            state.first_token_time = now
            self.observer.on_first_token(now - request.arrival_time)
        elif state.last_token_time is not None:
            self.observer.on_inter_token(now - state.last_token_time)
        state.last_token_time = now
        if state.logprobs is not None and logprobs is not None:
            for tok, lp in logprobs.items():
                if lp.decoded_token is None:
                    lp.decoded_token = self.tokenizer.decode([tok], skip_special_tokens=False)
            state.logprobs.append(logprobs)
        # A finished sequence flushes text held back for an incomplete character or a possible stop string.
        update = state.detokenizer.update(new_ids, final=request.is_finished)
        return update.stop_str_hit

    def collect(self, touched: set[str]) -> list[RequestOutput]:
        """RequestOutputs for every parent with news (a parent that wants no progress: once finished); forgets
        finished parents."""
        return self._collect(touched, ParentRequest.to_output)

    def collect_deltas(self, touched: set[str]) -> list[RequestDelta]:
        """collect's news as RequestDeltas: for a consumer that keeps the cumulative outputs itself (the engine's
        process hands these to the server's, output_deltas.py). One parent must not be collected both ways."""
        return self._collect(touched, ParentRequest.to_delta)

    def _collect(self, touched: set[str], report):
        outs = []
        now = time.monotonic()
        for parent_id in touched:
            parent = self.parents.get(parent_id)
            if parent is None or parent.reported_finished or (not parent.report_progress and not parent.finished):
                continue
            out = report(parent)
            outs.append(out)
            if out.finished:
                parent.reported_finished = True
                self._finish(parent, now)
        return outs

    def parent_of(self, request_id: str) -> str | None:
        entry = self.seq_by_request.get(request_id)
        return entry[0].request_id if entry else None

    def _finish(self, parent: ParentRequest, now: float) -> None:
        for s in parent.sequences:
            req = s.request
            self.observer.on_finished(
                FinishedRequestStats(
                    finish_reason=req.status.finish_reason or "abort",
                    num_prompt_tokens=req.num_prompt_tokens,
                    num_generation_tokens=req.num_output_tokens,
                    num_cached_tokens=max(0, req.num_cached_tokens),
                    e2e_latency=now - req.arrival_time,
                    ttft=(s.first_token_time - req.arrival_time) if s.first_token_time else None,
                    corrupted=s.corrupted,
                )
            )
            self.seq_by_request.pop(req.request_id, None)
        self.parents.pop(parent.request_id, None)
