"""Public LLM-serving trace formats, in and out, and a summary of what a trace asks of a server.

Formats (field names as the public datasets spell them):
  mooncake  JSONL  {"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}, 512-token blocks
            (kvcache-ai/Mooncake FAST'25 traces).
  qwen      JSONL  {"chat_id", "parent_chat_id" (-1 for a root), "timestamp": s, "input_length",
            "output_length", "type", "turn", "hash_ids": [...]}, 16-token blocks
            (alibaba-edu/qwen-bailian-usagetraces-anon).
  azure     CSV    TIMESTAMP (date and time), ContextTokens, GeneratedTokens (Azure LLM inference traces 2023/2024).
  burstgpt  CSV    Timestamp (s), Model, Request tokens, Response tokens, Total tokens, Log Type (HPMLL/BurstGPT).
Formats without block hashes (azure, burstgpt) read as requests without hash_ids; written to a format with hashes,
such requests get unique blocks (no reuse).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = ("mooncake", "qwen", "azure", "burstgpt")
DEFAULT_BLOCK_SIZE = {"mooncake": 512, "qwen": 16}
AZURE_DEFAULT_START = datetime(2024, 1, 1)  # used when a trace without absolute times is written as Azure CSV
AZURE_FIELDS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_FIELDS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


@dataclass
class TraceRequest:
    """One request of a trace, in the union of what the formats carry. Times are seconds from the trace start."""

    timestamp_s: float
    input_length: int
    output_length: int
    hash_ids: list[int] | None = None
    chat_id: int | None = None
    parent_chat_id: int | None = None  # -1: first turn of a session; None: the format has no sessions
    turn: int | None = None  # 1-based, as in the Qwen trace
    request_type: str | None = None  # Qwen "type": text/search/image/file
    model: str | None = None  # BurstGPT "Model"
    log_type: str | None = None  # BurstGPT "Log Type"


@dataclass
class Trace:
    requests: list[TraceRequest]
    block_size: int | None = None  # tokens per hash id; None when no request has hash_ids
    start_time: datetime | None = None  # wall-clock time of timestamp 0 (Azure)
    source_format: str | None = None

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def has_hash_ids(self) -> bool:
        return any(r.hash_ids is not None for r in self.requests)

    @property
    def has_sessions(self) -> bool:
        return any(r.parent_chat_id is not None for r in self.requests)

    def sorted(self) -> Trace:
        reqs = sorted(self.requests, key=lambda r: r.timestamp_s)
        return dataclasses.replace(self, requests=reqs)


def _check_format(fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def detect_format(path: str | Path) -> str:
    """Guess a trace file's format from its first line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        first = f.readline().strip()
    if not first:
        raise ValueError(f"{path} is empty; cannot tell its trace format")
    if first.startswith("{"):
        try:
            rec = json.loads(first)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: first line is not JSON ({e})") from None
        return "qwen" if "chat_id" in rec else "mooncake"
    header = [h.strip() for h in first.split(",")]
    if "ContextTokens" in header:
        return "azure"
    if "Request tokens" in header:
        return "burstgpt"
    raise ValueError(f"{path}: not a Mooncake/Qwen JSONL or an Azure/BurstGPT CSV trace (first line {first[:80]!r})")


# --------------------------------------------------------------------------------------------------------------
# Readers


def _int_field(rec: dict, key: str, where: str) -> int:
    try:
        v = rec[key]
    except KeyError:
        raise ValueError(f"{where}: missing field {key!r}") from None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field {key!r} must be an integer, got {v!r}") from None


def _float_field(rec: dict, key: str, where: str) -> float:
    try:
        v = rec[key]
    except KeyError:
        raise ValueError(f"{where}: missing field {key!r}") from None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: field {key!r} must be a number, got {v!r}") from None


