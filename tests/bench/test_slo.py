import json
import math

import pytest

from tokenmill.bench.metrics import RequestResult, RunResult, summarize_run
from tokenmill.bench.report import jsonable, run_payload
from tokenmill.bench.slo import (
    SLOTarget,
    evaluate_slo,
    meets,
    parse_duration,
    parse_slo,
)
from tokenmill.bench.sweep import (
    bisect_max_rate,
    max_sustainable_rate,
    parse_bisect,
    parse_rates,
    sweep_rates,
)


def test_parse_slo():
    assert parse_slo("ttft_p90=2s,tpot_p90=100ms") == [SLOTarget("ttft", 2.0, 90.0), SLOTarget("tpot", 0.1, 90.0)]
    assert parse_slo(" e2e=30 , itl_p99.9=250us, ttft_mean=1.5s") == [
        SLOTarget("e2e", 30.0),
        SLOTarget("itl", 250e-6, 99.9),
        SLOTarget("ttft", 1.5, None, mean=True),
    ]
    assert parse_slo("") == [] and parse_slo(None) == []
    assert parse_duration("0.5m") == 30.0


@pytest.mark.parametrize(
    "text,message",
    [
        ("ttft_p90", "needs a threshold"),
        ("latency=2s", "unknown SLO metric"),
        ("ttft_p0=2s", "percentile"),
        ("ttft_p101=2s", "percentile"),
        ("ttft=fast", "duration"),
        ("ttft=2h", "unit"),
        ("ttft=0s", "> 0"),
    ],
)
def test_parse_slo_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_slo(text)


def req(ttft, e2e, n=11, ok=True, itl=None):
    r = RequestResult(0, 0, "w", 0.0, 0.0, ok=ok, ttft_s=ttft, e2e_s=e2e, output_tokens=n,
                      itl_s=itl if itl is not None else [(e2e - ttft) / (n - 1)] * (n - 1))
    if not ok:
        r.error = "http_500: boom"
    return r


def test_goodput_and_percentile_targets():
    # TPOT = (e2e - ttft) / 10.
    reqs = [req(0.5, 1.5), req(1.0, 2.0), req(1.5, 4.5), req(3.0, 4.0), req(0.2, 0.3, ok=False)]
    run = RunResult(reqs, duration_s=10.0)
    targets = parse_slo("ttft_p25=1s,tpot=150ms")
    assert [meets(r, targets) for r in reqs] == [True, True, False, False, False]
    rep = evaluate_slo(run, targets, min_attainment=0.5)
    assert rep.goodput_rps == pytest.approx(0.2) and rep.attainment == pytest.approx(0.4)
    ttft, tpot = rep.checks
    assert ttft.observed_s == 1.0 and ttft.ok  # p25 of 0.5, 1, 1.5, 3, inf (a measured value, not interpolated)
    assert tpot.observed_s is None and tpot.attainment == pytest.approx(0.6) and tpot.ok
    assert not evaluate_slo(run, targets, min_attainment=0.9).all_ok
    assert not evaluate_slo(run, parse_slo("ttft_p90=10s")).all_ok  # the failed request counts as infinite
    assert evaluate_slo(run, parse_slo("ttft_p75=10s")).all_ok
    assert evaluate_slo(run, parse_slo("e2e_mean=100s")).checks[0].observed_s == math.inf


def test_itl_target_uses_each_requests_own_gaps():
    r = req(0.1, 1.0, n=4, itl=[0.01, 0.02, 0.5])
    assert meets(r, parse_slo("itl_p50=30ms")) and not meets(r, parse_slo("itl=100ms"))


def test_summary_of_run():
    reqs = [req(0.5, 1.5), req(1.0, 2.0, n=3), req(0.2, 0.3, ok=False)]
    reqs[0].prompt_tokens, reqs[0].cached_tokens = 100, 40
    reqs[1].expected_input_tokens = 50
    reqs[0].expected_output_tokens = 11
    s = summarize_run(RunResult(reqs, duration_s=4.0, abandoned_turns=2))
    assert (s.num_ok, s.num_failed, s.num_abandoned) == (2, 1, 2)
    assert s.request_throughput == pytest.approx(0.5)
    assert s.output_token_throughput == pytest.approx(14 / 4) and s.input_token_throughput == pytest.approx(150 / 4)
    assert s.ttft.mean == pytest.approx(0.75) and s.ttft.count == 2
    assert s.tpot.max == pytest.approx(0.5) and s.itl.count == 12
    assert s.cache_hit_ratio == pytest.approx(0.4) and s.output_length_match == 0.5
    assert s.errors == {"http_500": 1}
    payload = jsonable(run_payload(RunResult(reqs, 4.0), s, evaluate_slo(RunResult(reqs, 4.0), parse_slo("e2e_p99=1s"))))
    text = json.dumps(payload, allow_nan=False)  # inf (the failed request) became null
    assert json.loads(text)["summary"]["num_ok"] == 2


def _fake_run_at(capacity):
    """A server that meets a 1 s TTFT below `capacity` req/s and misses it above."""

    def run_at(rate):
        ttft = 0.2 if rate <= capacity else 3.0
        return RunResult([req(ttft, ttft + 1.0) for _ in range(10)], duration_s=10 / rate, label=str(rate))

    return run_at


def test_sweep_and_bisection_find_the_capacity():
    targets = parse_slo("ttft_p90=1s")
    points = sweep_rates(_fake_run_at(3.0), [4, 0.5, 1, 2], targets)
    assert [p.rate for p in points] == [0.5, 1, 2, 4]
    assert [p.ok for p in points] == [True, True, True, False]
    assert max_sustainable_rate(points) == 2
    assert points[2].slo.goodput_rps == pytest.approx(2.0)
    points = bisect_max_rate(_fake_run_at(3.0), 0.5, 16, targets, iterations=6)
    best = max_sustainable_rate(points)
    assert 2.6 < best <= 3.0
    assert max_sustainable_rate(bisect_max_rate(_fake_run_at(0.1), 0.5, 16, targets)) is None
    assert len(bisect_max_rate(_fake_run_at(100), 0.5, 16, targets)) == 1


def test_rate_parsers():
    assert parse_rates("0.5,1, 2") == [0.5, 1, 2]
    assert parse_bisect("0.1:8") == (0.1, 8)
    for bad in ("", "a,b", "1,-2"):
        with pytest.raises(ValueError):
            parse_rates(bad)
    for bad in ("8:0.1", "1", "x:y", "0:1"):
        with pytest.raises(ValueError):
            parse_bisect(bad)
