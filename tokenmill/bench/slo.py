"""Service-level objectives: parse `--slo ttft_p90=2s,tpot_p90=100ms`, check a run, compute goodput.

A target names a metric (ttft, tpot, itl, e2e), an optional percentile and a threshold. Every target is also a
per-request limit: a request "meets the SLOs" when it succeeded and each of its metrics is within every threshold
(for itl: the request's own percentile of its gaps, or its largest gap when no percentile is given). Goodput is the
rate of such requests. The run holds a target with a percentile when that percentile over all requests (failed
requests count as infinitely slow) is within the threshold; a target without a percentile holds when at least
`min_attainment` of the requests meet it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokenmill.bench.metrics import RequestResult, RunResult

METRICS = ("ttft", "tpot", "itl", "e2e")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "m": 60.0, "min": 60.0}
_TARGET = re.compile(r"^(?P<metric>[a-z0-9]+?)(?:_(?:p(?P<pct>\d+(?:\.\d+)?)|(?P<mean>mean)))?$")
_VALUE = re.compile(r"^(?P<num>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[a-zµ]*)$")


@dataclass(frozen=True)
class SLOTarget:
    metric: str  # ttft | tpot | itl | e2e
    threshold_s: float
    percentile: float | None = None  # None: per-request limit checked by attainment
    mean: bool = False  # ttft_mean=...: the run's mean must be within the threshold

    def label(self) -> str:
        suffix = "_mean" if self.mean else (f"_p{self.percentile:g}" if self.percentile is not None else "")
        return f"{self.metric}{suffix}<={self.threshold_s * 1000:g}ms"


def parse_duration(text: str) -> float:
    """'2s', '100ms', '250us', '1.5' (seconds) -> seconds."""
    m = _VALUE.match(text.strip().lower())
    if not m:
        raise ValueError(f"cannot read {text!r} as a duration; write e.g. 2s, 100ms or 250us")
    unit = m["unit"] or "s"
    if unit not in _UNITS:
        raise ValueError(f"unknown time unit {unit!r} in {text!r}; use s, ms or us")
    return float(m["num"]) * _UNITS[unit]


def parse_slo(text: str | None) -> list[SLOTarget]:
    """Parse 'ttft_p90=2s,tpot_p90=100ms,e2e=30s'. Empty or None -> no targets."""
    if not text or not text.strip():
        return []
    targets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"SLO {part!r} needs a threshold, e.g. ttft_p90=2s")
        m = _TARGET.match(name.strip().lower())
        if not m or m["metric"] not in METRICS:
            raise ValueError(f"unknown SLO metric {name!r}; use one of {', '.join(METRICS)}, optionally _pNN or _mean")
        pct = float(m["pct"]) if m["pct"] is not None else None
        if pct is not None and not 0 < pct <= 100:
            raise ValueError(f"SLO percentile must be in (0, 100], got {pct:g} in {part!r}")
        threshold = parse_duration(value)
        if threshold <= 0:
            raise ValueError(f"SLO threshold must be > 0 in {part!r}")
        targets.append(SLOTarget(m["metric"], threshold, pct, bool(m["mean"])))
    return targets


def request_value(r: RequestResult, target: SLOTarget) -> float:
    """The request's value of the target's metric; inf for a failed request or a missing measurement."""
    if not r.ok:
        return math.inf
    if target.metric == "ttft":
        v = r.ttft_s
    elif target.metric == "e2e":
        v = r.e2e_s
    elif target.metric == "tpot":
        v = r.tpot_s if r.tpot_s is not None else 0.0  # a one-token answer has no time per output token
    else:
        if not r.itl_s:
            v = 0.0
        elif target.percentile is not None:
            v = float(np.percentile(r.itl_s, target.percentile))
        else:
            v = max(r.itl_s)
    return math.inf if v is None else float(v)


def meets(r: RequestResult, targets: Sequence[SLOTarget]) -> bool:
    return r.ok and all(request_value(r, t) <= t.threshold_s for t in targets)


@dataclass
class TargetCheck:
    target: str
    metric: str
    percentile: float | None
    threshold_s: float
    observed_s: float | None  # the run's percentile/mean (None for per-request targets)
    attainment: float  # fraction of requests within the threshold
    ok: bool


@dataclass
class SLOReport:
    checks: list[TargetCheck]
    attainment: float  # fraction of requests meeting every target
    goodput_rps: float  # requests meeting every target, per second
    all_ok: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate_slo(run: RunResult, targets: Sequence[SLOTarget], min_attainment: float = 0.9) -> SLOReport:
    if not 0.0 <= min_attainment <= 1.0:
        raise ValueError(f"min_attainment must be in [0, 1], got {min_attainment}")
    reqs = run.requests
    dur = run.duration_s if run.duration_s > 0 else math.nan
    if not reqs:
        return SLOReport([], 0.0, 0.0, False)
    checks = []
    for t in targets:
        values = np.array([request_value(r, t) for r in reqs], dtype=float)
        attained = float(np.mean(values <= t.threshold_s))
        if t.mean:
            observed = float(values.mean())
            ok = observed <= t.threshold_s
        elif t.percentile is not None:
            observed = float(np.percentile(values, t.percentile, method="higher"))
            ok = observed <= t.threshold_s
        else:
            observed = None
            ok = attained >= min_attainment
        checks.append(TargetCheck(t.label(), t.metric, t.percentile, t.threshold_s, observed, attained, ok))
    good = sum(meets(r, targets) for r in reqs)
    all_ok = all(c.ok for c in checks) and (bool(targets) or all(r.ok for r in reqs))
    return SLOReport(checks, good / len(reqs), good / dur, all_ok)