def _hash_ids(rec: dict, where: str) -> list[int] | None:
    ids = rec.get("hash_ids")
    if ids is None:
        return None
    if not isinstance(ids, list):
        raise ValueError(f"{where}: hash_ids must be a list of integers")
    try:
        return [int(x) for x in ids]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: hash_ids must be a list of integers") from None


def _jsonl(path: Path) -> Iterable[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object per line")
            yield where, rec


def read_mooncake(path: str | Path, block_size: int = 512) -> Trace:
    path = Path(path)
    reqs = []
    for where, rec in _jsonl(path):
        reqs.append(
            TraceRequest(
                timestamp_s=_float_field(rec, "timestamp", where) / 1000.0,
                input_length=_int_field(rec, "input_length", where),
                output_length=_int_field(rec, "output_length", where),
                hash_ids=_hash_ids(rec, where),
            )
        )
    return Trace(reqs, block_size=block_size, source_format="mooncake")


def read_qwen(path: str | Path, block_size: int = 16) -> Trace:
    path = Path(path)
    reqs = []
    for where, rec in _jsonl(path):
        parent = rec.get("parent_chat_id", -1)
        reqs.append(
            TraceRequest(
                timestamp_s=_float_field(rec, "timestamp", where),
                input_length=_int_field(rec, "input_length", where),
                output_length=_int_field(rec, "output_length", where),
                hash_ids=_hash_ids(rec, where),
                chat_id=_int_field(rec, "chat_id", where),
                parent_chat_id=-1 if parent is None else int(parent),
                turn=int(rec["turn"]) if rec.get("turn") is not None else None,
                request_type=rec.get("type"),
            )
        )
    return Trace(reqs, block_size=block_size, source_format="qwen")


def _csv_rows(path: Path, required: Sequence[str]) -> Iterable[tuple[str, dict]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in fields]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {fields}")
        reader.fieldnames = fields
        for n, row in enumerate(reader, 2):
            yield f"{path}:{n}", row


def _parse_datetime(text: str, where: str) -> datetime:
    try:
        return datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{where}: cannot read TIMESTAMP {text!r} as a date and time") from None


def read_azure(path: str | Path) -> Trace:
    path = Path(path)
    rows = [
        (
            _parse_datetime(row["TIMESTAMP"], where),
            _int_field(row, "ContextTokens", where),
            _int_field(row, "GeneratedTokens", where),
        )
        for where, row in _csv_rows(path, AZURE_FIELDS)
    ]
    if not rows:
        return Trace([], source_format="azure")
    start = min(t for t, _, _ in rows)
    reqs = [TraceRequest((t - start).total_seconds(), ctx, gen) for t, ctx, gen in rows]
    return Trace(reqs, start_time=start, source_format="azure")


def read_burstgpt(path: str | Path) -> Trace:
    path = Path(path)
    reqs = []
    for where, row in _csv_rows(path, BURSTGPT_FIELDS):
        reqs.append(
            TraceRequest(
                timestamp_s=_float_field(row, "Timestamp", where),
                input_length=_int_field(row, "Request tokens", where),
                output_length=_int_field(row, "Response tokens", where),
                model=row.get("Model") or None,
                log_type=row.get("Log Type") or None,
            )
        )
    return Trace(reqs, source_format="burstgpt")


def read_trace(path: str | Path, fmt: str | None = None, block_size: int | None = None) -> Trace:
    """Read a trace file; fmt None = detect from content. block_size overrides the format's block size."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"trace file {path} does not exist")
    fmt = _check_format(fmt) if fmt else detect_format(path)
    if fmt == "mooncake":
        return read_mooncake(path, block_size or DEFAULT_BLOCK_SIZE["mooncake"])
    if fmt == "qwen":
        return read_qwen(path, block_size or DEFAULT_BLOCK_SIZE["qwen"])
    if fmt == "azure":
        return read_azure(path)
    return read_burstgpt(path)


# --------------------------------------------------------------------------------------------------------------
# Block-size conversion


class _Registry:
    def __init__(self) -> None:
        self.ids: dict[Any, int] = {}

    def __call__(self, key: Any) -> int:
        return self.ids.setdefault(key, len(self.ids))


def rechunk_hash_ids(trace: Trace, block_size: int) -> Trace:
    """The same trace with hash ids over `block_size`-token blocks, keeping which prefixes are shared.

    Each block is split into gcd-sized pieces (piece j of block h is named (h, j)), then pieces are grouped into
    new blocks, each named by its parent block and its pieces. Two requests that shared their first k tokens at the
    old block granularity share them at the new one (up to the new block boundary).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not trace.has_hash_ids:
        return dataclasses.replace(trace, block_size=block_size)
    old = trace.block_size
    if old is None:
        raise ValueError("a trace with hash_ids needs a block_size")
    if old == block_size:
        return trace
    g = math.gcd(old, block_size)
    per_old, per_new = old // g, block_size // g
    new_id = _Registry()
    out = []
    for r in trace.requests:
        if r.hash_ids is None:
            out.append(r)
            continue
        n_pieces = math.ceil(r.input_length / g) if r.input_length > 0 else 0
        pieces: list[tuple[int, int]] = []
        for h in r.hash_ids:
            pieces.extend((h, j) for j in range(per_old))
            if len(pieces) >= n_pieces:
                break
        pieces = pieces[:n_pieces]
        ids, parent = [], -1
        for start in range(0, len(pieces), per_new):
            parent = new_id((parent, tuple(pieces[start : start + per_new])))
            ids.append(parent)
        out.append(dataclasses.replace(r, hash_ids=ids))
    return dataclasses.replace(trace, requests=out, block_size=block_size)


def with_unique_hash_ids(trace: Trace, block_size: int) -> Trace:
    """Give requests without hash_ids their own never-shared blocks (ids above every existing id)."""
    next_id = 1 + max((max(r.hash_ids) for r in trace.requests if r.hash_ids), default=-1)
    out = []
    for r in trace.requests:
        if r.hash_ids is None:
            n = math.ceil(r.input_length / block_size)
            r = dataclasses.replace(r, hash_ids=list(range(next_id, next_id + n)))
            next_id += n
        out.append(r)
    return dataclasses.replace(trace, requests=out, block_size=block_size)


def canonical_hash_ids(trace: Trace) -> list[list[int] | None]:
    """Hash ids renumbered by first appearance: equal for two traces with the same sharing structure."""
    seen = _Registry()
    return [None if r.hash_ids is None else [seen(h) for h in r.hash_ids] for r in trace.requests]


def convert_trace(trace: Trace, fmt: str, block_size: int | None = None) -> Trace:
    """The trace as `fmt` will hold it: block size of the format (or block_size), hash ids where it has them."""
    fmt = _check_format(fmt)
    if fmt in ("azure", "burstgpt"):
        return trace
    bs = block_size or DEFAULT_BLOCK_SIZE[fmt]
    t = rechunk_hash_ids(trace, bs) if trace.has_hash_ids else dataclasses.replace(trace, block_size=bs)
    return with_unique_hash_ids(t, bs)


# --------------------------------------------------------------------------------------------------------------
# Writers


def _number_text(x: float, digits: int) -> int | float:
    r = round(x, digits)
    return int(r) if float(r).is_integer() else r


def _session_fields(trace: Trace) -> list[tuple[int, int, int]]:
    """(chat_id, parent_chat_id, turn) for every request; requests without sessions become single-turn roots."""
    used = {r.chat_id for r in trace.requests if r.chat_id is not None}
    next_id = max(used, default=-1) + 1
    out = []
    for r in trace.requests:
        if r.chat_id is None:
            cid, next_id = next_id, next_id + 1
        else:
            cid = r.chat_id
        parent = -1 if r.parent_chat_id is None else r.parent_chat_id
        turn = r.turn if r.turn is not None else 1
        out.append((cid, parent, turn))
    return out


def write_trace(trace: Trace, path: str | Path, fmt: str, block_size: int | None = None) -> Trace:
    """Write `trace` as `fmt`; returns the converted trace that was written."""
    fmt = _check_format(fmt)
    path = Path(path)
    t = convert_trace(trace, fmt, block_size)
    if fmt == "mooncake":
        with path.open("w", encoding="utf-8") as f:
            for r in t.requests:
                rec = {
                    "timestamp": _number_text(r.timestamp_s * 1000.0, 3),
                    "input_length": r.input_length,
                    "output_length": r.output_length,
                    "hash_ids": r.hash_ids,
                }
                f.write(json.dumps(rec) + "\n")
    elif fmt == "qwen":
        with path.open("w", encoding="utf-8") as f:
            for r, (cid, parent, turn) in zip(t.requests, _session_fields(t)):
                rec = {
                    "chat_id": cid,
                    "parent_chat_id": parent,
                    "timestamp": _number_text(r.timestamp_s, 6),
                    "input_length": r.input_length,
                    "output_length": r.output_length,
                    "type": r.request_type or "text",
                    "turn": turn,
                    "hash_ids": r.hash_ids,
                }
                f.write(json.dumps(rec) + "\n")
    elif fmt == "azure":
        start = t.start_time or AZURE_DEFAULT_START
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(AZURE_FIELDS)
            for r in t.requests:
                ts = start + timedelta(microseconds=round(r.timestamp_s * 1e6))
                # The public files print seven fractional digits.
                w.writerow([f"{ts:%Y-%m-%d %H:%M:%S}.{ts.microsecond:06d}0", r.input_length, r.output_length])
    else:
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(BURSTGPT_FIELDS)
            for r in t.requests:
                w.writerow(
                    [
                        _number_text(r.timestamp_s, 6),
                        r.model or "ChatGPT",
                        r.input_length,
                        r.output_length,
                        r.input_length + r.output_length,
                        r.log_type or "Conversation log",
                    ]
                )
    return t


# --------------------------------------------------------------------------------------------------------------
# Summary


@dataclass
class Percentiles:
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        a = np.asarray(values, dtype=float)
        if a.size == 0:
            return cls(math.nan, math.nan, math.nan, math.nan, math.nan)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(float(a.mean()), float(p50), float(p90), float(p99), float(a.max()))


@dataclass
class TraceSummary:
    num_requests: int
    duration_s: float
    request_rate: float  # requests per second over the trace's span
    inter_arrival_cv: float  # 1 for Poisson arrivals, > 1 bursty
    input_tokens: Percentiles
    output_tokens: Percentiles
    num_sessions: int | None  # distinct sessions (roots); None when the format has no sessions
    mean_turns: float | None
    block_size: int | None
    # Infinite cache: fraction of input tokens in blocks whose whole prefix was seen before (prefix-cache hits).
    prefix_reuse_ratio: float | None
    # Fraction of input blocks whose id was seen before anywhere (equals the above for chained ids).
    block_reuse_ratio: float | None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def session_roots(requests: Sequence[TraceRequest]) -> list[int]:
    """For each request, the chat_id of its session's first turn (following parent links inside the trace)."""
    parent = {r.chat_id: r.parent_chat_id for r in requests if r.chat_id is not None}
    roots = []
    for r in requests:
        cid, hops = r.chat_id, 0
        while cid is not None and parent.get(cid, -1) not in (-1, None) and parent[cid] in parent:
            cid = parent[cid]
            hops += 1
            if hops > len(parent):
                raise ValueError(f"trace has a cycle in parent_chat_id links around chat {r.chat_id}")
        roots.append(cid if cid is not None else -1)
    return roots


def prefix_reuse(requests: Sequence[TraceRequest], block_size: int) -> tuple[float, float]:
    """(prefix reuse ratio in tokens, any-position block reuse ratio) with an infinite cache, in time order.

    A block is a prefix hit when it and every block before it in the request were seen in an earlier request.
    """
    reqs = sorted(requests, key=lambda r: r.timestamp_s)
    total_tokens = sum(r.input_length for r in reqs)
    with_ids = [r for r in reqs if r.hash_ids]
    if not with_ids:
        return 0.0, 0.0
    lens = np.array([len(r.hash_ids) for r in with_ids])
    ids = np.concatenate([np.asarray(r.hash_ids, dtype=np.int64) for r in with_ids])
    n = ids.size
    req = np.repeat(np.arange(len(with_ids)), lens)
    within = np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    # Seen before = first seen in an earlier request (a repeat inside one request is not a cache hit).
    seen = req[first[inverse]] < req
    first_miss = np.full(len(with_ids), np.iinfo(np.int64).max)
    np.minimum.at(first_miss, req[~seen], within[~seen])
    prefix_hit = within < first_miss[req]
    input_len = np.array([r.input_length for r in with_ids])[req]
    tokens = np.clip(input_len - within * block_size, 0, block_size)
    hit_tokens = int(tokens[prefix_hit].sum())
    return (hit_tokens / total_tokens if total_tokens else 0.0, float(seen.mean()))


def summarize_trace(trace: Trace) -> TraceSummary:
    reqs = sorted(trace.requests, key=lambda r: r.timestamp_s)
    n = len(reqs)
    ts = np.array([r.timestamp_s for r in reqs], dtype=float)
    duration = float(ts[-1] - ts[0]) if n > 1 else 0.0
    gaps = np.diff(ts)
    cv = float(gaps.std() / gaps.mean()) if gaps.size > 1 and gaps.mean() > 0 else math.nan
    num_sessions = mean_turns = None
    if trace.has_sessions:
        roots = session_roots(reqs)
        num_sessions = len(set(roots))
        mean_turns = n / num_sessions if num_sessions else None
    prefix_ratio = block_ratio = None
    if trace.has_hash_ids and trace.block_size:
        prefix_ratio, block_ratio = prefix_reuse(reqs, trace.block_size)
    return TraceSummary(
        num_requests=n,
        duration_s=duration,
        request_rate=(n - 1) / duration if duration > 0 else math.nan,
        inter_arrival_cv=cv,
        input_tokens=Percentiles.of([r.input_length for r in reqs]),
        output_tokens=Percentiles.of([r.output_length for r in reqs]),
        num_sessions=num_sessions,
        mean_turns=mean_turns,
        block_size=trace.block_size,
        prefix_reuse_ratio=prefix_ratio,
        block_reuse_ratio=block_ratio,
    )


# --------------------------------------------------------------------------------------------------------------
# Sessions -> trace


def sessions_to_trace(sessions: Sequence[Any], block_size: int = 16) -> Trace:
    """Generated sessions as a Qwen-style trace (chat_id, parent_chat_id, turn, hash_ids), in time order.

    Timestamps are the sessions' nominal send times (answers assumed instant). Hash ids are computed over
    block_size-token blocks with one hasher for all sessions, so shared prefixes share ids.
    """
    from tokenmill.workload.sessions import assign_hash_ids

    if any(s.hash_block_size != block_size for s in sessions):
        assign_hash_ids(list(sessions), block_size)
    rows = sorted(
        ((t.timestamp_s, s.session_id, t) for s in sessions for t in s.turns), key=lambda x: (x[0], x[1], x[2].index)
    )
    chat_ids = {(sid, t.index): i for i, (_, sid, t) in enumerate(rows)}
    reqs = [
        TraceRequest(
            timestamp_s=ts,
            input_length=t.input_tokens,
            output_length=t.output_tokens,
            hash_ids=t.hash_ids,
            chat_id=chat_ids[(sid, t.index)],
            parent_chat_id=-1 if t.index == 0 else chat_ids[(sid, t.index - 1)],
            turn=t.index + 1,
            request_type="text",
        )
        for ts, sid, t in rows
    ]
    return Trace(reqs, block_size=block_size, source_format="sessions")
