import dataclasses
import math

import numpy as np
import pytest

from tokenmill.workload.sessions import (
    CHAT,
    CODING_AGENT,
    WORKLOAD_CLASSES,
    ArrivalProcess,
    BlockHasher,
    Dist,
    Segment,
    WorkloadSpec,
    const,
    generate_sessions,
    geometric,
    lognormal,
    parse_workload_spec,
)


@pytest.mark.parametrize(
    "dist",
    [lognormal(300, 1.5, low=0), Dist("gamma", 40.0, 0.5), Dist("exponential", 3.0), geometric(4.0), const(7)],
    ids=lambda d: d.kind,
)
def test_distribution_mean_and_cv_match_parameters(dist):
    x = dist.sample(np.random.default_rng(0), 200_000)
    assert x.mean() == pytest.approx(dist.mean, rel=0.03)
    if dist.kind in ("lognormal", "gamma"):
        assert x.std() / x.mean() == pytest.approx(dist.cv, rel=0.08)
    if dist.kind == "geometric":
        assert x.min() >= 1 and np.all(x == np.round(x))


def test_distribution_rejects_bad_parameters():
    with pytest.raises(ValueError, match="unknown distribution"):
        Dist("zipf", 3.0)
    with pytest.raises(ValueError, match="mean >= 1"):
        geometric(0.5)
    with pytest.raises(ValueError, match="bounds"):
        Dist("lognormal", 10, 1, low=5, high=1)


def test_poisson_and_bursty_interarrivals():
    rng = np.random.default_rng(1)
    t = ArrivalProcess("poisson", rate=4.0).times(50_000, rng)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)
    t = ArrivalProcess("bursty", rate=2.0, cv=3.0).times(50_000, rng)
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.5, rel=0.06)
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)


def test_diurnal_rate_follows_the_sine():
    proc = ArrivalProcess("diurnal", rate=10.0, period_s=100.0, amplitude=0.8)
    t = proc.times(40_000, np.random.default_rng(2))
    assert np.all(np.diff(t) >= 0)
    assert len(t) / t[-1] == pytest.approx(10.0, rel=0.05)
    phase = (t % 100.0) / 100.0
    high, low = np.sum(phase < 0.5), np.sum(phase >= 0.5)
    # Integral of 1 + A sin over each half period: (1 +- 2A/pi) / 2.
    expected = (1 + 2 * 0.8 / math.pi) / (1 - 2 * 0.8 / math.pi)
    assert high / low == pytest.approx(expected, rel=0.08)


def test_arrival_rejects_bad_parameters():
    with pytest.raises(ValueError, match="rate"):
        ArrivalProcess(rate=0)
    with pytest.raises(ValueError, match="unknown arrival"):
        ArrivalProcess(kind="weekly")


def _custom_class():
    # Wide bounds so that clipping does not move the means.
    return dataclasses.replace(
        CHAT,
        name="custom",
        turns=geometric(5.0),
        first_message_tokens=lognormal(200, 1.0, low=0),
        message_tokens=lognormal(80, 1.0, low=0),
        tool_result_tokens=lognormal(500, 1.0, low=0),
        output_tokens=lognormal(150, 0.8, low=0),
        tool_call_prob=0.4,
        think_time_s=lognormal(20.0, 1.0, low=0),
        tool_latency_s=lognormal(2.0, 1.0, low=0),
        idle_return_prob=0.1,
        idle_gap_s=lognormal(3600.0, 0.5, low=0),
        system_prompt_tokens=lognormal(300, 0.5, low=0),
    )


def test_generated_statistics_match_class_parameters():
    cls = _custom_class()
    spec = WorkloadSpec(mix=((cls, 1.0),), arrival=ArrivalProcess("poisson", rate=2.0), num_sessions=4000, seed=3)
    sessions = generate_sessions(spec, with_hash_ids=False)
    turns = [t for s in sessions for t in s.turns]
    later = [t for t in turns if t.index > 0]
    assert np.mean([len(s.turns) for s in sessions]) == pytest.approx(5.0, rel=0.05)
    assert np.mean([t.output_tokens for t in turns]) == pytest.approx(150, rel=0.04)
    assert np.mean([t.new_tokens for t in turns if t.index == 0]) == pytest.approx(200, rel=0.06)
    tools = [t for t in later if t.kind == "tool"]
    humans = [t for t in later if t.kind == "user"]
    assert len(tools) / len(later) == pytest.approx(0.4, abs=0.02)
    assert np.mean([t.new_tokens for t in tools]) == pytest.approx(500, rel=0.06)
    assert np.mean([t.new_tokens for t in humans]) == pytest.approx(80, rel=0.06)
    assert np.mean([t.gap_s for t in tools]) == pytest.approx(2.0, rel=0.06)
    idle = [t for t in humans if t.gap_kind == "idle"]
    assert len(idle) / len(humans) == pytest.approx(0.1, abs=0.015)
    assert np.mean([t.gap_s for t in idle]) == pytest.approx(3600, rel=0.08)
    assert np.mean([t.gap_s for t in humans if t.gap_kind == "think"]) == pytest.approx(20.0, rel=0.06)
    arrivals = np.array([s.arrival_s for s in sessions])
    assert 1 / np.diff(arrivals).mean() == pytest.approx(2.0, rel=0.06)
    # The system prompt pool: 16 items with Zipf(1) popularity; item 0 is the most frequent.
    items = [s.prefix[0].key[-1] for s in sessions]
    counts = np.bincount(items, minlength=16)
    p = 1 / np.arange(1, 17)
    assert counts[0] / len(items) == pytest.approx(p[0] / p.sum(), abs=0.03)


