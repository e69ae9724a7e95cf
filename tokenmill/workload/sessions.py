"""Multi-turn session workloads: classes of traffic, arrival processes, and a seeded generator.

A session is one user (or agent) talking to the model: a shared prefix (system prompt, repository or document
context), then turns. Each turn adds new tokens (a user message or a tool result), waits for an answer of
`output_tokens`, and the next turn follows after a gap (think time, tool latency, or an idle return hours later).
Every token run is a `Segment` with a content key, so the token-block structure of every request is known exactly:
`assign_hash_ids` turns it into block hash ids (chained, as in the Mooncake and Qwen traces), and
`tokenmill.workload.text` turns the same keys into prompt text. Defaults and their sources: docs/WORKLOADS.md.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Distributions


@dataclass(frozen=True)
class Dist:
    """A non-negative random quantity given by its mean and coefficient of variation (std / mean).

    kind: "const" | "lognormal" | "gamma" | "exponential" | "geometric" (integers >= 1, mean >= 1).
    Samples are clipped to [low, high]; clipping moves the mean a little when the tails are cut.
    """

    kind: str
    mean: float
    cv: float = 0.0
    low: float = 0.0
    high: float = math.inf

    KINDS = ("const", "lognormal", "gamma", "exponential", "geometric")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown distribution kind {self.kind!r}; choose one of {self.KINDS}")
        if not self.mean >= 0 or self.cv < 0:
            raise ValueError(f"distribution needs mean >= 0 and cv >= 0, got mean={self.mean}, cv={self.cv}")
        if self.kind == "geometric" and self.mean < 1:
            raise ValueError(f"a geometric distribution needs mean >= 1, got {self.mean}")
        if self.low > self.high:
            raise ValueError(f"distribution bounds are reversed: low={self.low} > high={self.high}")

    def sample(self, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
        n = 1 if size is None else size
        m = self.mean
        if self.kind == "const" or m == 0 or (self.cv == 0 and self.kind in ("lognormal", "gamma")):
            x = np.full(n, m, dtype=float)
        elif self.kind == "lognormal":
            sigma2 = math.log1p(self.cv**2)
            x = rng.lognormal(math.log(m) - sigma2 / 2, math.sqrt(sigma2), n)
        elif self.kind == "gamma":
            shape = 1.0 / self.cv**2
            x = rng.gamma(shape, m / shape, n)
        elif self.kind == "exponential":
            x = rng.exponential(m, n)
        else:  # geometric on {1, 2, ...} with mean m
            x = rng.geometric(1.0 / m, n).astype(float)
        return np.clip(x, self.low, self.high)

    def sample_one(self, rng: np.random.Generator) -> float:
        m = self.mean
        if self.kind == "const" or m == 0 or (self.cv == 0 and self.kind in ("lognormal", "gamma")):
            x = m
        elif self.kind == "lognormal":
            sigma2 = math.log1p(self.cv**2)
            x = rng.lognormal(math.log(m) - sigma2 / 2, math.sqrt(sigma2))
        elif self.kind == "gamma":
            shape = 1.0 / self.cv**2
            x = rng.gamma(shape, m / shape)
        elif self.kind == "exponential":
            x = rng.exponential(m)
        else:
            x = float(rng.geometric(1.0 / m))
        return float(min(max(x, self.low), self.high))

    def sample_int(self, rng: np.random.Generator, minimum: int = 0) -> int:
        return max(minimum, round(self.sample_one(rng)))

    def scaled(self, factor: float) -> Dist:
        """The same shape with mean and bounds multiplied (token lengths scaled down for small machines)."""
        if self.kind == "geometric":
            return dataclasses.replace(self, mean=max(1.0, self.mean * factor))
        return dataclasses.replace(
            self, mean=self.mean * factor, low=self.low * factor if self.low > 1 else self.low, high=self.high * factor
        )


def const(value: float) -> Dist:
    return Dist("const", value)


def lognormal(mean: float, cv: float, low: float = 1.0, high: float = math.inf) -> Dist:
    return Dist("lognormal", mean, cv, low, high)


def geometric(mean: float, high: float = math.inf) -> Dist:
    return Dist("geometric", mean, low=1.0, high=high)


# --------------------------------------------------------------------------------------------------------------
# Workload classes


@dataclass(frozen=True)
class WorkloadClass:
    """Distributions that describe one kind of traffic. Token counts are model tokens; times are seconds."""

    name: str
    description: str
    # Shared prefixes. A pool of N distinct items is drawn with Zipf(s) popularity; pool None = unique per session.
    system_prompt_tokens: Dist | None
    system_prompt_pool: int | None
    system_prompt_zipf: float
    context_tokens: Dist | None  # repository or document context placed after the system prompt
    context_pool: int | None
    context_zipf: float
    # Turns.
    turns: Dist  # turns (requests) per session, >= 1
    first_message_tokens: Dist  # the user's first message
    message_tokens: Dist  # later user messages
    tool_result_tokens: Dist  # what a tool call returns (agent steps)
    output_tokens: Dist
    tool_call_prob: float  # probability that a later turn is a tool result rather than a human message
    # Gaps between an answer and the next request of the same session.
    think_time_s: Dist
    tool_latency_s: Dist
    idle_return_prob: float  # probability that a human turn comes back after an idle gap instead of think time
    idle_gap_s: Dist

    TOKEN_FIELDS = (
        "system_prompt_tokens",
        "context_tokens",
        "first_message_tokens",
        "message_tokens",
        "tool_result_tokens",
        "output_tokens",
    )

    def __post_init__(self) -> None:
        for name in ("tool_call_prob", "idle_return_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{self.name}.{name} must be a probability in [0, 1], got {p}")
        for name in ("system_prompt_pool", "context_pool"):
            n = getattr(self, name)
            if n is not None and n < 1:
                raise ValueError(f"{self.name}.{name} must be >= 1 or None (unique per session), got {n}")

    def scaled(self, factor: float) -> WorkloadClass:
        """Every token length multiplied by `factor` (times and turn counts unchanged)."""
        if factor <= 0:
            raise ValueError(f"length scale must be > 0, got {factor}")
        changes = {}
        for name in self.TOKEN_FIELDS:
            d = getattr(self, name)
            if d is not None:
                changes[name] = d.scaled(factor)
        return dataclasses.replace(self, **changes)


# Defaults: see docs/WORKLOADS.md for the source (or the reasoning, where a number is an estimate) of each value.
CHAT = WorkloadClass(
    name="chat",
    description="human chat assistant: short system prompts shared by app, a few turns, think times, idle returns",
    system_prompt_tokens=lognormal(400, 1.0, low=16, high=4000),
    system_prompt_pool=16,
    system_prompt_zipf=1.0,
    context_tokens=None,
    context_pool=None,
    context_zipf=0.0,
    turns=geometric(3.0, high=40),
    first_message_tokens=lognormal(250, 2.0, low=2, high=16000),
    message_tokens=lognormal(120, 2.0, low=2, high=8000),
    tool_result_tokens=lognormal(300, 1.0),
    output_tokens=lognormal(250, 1.0, low=4, high=4096),
    tool_call_prob=0.0,
    think_time_s=lognormal(40.0, 1.5, low=2.0, high=1800.0),
    tool_latency_s=lognormal(1.0, 1.0, low=0.05),
    idle_return_prob=0.05,
    idle_gap_s=lognormal(7200.0, 1.0, low=600.0, high=86400.0),
)

CODING_AGENT = WorkloadClass(
    name="coding_agent",
    description="coding agent: large repository context shared across sessions, long runs of tool-call steps",
    system_prompt_tokens=lognormal(6000, 0.3, low=1000, high=20000),
    system_prompt_pool=4,
    system_prompt_zipf=1.0,
    context_tokens=lognormal(20000, 0.8, low=2000, high=120000),
    context_pool=64,
    context_zipf=1.1,
    turns=geometric(25.0, high=200),
    first_message_tokens=lognormal(400, 1.5, low=8, high=8000),
    message_tokens=lognormal(200, 1.5, low=4, high=8000),
    tool_result_tokens=lognormal(1500, 2.0, low=8, high=60000),
    output_tokens=lognormal(250, 1.5, low=4, high=8192),
    tool_call_prob=0.9,
    think_time_s=lognormal(60.0, 1.5, low=2.0, high=3600.0),
    tool_latency_s=lognormal(3.0, 1.5, low=0.05, high=600.0),
    idle_return_prob=0.03,
    idle_gap_s=lognormal(5400.0, 1.0, low=600.0, high=86400.0),
)

LONG_DOCUMENT_QA = WorkloadClass(
    name="long_document_qa",
    description="questions about a long document: one long context per session, a few short questions",
    system_prompt_tokens=lognormal(150, 0.5, low=16, high=1000),
    system_prompt_pool=4,
    system_prompt_zipf=1.0,
    context_tokens=lognormal(12000, 0.8, low=1000, high=128000),
    context_pool=1000,
    context_zipf=0.8,
    turns=geometric(3.0, high=20),
    first_message_tokens=lognormal(60, 1.0, low=4, high=1000),
    message_tokens=lognormal(50, 1.0, low=4, high=1000),
    tool_result_tokens=lognormal(300, 1.0),
    output_tokens=lognormal(300, 1.0, low=4, high=4096),
    tool_call_prob=0.0,
    think_time_s=lognormal(30.0, 1.5, low=2.0, high=1800.0),
    tool_latency_s=lognormal(1.0, 1.0, low=0.05),
    idle_return_prob=0.05,
    idle_gap_s=lognormal(3600.0, 1.0, low=600.0, high=86400.0),
)

BATCH_SUMMARIZATION = WorkloadClass(
    name="batch_summarization",
    description="offline summarisation jobs: one document per request, a shared instruction, single turn",
    system_prompt_tokens=lognormal(80, 0.3, low=8, high=500),
    system_prompt_pool=2,
    system_prompt_zipf=1.0,
    context_tokens=lognormal(3000, 0.7, low=200, high=32000),
    context_pool=None,
    context_zipf=0.0,
    turns=const(1),
    first_message_tokens=lognormal(20, 0.5, low=2, high=200),
    message_tokens=lognormal(20, 0.5, low=2, high=200),
    tool_result_tokens=lognormal(300, 1.0),
    output_tokens=lognormal(200, 0.5, low=8, high=2048),
    tool_call_prob=0.0,
    think_time_s=const(0.0),
    tool_latency_s=const(0.0),
    idle_return_prob=0.0,
    idle_gap_s=const(0.0),
)

TOOL_AGENT = WorkloadClass(
    name="tool_agent",
    description="API tool-calling agent: long shared system prompts with tool definitions, fast automated steps",
    system_prompt_tokens=lognormal(3000, 0.8, low=200, high=32000),
    system_prompt_pool=64,
    system_prompt_zipf=1.0,
    context_tokens=None,
    context_pool=None,
    context_zipf=0.0,
    turns=geometric(2.0, high=20),
    first_message_tokens=lognormal(2500, 1.5, low=4, high=64000),
    message_tokens=lognormal(150, 1.5, low=4, high=8000),
    tool_result_tokens=lognormal(800, 1.5, low=4, high=32000),
    output_tokens=lognormal(180, 1.0, low=4, high=4096),
    tool_call_prob=0.8,
    think_time_s=lognormal(5.0, 1.0, low=0.2, high=600.0),
    tool_latency_s=lognormal(1.0, 1.0, low=0.02, high=120.0),
    idle_return_prob=0.0,
    idle_gap_s=const(0.0),
)

# Not traffic but a probe (vLLM's `--dataset-name random`): every request the same size, nothing shared, no gaps, so
# serving can be compared with offline decode at a fixed shape (random.first_message_tokens=, random.output_tokens=).
RANDOM = WorkloadClass(
    name="random",
    description="fixed-size single-turn requests with nothing shared (vLLM's random dataset): 1024 in, 128 out",
    system_prompt_tokens=None,
    system_prompt_pool=None,
    system_prompt_zipf=0.0,
    context_tokens=None,
    context_pool=None,
    context_zipf=0.0,
    turns=const(1),
    first_message_tokens=const(1024),
    message_tokens=const(1),
    tool_result_tokens=const(1),
    output_tokens=const(128),
    tool_call_prob=0.0,
    think_time_s=const(0.0),
    tool_latency_s=const(0.0),
    idle_return_prob=0.0,
    idle_gap_s=const(0.0),
)

WORKLOAD_CLASSES: dict[str, WorkloadClass] = {
    c.name: c for c in (CHAT, CODING_AGENT, LONG_DOCUMENT_QA, BATCH_SUMMARIZATION, TOOL_AGENT, RANDOM)
}

# --------------------------------------------------------------------------------------------------------------
# Arrival processes


@dataclass(frozen=True)
class ArrivalProcess:
    """Session arrival times. rate is the mean number of sessions per second.

    poisson: exponential inter-arrivals. bursty: gamma inter-arrivals with coefficient of variation `cv` (cv > 1 is
    burstier than Poisson). diurnal: Poisson with rate(t) = rate * (1 + amplitude * sin(2 pi t / period_s)).
    """

    kind: str = "poisson"
    rate: float = 1.0
    cv: float = 2.0
    period_s: float = 86400.0
    amplitude: float = 0.5

    KINDS = ("poisson", "bursty", "diurnal")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"unknown arrival process {self.kind!r}; choose one of {self.KINDS}")
        if not self.rate > 0:
            raise ValueError(f"arrival rate must be > 0 sessions/s, got {self.rate}")
        if not self.cv > 0:
            raise ValueError(f"bursty arrivals need cv > 0, got {self.cv}")
        if not self.period_s > 0:
            raise ValueError(f"diurnal period must be > 0 s, got {self.period_s}")
        if not 0.0 <= self.amplitude <= 1.0:
            raise ValueError(f"diurnal amplitude must be in [0, 1], got {self.amplitude}")

    def rate_at(self, t: np.ndarray | float) -> np.ndarray | float:
        if self.kind != "diurnal":
            return self.rate + 0.0 * np.asarray(t)
        return self.rate * (1.0 + self.amplitude * np.sin(2.0 * np.pi * np.asarray(t) / self.period_s))

    def times(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n arrival times in seconds, the first one at the first inter-arrival gap after t = 0."""
        if n <= 0:
            return np.zeros(0)
        if self.kind == "poisson":
            return np.cumsum(rng.exponential(1.0 / self.rate, n))
        if self.kind == "bursty":
            shape = 1.0 / self.cv**2
            return np.cumsum(rng.gamma(shape, 1.0 / (self.rate * shape), n))
        # diurnal: thin a Poisson process at the peak rate (Lewis and Shedler).
        peak = self.rate * (1.0 + self.amplitude)
        out: list[np.ndarray] = []
        have, t0 = 0, 0.0
        while have < n:
            m = max(64, 2 * (n - have))
            cand = t0 + np.cumsum(rng.exponential(1.0 / peak, m))
            keep = cand[rng.random(m) * peak < self.rate_at(cand)]
            out.append(keep)
            have += len(keep)
            t0 = float(cand[-1])
        return np.concatenate(out)[:n]


