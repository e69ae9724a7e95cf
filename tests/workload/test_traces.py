import json
import math
from datetime import datetime

import pytest

from tokenmill.workload.sessions import generate_sessions, parse_workload_spec
from tokenmill.workload.traces import (
    FORMATS,
    Trace,
    TraceRequest,
    canonical_hash_ids,
    convert_trace,
    detect_format,
    prefix_reuse,
    read_trace,
    rechunk_hash_ids,
    sessions_to_trace,
    summarize_trace,
    write_trace,
)

MOONCAKE_LINES = [
    {"timestamp": 0, "input_length": 6755, "output_length": 500, "hash_ids": list(range(14))},
    {"timestamp": 0, "input_length": 7319, "output_length": 490, "hash_ids": [0] + list(range(14, 28))},
    {"timestamp": 3052, "input_length": 7234, "output_length": 794, "hash_ids": [0] + list(range(28, 42))},
    {"timestamp": 3052, "input_length": 2287, "output_length": 316, "hash_ids": [0, 42, 43, 44, 45]},
    {"timestamp": 5001, "input_length": 7400, "output_length": 12, "hash_ids": list(range(13)) + [46, 47]},
]
QWEN_LINES = [
    {"chat_id": 0, "parent_chat_id": -1, "timestamp": 0.5, "input_length": 40, "output_length": 8,
     "type": "text", "turn": 1, "hash_ids": [1, 2, 3]},
    {"chat_id": 1, "parent_chat_id": -1, "timestamp": 1.25, "input_length": 35, "output_length": 5,
     "type": "search", "turn": 1, "hash_ids": [1, 2, 9]},
    {"chat_id": 2, "parent_chat_id": 0, "timestamp": 9.0, "input_length": 70, "output_length": 20,
     "type": "text", "turn": 2, "hash_ids": [1, 2, 4, 5, 6]},
]
AZURE_TEXT = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,879,55
"""
BURSTGPT_TEXT = """Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type
5,ChatGPT,472,18,490,Conversation log
45,ChatGPT,1087,230,1317,Conversation log
118,GPT-4,417,276,693,API log
"""


@pytest.fixture
def samples(tmp_path):
    paths = {}
    p = tmp_path / "mooncake.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in MOONCAKE_LINES))
    paths["mooncake"] = p
    p = tmp_path / "qwen.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in QWEN_LINES))
    paths["qwen"] = p
    p = tmp_path / "azure.csv"
    p.write_text(AZURE_TEXT)
    paths["azure"] = p
    p = tmp_path / "burstgpt.csv"
    p.write_text(BURSTGPT_TEXT)
    paths["burstgpt"] = p
    return paths


def test_detect_and_read_every_format(samples):
    for fmt, path in samples.items():
        assert detect_format(path) == fmt
    m = read_trace(samples["mooncake"])
    assert m.block_size == 512 and len(m) == 5
    assert m.requests[2].timestamp_s == pytest.approx(3.052) and m.requests[3].hash_ids == [0, 42, 43, 44, 45]
    q = read_trace(samples["qwen"])
    assert q.block_size == 16 and q.requests[2].parent_chat_id == 0 and q.requests[1].request_type == "search"
    a = read_trace(samples["azure"])
    assert a.start_time == datetime(2023, 11, 16, 18, 15, 46, 680590)
    assert a.requests[1].timestamp_s == pytest.approx(4.314579) and a.requests[2].input_length == 879
    assert not a.has_hash_ids
    b = read_trace(samples["burstgpt"])
    assert [r.timestamp_s for r in b.requests] == [5, 45, 118] and b.requests[2].model == "GPT-4"
    assert b.requests[2].log_type == "API log" and b.requests[1].output_length == 230


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_is_exact(samples, tmp_path, fmt):
    t = read_trace(samples[fmt])
    out = tmp_path / f"again.{fmt}"
    write_trace(t, out, fmt)
    again = read_trace(out, fmt)
    assert again.requests == t.requests
    assert again.start_time == t.start_time
    if fmt in ("mooncake", "qwen"):
        assert [json.loads(x) for x in out.read_text().splitlines()] == [
            json.loads(x) for x in samples[fmt].read_text().splitlines()
        ]
    else:
        assert out.read_text() == samples[fmt].read_text()


@pytest.mark.parametrize("src", FORMATS)
@pytest.mark.parametrize("dst", FORMATS)
def test_conversion_between_every_pair_keeps_what_both_formats_carry(samples, tmp_path, src, dst):
    t = read_trace(samples[src])
    out = tmp_path / f"converted.{dst}"
    write_trace(t, out, dst)
    c = read_trace(out, dst)
    assert len(c) == len(t)
    assert [r.input_length for r in c.requests] == [r.input_length for r in t.requests]
    assert [r.output_length for r in c.requests] == [r.output_length for r in t.requests]
    t0, c0 = t.requests[0].timestamp_s, c.requests[0].timestamp_s  # Azure times count from the first request
    for a, b in zip(t.requests, c.requests):
        assert b.timestamp_s - c0 == pytest.approx(a.timestamp_s - t0, abs=1e-3)
    if dst in ("mooncake", "qwen"):
        assert all(len(r.hash_ids) == math.ceil(r.input_length / c.block_size) for r in c.requests)
        if t.has_hash_ids:
            before = prefix_reuse(t.requests, t.block_size)[0]
            after = prefix_reuse(c.requests, c.block_size)[0]
            if c.block_size <= t.block_size:  # finer blocks keep the reuse (up to the partial last blocks)
                assert after == pytest.approx(before, abs=0.06)
            else:  # coarser blocks can only lose the sharing of partial blocks
                assert after <= before
        else:
            assert prefix_reuse(c.requests, c.block_size) == (0.0, 0.0)
    if src == "qwen" and dst == "qwen":
        assert [r.parent_chat_id for r in c.requests] == [-1, -1, 0]


def test_rechunk_keeps_sharing_structure():
    t = Trace([TraceRequest(i, r["input_length"], r["output_length"], r["hash_ids"]) for i, r in
               enumerate(MOONCAKE_LINES)], block_size=512)
    fine = rechunk_hash_ids(t, 16)
    assert [len(r.hash_ids) for r in fine.requests] == [math.ceil(r.input_length / 16) for r in t.requests]
    back = rechunk_hash_ids(fine, 512)
    assert canonical_hash_ids(back) == canonical_hash_ids(t)
    # Request 4 shares request 0's first 13 blocks, which become 13 * 32 fine blocks.
    r0, r4 = fine.requests[0].hash_ids, fine.requests[4].hash_ids
    assert r4[: 13 * 32] == r0[: 13 * 32] and r4[13 * 32] != r0[13 * 32]
    # A non-multiple block size goes through the gcd.
    odd = rechunk_hash_ids(t, 100)
    assert [len(r.hash_ids) for r in odd.requests] == [math.ceil(r.input_length / 100) for r in t.requests]
    assert odd.requests[1].hash_ids[:5] == odd.requests[2].hash_ids[:5]  # both share block 0 (512 tokens)
    assert odd.requests[1].hash_ids[5] != odd.requests[2].hash_ids[5]


def test_summary_numbers():
    reqs = [
        TraceRequest(0.0, 64, 10, [1, 2, 3, 4]),
        TraceRequest(1.0, 64, 20, [1, 2, 5, 6]),  # 32 tokens hit
        TraceRequest(2.0, 40, 30, [1, 7, 3]),  # 16 hit (block 3 was seen, but after a miss)
        TraceRequest(4.0, 32, 40, [8, 9]),
    ]
    s = summarize_trace(Trace(reqs, block_size=16))
    assert s.num_requests == 4 and s.duration_s == 4.0 and s.request_rate == pytest.approx(0.75)
    assert s.input_tokens.mean == pytest.approx(50) and s.output_tokens.p50 == pytest.approx(25)
    assert s.prefix_reuse_ratio == pytest.approx(48 / 200)
    assert s.block_reuse_ratio == pytest.approx(4 / 13)
    assert s.num_sessions is None


def test_summary_of_sessions_and_mooncake_sample(samples):
    q = summarize_trace(read_trace(samples["qwen"]))
    assert q.num_sessions == 2 and q.mean_turns == pytest.approx(1.5)
    m = summarize_trace(read_trace(samples["mooncake"]))
    # Requests 1, 2, 3 reuse block 0; request 4 reuses its first 13 blocks.
    hits = 512 * 3 + 512 * 13
    assert m.prefix_reuse_ratio == pytest.approx(hits / sum(r["input_length"] for r in MOONCAKE_LINES))


def test_generated_sessions_as_trace(tmp_path):
    sessions = generate_sessions(parse_workload_spec("chat,sessions=30,seed=3"))
    trace = sessions_to_trace(sessions, 16)
    assert len(trace) == sum(len(s.turns) for s in sessions)
    ts = [r.timestamp_s for r in trace.requests]
    assert ts == sorted(ts)
    by_id = {r.chat_id: r for r in trace.requests}
    for r in trace.requests:
        if r.parent_chat_id != -1:
            parent = by_id[r.parent_chat_id]
            assert parent.turn == r.turn - 1 and parent.timestamp_s <= r.timestamp_s
            full = parent.input_length // 16
            assert r.hash_ids[:full] == parent.hash_ids[:full]
    s = summarize_trace(trace)
    assert s.num_sessions == 30 and 0.3 < s.prefix_reuse_ratio < 1
    path = tmp_path / "gen.jsonl"
    write_trace(trace, path, "qwen")
    again = read_trace(path)
    assert summarize_trace(again).prefix_reuse_ratio == pytest.approx(s.prefix_reuse_ratio)
    mooncake = convert_trace(trace, "mooncake")
    assert mooncake.block_size == 512


@pytest.mark.parametrize(
    "content,fmt,message",
    [
        ('{"timestamp": 1, "input_length": 5}\n', "mooncake", "output_length"),
        ('{"timestamp": 1, "input_length": "many", "output_length": 3}\n', "mooncake", "integer"),
        ("not json\n", "mooncake", "not valid JSON"),
        ("TIMESTAMP,ContextTokens\n2023-01-01 00:00:00,5\n", "azure", "missing column"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,5,6\n", "azure", "date and time"),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, content, fmt, message):
    p = tmp_path / "bad"
    p.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_trace(p, fmt)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_trace(tmp_path / "nope.jsonl")
    p = tmp_path / "x.txt"
    p.write_text("hello,world\n")
    with pytest.raises(ValueError, match="not a Mooncake"):
        read_trace(p)
    with pytest.raises(ValueError, match="unknown trace format"):
        write_trace(Trace([]), tmp_path / "y", "parquet")