def test_turn_bookkeeping_is_consistent():
    sessions = generate_sessions(parse_workload_spec("coding_agent,sessions=20,scale=0.1,seed=5"))
    for s in sessions:
        context = s.prefix_tokens
        now = s.arrival_s
        for t in s.turns:
            now += t.gap_s
            assert t.timestamp_s == pytest.approx(now)
            assert t.input_tokens == context + t.new_tokens
            assert sum(seg.tokens for seg in s.input_segments(t.index)) == t.input_tokens
            context += t.new_tokens + t.output_tokens
            assert len(t.hash_ids) == math.ceil(t.input_tokens / 16)


def test_defaults_land_near_their_documented_means():
    sessions = generate_sessions(parse_workload_spec("chat,sessions=3000,seed=1"), with_hash_ids=False)
    turns = [t for s in sessions for t in s.turns]
    assert np.mean([t.output_tokens for t in turns]) == pytest.approx(250, rel=0.08)
    assert np.mean([len(s.turns) for s in sessions]) == pytest.approx(3.0, rel=0.08)


def test_same_seed_same_sessions_and_independent_of_count():
    a = generate_sessions(parse_workload_spec("mix:chat=0.5,tool_agent=0.5,sessions=30,seed=7"))
    b = generate_sessions(parse_workload_spec("mix:chat=0.5,tool_agent=0.5,sessions=30,seed=7"))
    c = generate_sessions(parse_workload_spec("mix:chat=0.5,tool_agent=0.5,sessions=60,seed=7"))
    d = generate_sessions(parse_workload_spec("mix:chat=0.5,tool_agent=0.5,sessions=30,seed=8"))
    assert a == b
    by_id = {s.session_id: s for s in c}
    for s in a:
        other = by_id[s.session_id]
        assert (s.workload, s.prefix, [t.message for t in s.turns]) == (
            other.workload,
            other.prefix,
            [t.message for t in other.turns],
        )
    assert [t.output_tokens for s in a for t in s.turns] != [t.output_tokens for s in d for t in s.turns]


def test_mix_weights_choose_classes():
    sessions = generate_sessions(parse_workload_spec("mix:chat=0.7,coding_agent=0.3,sessions=1500,scale=0.01"),
                                 with_hash_ids=False)
    share = np.mean([s.workload == "chat" for s in sessions])
    assert share == pytest.approx(0.7, abs=0.03)


def test_length_scale_and_max_context():
    full = generate_sessions(parse_workload_spec("coding_agent,sessions=200,seed=2"), with_hash_ids=False)
    small = generate_sessions(parse_workload_spec("coding_agent,sessions=200,seed=2,scale=0.05"), with_hash_ids=False)
    ratio = np.mean([s.prefix_tokens for s in small]) / np.mean([s.prefix_tokens for s in full])
    assert ratio == pytest.approx(0.05, rel=0.1)
    capped = generate_sessions(parse_workload_spec("coding_agent,sessions=50,seed=2,max_context=2048"),
                               with_hash_ids=False)
    for s, uncapped in zip(capped, full):
        assert len(s.turns) >= 1
        last = s.turns[-1]
        # content plus 8 chat-template tokens for the system prompt and for every message and answer so far
        template = 8 * ((1 if s.prefix else 0) + 2 * len(s.turns))
        assert last.input_tokens + last.output_tokens + template <= 2048
        assert s.turns[0].new_tokens <= uncapped.turns[0].new_tokens  # shrunk, never grown
    assert any(len(s.turns) < len(u.turns) for s, u in zip(capped, full))
    # Without template tokens the same cap admits more: the guard counts them, it does not just cut turns.
    bare = generate_sessions(parse_workload_spec("coding_agent,sessions=50,seed=2,max_context=2048,template_tokens=0"),
                             with_hash_ids=False)
    def admitted(sessions):
        return sum(s.turns[-1].input_tokens + s.turns[-1].output_tokens for s in sessions)

    assert admitted(bare) > admitted(capped)
    assert all(s.turns[-1].input_tokens + s.turns[-1].output_tokens <= 2048 for s in bare)