# --------------------------------------------------------------------------------------------------------------
# Sessions


@dataclass(frozen=True)
class Segment:
    """A run of `tokens` tokens whose content is named by `key`: equal keys mean equal content (a prefix of one
    endless token stream per key), so two segments with the same key share their first min(len) tokens."""

    key: tuple
    tokens: int


@dataclass
class Turn:
    index: int
    kind: str  # "user" (a human message) or "tool" (a tool result sent back by an agent)
    gap_s: float  # wait between the previous answer and this request (0 for the first turn)
    gap_kind: str  # "none" | "think" | "tool" | "idle"
    message: Segment  # the tokens this turn adds
    output: Segment  # the answer (its length is the workload's output length)
    input_tokens: int = 0  # whole prompt: shared prefix + history + message
    timestamp_s: float = 0.0  # nominal send time, assuming answers arrive instantly
    hash_ids: list[int] | None = None  # filled by assign_hash_ids

    @property
    def new_tokens(self) -> int:
        return self.message.tokens

    @property
    def output_tokens(self) -> int:
        return self.output.tokens


@dataclass
class Session:
    session_id: int
    workload: str
    arrival_s: float
    prefix: list[Segment]  # shared system prompt / repository or document context
    turns: list[Turn] = field(default_factory=list)
    hash_block_size: int | None = None  # block size of the turns' hash_ids, once assigned

    @property
    def prefix_tokens(self) -> int:
        return sum(s.tokens for s in self.prefix)

    def input_segments(self, turn: int) -> list[Segment]:
        """The whole prompt of a turn: prefix, every earlier message and answer, then this turn's message."""
        segs = list(self.prefix)
        for t in self.turns[:turn]:
            segs += [t.message, t.output]
        segs.append(self.turns[turn].message)
        return segs


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from any printable parts, stable across processes (unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@functools.lru_cache(maxsize=64)
def _zipf_cdf(n: int, s: float) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return np.cumsum(p / p.sum())


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate: a weighted mix of classes, an arrival process, and global knobs."""

    mix: tuple[tuple[WorkloadClass, float], ...]
    arrival: ArrivalProcess = ArrivalProcess()
    num_sessions: int = 100
    length_scale: float = 1.0
    max_context: int | None = None  # a session ends before a turn whose prompt + answer would exceed this
    # Tokens a chat template adds per message (role markers, separators; ChatML: 5), counted against max_context
    # for the system prompt, every user / tool message and every answer, so the guard holds on /v1/chat/completions.
    template_tokens: int = 8
    block_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.mix:
            raise ValueError("a workload needs at least one class")
        if any(w < 0 for _, w in self.mix) or sum(w for _, w in self.mix) <= 0:
            raise ValueError("workload mix weights must be >= 0 and not all zero")
        if self.num_sessions < 1:
            raise ValueError(f"num_sessions must be >= 1, got {self.num_sessions}")
        if not self.length_scale > 0:
            raise ValueError(f"length scale must be > 0, got {self.length_scale}")
        if self.template_tokens < 0:
            raise ValueError(f"template_tokens must be >= 0, got {self.template_tokens}")
        if self.max_context is not None and self.max_context < 8 + 3 * self.template_tokens:
            raise ValueError(f"max_context must be >= {8 + 3 * self.template_tokens} tokens (8 plus the chat template "
                             f"of a system prompt, a message and an answer), got {self.max_context}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @property
    def classes(self) -> list[WorkloadClass]:
        return [c.scaled(self.length_scale) if self.length_scale != 1.0 else c for c, _ in self.mix]

    @property
    def weights(self) -> np.ndarray:
        w = np.array([w for _, w in self.mix], dtype=float)
        return w / w.sum()

    def with_options(self, **changes) -> WorkloadSpec:
        return dataclasses.replace(self, **changes)


class _PoolLengths:
    """Lengths of shared pool items, fixed per (seed, class, pool) so that the same item is the same everywhere."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.cache: dict[tuple, int] = {}

    def length(self, cls_name: str, pool: str, item: int, dist: Dist) -> int:
        key = (cls_name, pool, item)
        if key not in self.cache:
            rng = np.random.default_rng(stable_seed("pool", self.seed, *key))
            self.cache[key] = dist.sample_int(rng, minimum=1)
        return self.cache[key]


def _pick(rng: np.random.Generator, pool: int, zipf_s: float) -> int:
    """Item i of the pool with probability proportional to 1 / (i + 1) ** zipf_s."""
    return min(pool - 1, int(np.searchsorted(_zipf_cdf(pool, zipf_s), rng.random(), side="right")))


def _make_session(
    sid: int, cls: WorkloadClass, arrival_s: float, spec: WorkloadSpec, pools: _PoolLengths, rng: np.random.Generator
) -> Session:
    seed = spec.seed
    prefix: list[Segment] = []
    for part, dist, pool, zipf_s in (
        ("system", cls.system_prompt_tokens, cls.system_prompt_pool, cls.system_prompt_zipf),
        ("context", cls.context_tokens, cls.context_pool, cls.context_zipf),
    ):
        if dist is None:
            continue
        if pool is None:  # unique to this session
            prefix.append(Segment((part, seed, cls.name, "session", sid), dist.sample_int(rng, minimum=1)))
        else:
            item = _pick(rng, pool, zipf_s)
            prefix.append(Segment((part, seed, cls.name, item), pools.length(cls.name, part, item, dist)))

    limit = spec.max_context
    if limit is not None:  # keep room for at least a short first exchange
        budget = max(1, (limit - 3 * spec.template_tokens) // 2)
        clipped: list[Segment] = []
        for s in prefix:
            if budget <= 0:
                break
            clipped.append(Segment(s.key, min(s.tokens, budget)))
            budget -= clipped[-1].tokens
        prefix = clipped

    session = Session(session_id=sid, workload=cls.name, arrival_s=arrival_s, prefix=prefix)
    num_turns = cls.turns.sample_int(rng, minimum=1)
    context = session.prefix_tokens
    per_turn_template = 2 * spec.template_tokens  # the message and its answer
    template = spec.template_tokens if prefix else 0  # the system prompt's
    now = arrival_s
    for k in range(num_turns):
        if k == 0:
            kind, gap, gap_kind = "user", 0.0, "none"
            new = cls.first_message_tokens.sample_int(rng, minimum=1)
        else:
            kind = "tool" if rng.random() < cls.tool_call_prob else "user"
            if kind == "tool":
                new = cls.tool_result_tokens.sample_int(rng, minimum=1)
                gap, gap_kind = cls.tool_latency_s.sample_one(rng), "tool"
            else:
                new = cls.message_tokens.sample_int(rng, minimum=1)
                if rng.random() < cls.idle_return_prob:
                    gap, gap_kind = cls.idle_gap_s.sample_one(rng), "idle"
                else:
                    gap, gap_kind = cls.think_time_s.sample_one(rng), "think"
        out = cls.output_tokens.sample_int(rng, minimum=1)
        if limit is not None and context + template + per_turn_template + new + out > limit:
            if k > 0:
                break
            # First turn: shrink the message, then the answer, so every session has at least one request.
            room = limit - context - template - per_turn_template
            out = max(1, min(out, room // 2))
            new = max(1, min(new, room - out))
        now += gap
        turn = Turn(
            index=k,
            kind=kind,
            gap_s=gap,
            gap_kind=gap_kind,
            message=Segment(("message", seed, sid, k), new),
            output=Segment(("output", seed, sid, k), out),
            input_tokens=context + new,
            timestamp_s=now,
        )
        session.turns.append(turn)
        context += new + out
        template += per_turn_template
    return session


def generate_sessions(spec: WorkloadSpec, with_hash_ids: bool = True) -> list[Session]:
    """Sessions of `spec`, sorted by arrival. Same spec (seed included) -> same sessions, bit for bit.

    Session i does not depend on num_sessions or on the arrival process, so a rate sweep replays the same
    conversations at different arrival times.
    """
    classes = spec.classes
    weights = spec.weights
    arrivals = spec.arrival.times(spec.num_sessions, np.random.default_rng(stable_seed("arrivals", spec.seed)))
    pools = _PoolLengths(spec.seed)
    sessions = []
    cdf = np.cumsum(weights)
    for sid in range(spec.num_sessions):
        rng = np.random.default_rng(stable_seed("session", spec.seed, sid))
        u = rng.random()  # drawn for every session, so the class choice never shifts the session's other draws
        cls = classes[min(len(classes) - 1, int(np.searchsorted(cdf, u, side="right")))]
        sessions.append(_make_session(sid, cls, float(arrivals[sid]), spec, pools, rng))
    if with_hash_ids:
        assign_hash_ids(sessions, spec.block_size)
    return sessions


# --------------------------------------------------------------------------------------------------------------
# Block hash ids


class BlockHasher:
    """Names token blocks by their content and position: a block's id is chained on its parent's id, so two
    prompts share a block id exactly when they share every token up to the end of that block. Ids are small
    sequential integers, as in the public traces (which remap their hashes the same way)."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._segments: dict[tuple, int] = {}
        self._blocks: dict[tuple, int] = {}

    def _segment_id(self, key: tuple) -> int:
        return self._segments.setdefault(key, len(self._segments))

    def _block_id(self, parent: int, pieces: tuple) -> int:
        return self._blocks.setdefault((parent, pieces), len(self._blocks))

    def walker(self) -> _BlockWalker:
        return _BlockWalker(self)

    def hash_ids(self, segments: Iterable[Segment]) -> list[int]:
        w = self.walker()
        for s in segments:
            w.extend(s)
        return w.snapshot()


class _BlockWalker:
    """Walks a growing prompt block by block; snapshot() gives the ids of the prompt so far (the last one partial)."""

    def __init__(self, hasher: BlockHasher) -> None:
        self.h = hasher
        self.full: list[int] = []
        self.parent = -1
        self.pieces: list[tuple[int, int, int]] = []
        self.fill = 0

    def extend(self, seg: Segment) -> None:
        bs = self.h.block_size
        sid = self.h._segment_id(seg.key)
        pos, end = 0, seg.tokens
        if self.fill:  # finish the open block first
            take = min(bs - self.fill, end)
            self.pieces.append((sid, 0, take))
            self.fill += take
            pos = take
            if self.fill == bs:
                self._close()
        blocks, full, parent = self.h._blocks, self.full, self.parent
        while end - pos >= bs:  # whole blocks inside this segment: the hot loop
            parent = blocks.setdefault((parent, ((sid, pos, pos + bs),)), len(blocks))
            full.append(parent)
            pos += bs
        self.parent = parent
        if pos < end:
            self.pieces.append((sid, pos, end))
            self.fill = end - pos

    def _close(self) -> None:
        self.parent = self.h._block_id(self.parent, tuple(self.pieces))
        self.full.append(self.parent)
        self.pieces, self.fill = [], 0

    def snapshot(self) -> list[int]:
        if not self.pieces:
            return list(self.full)
        return self.full + [self.h._block_id(self.parent, tuple(self.pieces))]


def assign_hash_ids(sessions: list[Session], block_size: int, hasher: BlockHasher | None = None) -> BlockHasher:
    """Fill turn.hash_ids for every turn; one hasher across sessions so shared prefixes share ids."""
    hasher = hasher or BlockHasher(block_size)
    for s in sessions:
        w = hasher.walker()
        for seg in s.prefix:
            w.extend(seg)
        for t in s.turns:
            w.extend(t.message)
            t.hash_ids = w.snapshot()
            w.extend(t.output)
        s.hash_block_size = block_size
    return hasher


# --------------------------------------------------------------------------------------------------------------
# The --workload SPEC string

_OPTION_ALIASES = {
    "rate": "rate",
    "arrival": "arrival",
    "cv": "cv",
    "period": "period",
    "amplitude": "amplitude",
    "sessions": "num_sessions",
    "num_sessions": "num_sessions",
    "scale": "length_scale",
    "length_scale": "length_scale",
    "max_context": "max_context",
    "template_tokens": "template_tokens",
    "block": "block_size",
    "block_size": "block_size",
    "seed": "seed",
}

WORKLOAD_SPEC_HELP = (
    "CLASS[,key=value...] or mix:CLASS=WEIGHT,...[,key=value...]; classes: "
    + ", ".join(WORKLOAD_CLASSES)
    + "; keys: rate (sessions/s), arrival (poisson|bursty|diurnal), cv, period (s), amplitude, sessions, "
    "scale (token lengths x), max_context, template_tokens (chat-template tokens per message counted against "
    "max_context, default 8), block, seed; CLASS.FIELD=VALUE sets a class field "
    "(a distribution's mean, or a number), e.g. chat.output_tokens=64"
)


def _number(key: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"workload option {key}={value!r}: expected a number") from None


def _override_class(cls: WorkloadClass, fld: str, value: str) -> WorkloadClass:
    names = {f.name for f in dataclasses.fields(WorkloadClass)} - {"name", "description"}
    if fld not in names:
        raise ValueError(f"{cls.name} has no field {fld!r}; fields: {', '.join(sorted(names))}")
    current = getattr(cls, fld)
    v = _number(f"{cls.name}.{fld}", value)
    if isinstance(current, Dist):  # keep the shape; bounds move with the mean
        if current.mean > 0 and current.kind != "geometric":
            return dataclasses.replace(cls, **{fld: current.scaled(v / current.mean)})
        return dataclasses.replace(cls, **{fld: dataclasses.replace(current, mean=v)})
    if current is None and fld.endswith("_tokens"):
        return dataclasses.replace(cls, **{fld: lognormal(v, 0.5)})
    if fld.endswith("_pool"):
        return dataclasses.replace(cls, **{fld: int(v) if v >= 1 else None})
    return dataclasses.replace(cls, **{fld: v})


def parse_workload_spec(text: str, **overrides) -> WorkloadSpec:
    """Parse a --workload SPEC, e.g. "chat", "coding_agent,rate=0.2,scale=0.05",
    "mix:chat=0.7,coding_agent=0.3,arrival=bursty,cv=3". Keyword overrides (num_sessions=..., seed=..., rate=...,
    length_scale=..., max_context=...) win over the string; None values are ignored."""
    text = text.strip()
    if not text:
        raise ValueError("empty workload spec; " + WORKLOAD_SPEC_HELP)
    is_mix = text.startswith("mix:")
    items = [p.strip() for p in (text[4:] if is_mix else text).split(",") if p.strip()]
    mix: list[tuple[str, float]] = []
    options: dict[str, str] = {}
    class_fields: list[tuple[str, str, str]] = []
    for i, item in enumerate(items):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        value = value.strip()
        if not eq:
            if i == 0 and not is_mix and key in WORKLOAD_CLASSES:
                mix.append((key, 1.0))
                continue
            raise ValueError(f"cannot read {item!r} in workload spec {text!r}; " + WORKLOAD_SPEC_HELP)
        if "." in key:
            cname, _, fld = key.partition(".")
            if cname not in WORKLOAD_CLASSES:
                raise ValueError(f"unknown workload class {cname!r}; choose one of {', '.join(WORKLOAD_CLASSES)}")
            class_fields.append((cname, fld, value))
        elif key in WORKLOAD_CLASSES:
            if not is_mix:
                raise ValueError(f"class weights need the mix: prefix, e.g. mix:{key}={value}")
            mix.append((key, _number(key, value)))
        elif key in _OPTION_ALIASES:
            options[_OPTION_ALIASES[key]] = value
        else:
            raise ValueError(f"unknown workload class or option {key!r} in {text!r}; " + WORKLOAD_SPEC_HELP)
    if not mix:
        raise ValueError(f"workload spec {text!r} names no class; " + WORKLOAD_SPEC_HELP)

    classes = {name: WORKLOAD_CLASSES[name] for name, _ in mix}
    for cname, fld, value in class_fields:
        if cname not in classes:
            raise ValueError(f"{cname}.{fld} is set but {cname} is not in the workload")
        classes[cname] = _override_class(classes[cname], fld, value)

    for k, v in overrides.items():
        if v is not None:
            options[_OPTION_ALIASES.get(k, k)] = str(v)

    arrival = ArrivalProcess(
        kind=options.get("arrival", "poisson"),
        rate=_number("rate", options.get("rate", "1.0")),
        cv=_number("cv", options.get("cv", "2.0")),
        period_s=_number("period", options.get("period", "86400")),
        amplitude=_number("amplitude", options.get("amplitude", "0.5")),
    )
    max_context = options.get("max_context")
    return WorkloadSpec(
        mix=tuple((classes[name], w) for name, w in mix),
        arrival=arrival,
        num_sessions=int(_number("sessions", options.get("num_sessions", "100"))),
        length_scale=_number("scale", options.get("length_scale", "1.0")),
        max_context=int(_number("max_context", max_context)) if max_context not in (None, "", "none") else None,
        template_tokens=int(_number("template_tokens", options.get("template_tokens", "8"))),
        block_size=int(_number("block", options.get("block_size", "16"))),
        seed=int(_number("seed", options.get("seed", "0"))),
    )
