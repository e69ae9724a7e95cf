"""Rate sweeps: run the same workload at several arrival rates and find the highest rate that meets the SLOs."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenmill.bench.metrics import RunResult, RunSummary, summarize_run
from tokenmill.bench.slo import SLOReport, SLOTarget, evaluate_slo


@dataclass
class SweepPoint:
    rate: float
    run: RunResult
    summary: RunSummary
    slo: SLOReport

    @property
    def ok(self) -> bool:
        return self.slo.all_ok


def measure(
    run_at: Callable[[float], RunResult], rate: float, targets: Sequence[SLOTarget], min_attainment: float
) -> SweepPoint:
    run = run_at(rate)
    return SweepPoint(rate, run, summarize_run(run), evaluate_slo(run, targets, min_attainment))


def sweep_rates(
    run_at: Callable[[float], RunResult],
    rates: Sequence[float],
    targets: Sequence[SLOTarget],
    min_attainment: float = 0.9,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> list[SweepPoint]:
    """One run per rate, in increasing order."""
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"sweep rates must be positive numbers, got {list(rates)}")
    points = []
    for rate in sorted(rates):
        p = measure(run_at, rate, targets, min_attainment)
        points.append(p)
        if on_point:
            on_point(p)
    return points


def bisect_max_rate(
    run_at: Callable[[float], RunResult],
    low: float,
    high: float,
    targets: Sequence[SLOTarget],
    iterations: int = 5,
    min_attainment: float = 0.9,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> list[SweepPoint]:
    """Bisection in log-rate between low and high: high passing or low failing ends it early."""
    if not 0 < low < high:
        raise ValueError(f"bisection needs 0 < low < high, got low={low}, high={high}")
    points: list[SweepPoint] = []

    def probe(rate: float) -> bool:
        p = measure(run_at, rate, targets, min_attainment)
        points.append(p)
        if on_point:
            on_point(p)
        return p.ok

    if probe(high) or not probe(low):
        return points
    good, bad = low, high
    for _ in range(iterations):
        mid = math.sqrt(good * bad)
        if probe(mid):
            good = mid
        else:
            bad = mid
    return points


def max_sustainable_rate(points: Sequence[SweepPoint]) -> float | None:
    """The highest rate whose run met every SLO target, or None."""
    ok = [p.rate for p in points if p.ok]
    return max(ok) if ok else None


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"cannot read rates {text!r}; write e.g. 0.5,1,2,4") from None
    if not rates or any(not r > 0 for r in rates):
        raise ValueError(f"rates must be positive numbers, got {text!r}")
    return rates


def parse_bisect(text: str) -> tuple[float, float]:
    """'LOW:HIGH' -> (low, high)."""
    lo, sep, hi = text.partition(":")
    try:
        low, high = float(lo), float(hi)
    except ValueError:
        raise ValueError(f"cannot read rate range {text!r}; write LOW:HIGH, e.g. 0.1:8") from None
    if not sep or not 0 < low < high:
        raise ValueError(f"rate range must be LOW:HIGH with 0 < LOW < HIGH, got {text!r}")
    return low, high