@pytest.mark.parametrize("limit", [32, 40, 64])
def test_tiny_max_context_still_fits_one_exchange(limit):
    sessions = generate_sessions(parse_workload_spec(f"coding_agent,sessions=20,seed=5,max_context={limit}"),
                                 with_hash_ids=False)
    for s in sessions:
        first = s.turns[0]
        template = 8 * ((1 if s.prefix else 0) + 2)
        assert len(s.turns) >= 1 and first.new_tokens >= 1 and first.output_tokens >= 1
        assert first.input_tokens + first.output_tokens + template <= limit


def test_max_context_must_hold_the_template():
    with pytest.raises(ValueError, match="max_context must be >= 32"):
        parse_workload_spec("chat,max_context=31")
    with pytest.raises(ValueError, match="template_tokens must be >= 0"):
        parse_workload_spec("chat,template_tokens=-1")


def test_shared_prefixes_share_hash_ids_and_ids_are_chained():
    sessions = generate_sessions(parse_workload_spec("coding_agent,sessions=40,scale=0.05,seed=4"))
    by_prefix = {}
    for s in sessions:
        by_prefix.setdefault(tuple(seg.key for seg in s.prefix), []).append(s)
    shared = [group for group in by_prefix.values() if len(group) > 1]
    assert shared, "expected some sessions with the same system prompt and repository"
    a, b = shared[0][:2]
    n_full = a.prefix_tokens // 16
    assert a.turns[0].hash_ids[:n_full] == b.turns[0].hash_ids[:n_full]
    assert not set(a.turns[0].hash_ids[n_full:]) & set(b.turns[0].hash_ids[n_full:])
    # Each turn extends the previous one's full blocks.
    for s in sessions:
        for prev, cur in zip(s.turns, s.turns[1:]):
            full = prev.input_tokens // 16
            assert cur.hash_ids[:full] == prev.hash_ids[:full]
    # Chained: the same id at position i implies the same ids before it.
    where = {}
    for s in sessions:
        for t in s.turns:
            for i, h in enumerate(t.hash_ids):
                where.setdefault(h, (i, t.hash_ids[:i]))
                assert where[h] == (i, t.hash_ids[:i])


def test_block_hasher_pieces():
    h = BlockHasher(4)
    a = h.hash_ids([Segment(("x",), 6), Segment(("y",), 5)])
    b = h.hash_ids([Segment(("x",), 6), Segment(("z",), 5)])
    c = h.hash_ids([Segment(("x",), 8)])
    assert len(a) == 3 and a[0] == b[0] == c[0]
    assert a[1] != b[1] and a[1] != c[1]


def test_spec_parser():
    spec = parse_workload_spec("mix:chat=0.7,coding_agent=0.3,rate=0.5,arrival=bursty,cv=3,sessions=12,scale=0.1")
    assert [c.name for c, _ in spec.mix] == ["chat", "coding_agent"]
    assert spec.weights.tolist() == pytest.approx([0.7, 0.3])
    assert spec.arrival == ArrivalProcess("bursty", rate=0.5, cv=3.0)
    assert spec.num_sessions == 12 and spec.length_scale == 0.1
    assert spec.classes[1].context_tokens.mean == pytest.approx(CODING_AGENT.context_tokens.mean * 0.1)
    spec = parse_workload_spec("tool_agent", num_sessions=3, seed=9, rate=None)
    assert spec.num_sessions == 3 and spec.seed == 9 and spec.arrival.rate == 1.0
    spec = parse_workload_spec("chat,chat.output_tokens=64,chat.turns=2,arrival=diurnal,period=600")
    cls = spec.classes[0]
    assert cls.output_tokens.mean == 64 and cls.output_tokens.kind == "lognormal" and cls.turns.mean == 2
    assert spec.arrival.kind == "diurnal" and spec.arrival.period_s == 600
    assert set(WORKLOAD_CLASSES) == {"chat", "coding_agent", "long_document_qa", "batch_summarization", "tool_agent",
                                     "random"}


def test_random_class_makes_fixed_size_requests_with_nothing_shared():
    spec = parse_workload_spec("random,sessions=20,random.first_message_tokens=300,random.output_tokens=50")
    sessions = generate_sessions(spec)
    assert all(len(s.turns) == 1 and not s.prefix for s in sessions)
    assert {s.turns[0].input_tokens for s in sessions} == {300}
    assert {s.turns[0].output.tokens for s in sessions} == {50}
    hashes = [tuple(s.turns[0].hash_ids) for s in sessions]
    assert len({h[0] for h in hashes}) == len(sessions)  # no block shared between requests


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty"),
        ("chitchat", "cannot read"),
        ("chat,speed=3", "unknown workload class or option"),
        ("chat=0.5,tool_agent=0.5", "mix:"),
        ("mix:chat=0.5,bogus=0.5", "unknown workload class or option"),
        ("chat,rate=fast", "expected a number"),
        ("chat,rate=-1", "rate"),
        ("chat,coding_agent.turns=3", "not in the workload"),
        ("chat,chat.colour=3", "no field"),
        ("chat,arrival=weekly", "unknown arrival"),
        ("rate=2", "names no class"),
    ],
)
def test_spec_parser_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_workload_spec(text)
