"""What the replay client will send: sessions of turns with their text, lengths and timing.

Two sources become one plan:
- generated sessions (tokenmill.workload.sessions): each turn carries only its new message; the client keeps the
  conversation (with the server's real answers) and sends all of it every turn;
- a trace: each request's prompt is synthesized whole from its hash_ids, so its prefix sharing is the trace's.
  Requests linked by parent_chat_id form a session: a turn waits for the previous turn's answer and for its own
  trace time. Traces without sessions (Mooncake, Azure, BurstGPT) are open-loop single requests.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenmill.workload.sessions import Session
from tokenmill.workload.text import PromptSynthesizer
from tokenmill.workload.traces import Trace, TraceRequest, session_roots


@dataclass
class PlannedTurn:
    text: str  # the new message (history-carrying sessions) or the whole prompt (trace requests)
    output_tokens: int
    input_tokens: int  # tokens of the prompt text (whole conversation so far, for history-carrying sessions)
    gap_s: float = 0.0  # wait after the previous answer (before time scaling)
    offset_s: float = 0.0  # not before session arrival + offset (trace time, before time scaling)
    kind: str = "user"  # user | tool
    gap_kind: str = "none"
    # Builds `text` when the request is sent, so a long trace does not hold every prompt in memory at once.
    make_text: Callable[[], str] | None = field(default=None, repr=False)

    def prompt_text(self) -> str:
        return self.make_text() if self.make_text is not None else self.text


@dataclass
class PlannedSession:
    session_id: int
    workload: str
    arrival_s: float
    turns: list[PlannedTurn]
    system_text: str = ""  # shared prefix (system prompt, repository/document context)
    carry_history: bool = True  # False: every turn's text is its whole prompt


@dataclass
class ReplayPlan:
    sessions: list[PlannedSession]
    source: str = ""
    info: dict = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    @property
    def span_s(self) -> float:
        return max((s.arrival_s for s in self.sessions), default=0.0)


def plan_from_sessions(sessions: Sequence[Session], synth: PromptSynthesizer, source: str = "") -> ReplayPlan:
    planned = []
    shared_text: dict[tuple, str] = {}  # sessions with the same prefix share one string
    for s in sessions:
        prefix_key = tuple(s.prefix)
        if prefix_key not in shared_text:
            shared_text[prefix_key] = synth.text_for_segments(s.prefix)
        turns = [
            PlannedTurn(
                text=synth.text_for_key(t.message.key, t.message.tokens),
                output_tokens=t.output_tokens,
                input_tokens=t.input_tokens,
                gap_s=t.gap_s,
                kind=t.kind,
                gap_kind=t.gap_kind,
            )
            for t in s.turns
        ]
        planned.append(
            PlannedSession(
                session_id=s.session_id,
                workload=s.workload,
                arrival_s=s.arrival_s,
                turns=turns,
                system_text=shared_text[prefix_key],
                carry_history=True,
            )
        )
    planned.sort(key=lambda p: p.arrival_s)
    return ReplayPlan(planned, source=source)


def trace_rate(trace: Trace) -> float:
    ts = [r.timestamp_s for r in trace.requests]
    span = max(ts) - min(ts) if ts else 0.0
    return (len(ts) - 1) / span if span > 0 else math.nan


def plan_from_trace(
    trace: Trace,
    synth: PromptSynthesizer,
    time_factor: float = 1.0,
    max_requests: int | None = None,
    source: str = "",
) -> ReplayPlan:
    """time_factor multiplies every trace time (0.5 = twice the request rate)."""
    if not time_factor > 0:
        raise ValueError(f"time_factor must be > 0, got {time_factor}")
    reqs = sorted(trace.requests, key=lambda r: r.timestamp_s)
    if max_requests is not None:
        reqs = reqs[:max_requests]
    if not reqs:
        raise ValueError("the trace has no requests")
    t0 = reqs[0].timestamp_s
    roots = session_roots(reqs) if trace.has_sessions else [None] * len(reqs)
    groups: dict[object, list[tuple[int, TraceRequest]]] = {}
    for i, (r, root) in enumerate(zip(reqs, roots)):
        groups.setdefault(("session", root) if root is not None and root != -1 else ("request", i), []).append((i, r))
    block_size = trace.block_size or 16
    sessions = []
    for sid, members in enumerate(sorted(groups.values(), key=lambda m: m[0][1].timestamp_s)):
        first_ts = members[0][1].timestamp_s
        turns = []
        for i, r in members:
            if r.hash_ids is not None:
                make = functools.partial(synth.prompt_for_hash_ids, r.hash_ids, r.input_length, block_size)
            else:
                make = functools.partial(synth.text_for_key, ("trace-request", i), r.input_length)
            turns.append(
                PlannedTurn(
                    text="",
                    make_text=make,
                    output_tokens=max(1, r.output_length),
                    input_tokens=r.input_length,
                    offset_s=(r.timestamp_s - first_ts) * time_factor,
                    gap_kind="trace",
                )
            )
        sessions.append(
            PlannedSession(
                session_id=sid,
                workload=trace.source_format or "trace",
                arrival_s=(first_ts - t0) * time_factor,
                turns=turns,
                carry_history=False,
            )
        )
    return ReplayPlan(sessions, source=source, info={"time_factor": time_factor, "block_size": block_size})
