"""The megakernel's trace readers (trace.py) on synthetic stamps: CPU only, no kernel."""

from types import SimpleNamespace

import pytest

from tokenmill.kernels.megakernel.schedule import (
    ATTN_PHASES, MATMUL_PHASES, OP_ATTN, OP_EMBED, OP_NAMES, OP_O, OP_QKV, DecodeShape, Instr, build_schedule,
)
from tokenmill.kernels.megakernel.trace import (
    ATTENTION_PHASES, MATMUL_PHASE_NAMES, attention_phases, chunk_cadence, chunk_timeline, critical_path,
    matmul_phases, per_op_stage_times, stage_report, stage_windows, tagged_repolls, unwrap_timer,
)

# down is split-K at batch 16 here (K 4096 > 2048), so chunk lengths and counts per tile vary by op
SHAPE = DecodeShape(batch=16, hidden=512, intermediate=4096, vocab=1024, num_q_heads=8, num_kv_heads=4, head_dim=64,
                    num_layers=2)
T0 = 5_000_000  # globaltimer is not zero-based
STAGING_NS, CHUNK_NS, TAIL_NS, WAIT_NS = 500, 1000, 300, 100


def synthetic_stamps(schedule):
    """Each block runs its instructions back to back: wait WAIT_NS, first chunk lands STAGING_NS after the wait,
    then one chunk per CHUNK_NS (issued 2 us before it lands), end TAIL_NS after the last chunk."""
    instr = [[[0, 0, 0] for _ in range(schedule.max_instrs)] for _ in schedule.blocks]
    chunks = [[[0, 0] for _ in range(schedule.max_chunks)] for _ in schedule.blocks]
    for b, block in enumerate(schedule.blocks):
        t, c = T0 + 1000 * b, 0
        for i, ins in enumerate(block):
            start, met = t, t + WAIT_NS
            n = schedule.chunks(ins)
            landed = [met + STAGING_NS + k * CHUNK_NS for k in range(n)]
            for k, at in enumerate(landed):
                chunks[b][c + k] = [at - 2000, at]
            c += n
            end = (landed[-1] if landed else met) + TAIL_NS
            instr[b][i] = [start, met, end]
            t = end
    return instr, chunks


def test_stage_report_and_per_op_times_follow_the_stamps():
    schedule = build_schedule(SHAPE, 6)
    instr, _ = synthetic_stamps(schedule)
    report = stage_report(schedule, instr)
    assert [r["stage"] for r in report["stages"]] == list(range(len(schedule.stages)))
    assert report["stages"][0]["first_start"] == 0.0
    ends = {}
    for b, block in enumerate(schedule.blocks):
        for i, ins in enumerate(block):
            ends[ins.stage] = max(ends.get(ins.stage, 0), instr[b][i][2] - T0)
    assert [r["last_end"] for r in report["stages"]] == [ends[s] / 1000 for s in sorted(ends)]
    assert report["span_us"] == max(ends.values()) / 1000
    assert all(r["mean_wait_us"] == pytest.approx(WAIT_NS / 1000) for r in report["stages"])
    per_op = per_op_stage_times(report)
    assert set(per_op) == {"qkv", "attention", "o", "gate_up", "down", "lm_head"}
    assert per_op["qkv"]["count"] == SHAPE.num_layers and per_op["lm_head"]["count"] == 1


def test_chunk_timeline_bins_every_weight_byte_and_measures_staging_and_tail():
    schedule = build_schedule(SHAPE, 6)
    instr, chunks = synthetic_stamps(schedule)
    for bin_us in (0.5, 1.0, 7.0):
        timeline = chunk_timeline(schedule, instr, chunks, bin_us=bin_us)
        streamed = sum(timeline["issued_GBps"]) * bin_us * 1e3
        expected = sum(2 * 16 * SHAPE.kseg(SHAPE.k(ins.op)) * (ins.end - ins.begin)
                       for block in schedule.blocks for ins in block if schedule.chunks(ins))
        assert streamed == pytest.approx(expected)
    matmuls = {OP_NAMES[ins.op] for block in schedule.blocks for ins in block if schedule.chunks(ins)}
    assert set(timeline["staging_us"]) == set(timeline["tail_us"]) == matmuls
    assert all(v == pytest.approx(STAGING_NS / 1000) for v in timeline["staging_us"].values())
    assert all(v == pytest.approx(TAIL_NS / 1000) for v in timeline["tail_us"].values())


def _stage_ends(schedule, instr):
    ends = {}
    for b, block in enumerate(schedule.blocks):
        for i, ins in enumerate(block):
            ends[ins.stage] = max(ends.get(ins.stage, 0), instr[b][i][2])
    return ends


def test_stage_windows_count_each_issued_byte_in_the_window_it_was_issued_in():
    schedule = build_schedule(SHAPE, 6)
    instr, chunks = synthetic_stamps(schedule)
    bandwidth = 2e12
    windows = stage_windows(schedule, instr, chunks, bandwidth)
    ends = _stage_ends(schedule, instr)
    first_end, last_end = ends[0], max(ends.values())
    # Every chunk issued between the first stage's end and the last one's falls in exactly one window.
    issued = []
    for b, block in enumerate(schedule.blocks):
        c = 0
        for ins in filter(schedule.chunks, block):
            kseg = SHAPE.kseg(SHAPE.k(ins.op))
            per_tile = -(-kseg // 1024)
            for k in range(schedule.chunks(ins)):
                issued.append((chunks[b][c + k][0], 16 * 2 * min(1024, kseg - (k % per_tile) * 1024)))
            c += schedule.chunks(ins)
    expected_mb = sum(n for at, n in issued if first_end <= at < last_end) / 1e6
    step = windows["step"]
    assert step["issued_MB"] == pytest.approx(expected_mb)
    assert step["window_us"] == pytest.approx((last_end - first_end) / 1000)
    assert step["of_bandwidth"] == pytest.approx(expected_mb * 1e6 / (step["window_us"] * 1e-6) / bandwidth)
    assert set(windows["ops"]) == {"qkv", "attention", "o", "gate_up", "down", "lm_head"}
    qkv_stages = [st.index for st in schedule.stages if OP_NAMES[st.op] == "qkv"]
    assert windows["ops"]["qkv"]["window_us"] == pytest.approx(
        sum(ends[s] - ends[s - 1] for s in qkv_stages) / len(qkv_stages) / 1000)
    for row in windows["ops"].values():
        assert sum(row["by_op"].values()) == pytest.approx(row["issued_MB"])
        assert row["of_bandwidth"] == pytest.approx(row["issued_MB"] * 1e6 / (row["window_us"] * 1e-6) / bandwidth)
    with pytest.raises(ValueError, match="bandwidth"):
        stage_windows(schedule, instr, chunks, 0)


def test_chunk_cadence_places_each_chunk_after_the_previous_stage_end():
    schedule = build_schedule(SHAPE, 6)
    instr, chunks = synthetic_stamps(schedule)
    cadence = chunk_cadence(schedule, instr, chunks, "gate_up")
    gate_up = [(b, i) for b, block in enumerate(schedule.blocks) for i, ins in enumerate(block)
               if OP_NAMES[ins.op] == "gate_up" and ins.stage > 0]
    assert sum(row["instructions"] for row in cadence.values()) == len(gate_up)
    for count, row in cadence.items():
        assert len(row["issued_us"]) == len(row["used_us"]) == count
        # synthetic chunks land 2 us after their issue, one every CHUNK_NS
        assert all(u - i == pytest.approx(2.0) for i, u in zip(row["issued_us"], row["used_us"]))
        assert all(b - a == pytest.approx(CHUNK_NS / 1000) for a, b in zip(row["used_us"], row["used_us"][1:]))
    with pytest.raises(ValueError, match="unknown op"):
        chunk_cadence(schedule, instr, chunks, "mlp")
    with pytest.raises(ValueError, match="no traced attention"):
        chunk_cadence(schedule, instr, chunks, "attention")


def test_attention_phases_follow_the_block_that_ends_each_stage_last():
    schedule = build_schedule(SHAPE, 6)
    instr, _ = synthetic_stamps(schedule)
    phase_ns = 40  # each phase ends 40 ns after the one before, the first 40 ns after the dependency is met
    attn = [[[0] * ATTN_PHASES for _ in range(schedule.max_instrs)] for _ in schedule.blocks]
    for b, block in enumerate(schedule.blocks):
        for i, ins in enumerate(block):
            if ins.op == OP_ATTN:
                attn[b][i] = [instr[b][i][1] + phase_ns * (k + 1) for k in range(ATTN_PHASES)]
    last = len(schedule.blocks) - 1  # ends every stage last (blocks start 1 us apart); left unstamped: ignored
    attn[last] = [[0] * ATTN_PHASES for _ in range(schedule.max_instrs)]
    ends, crit = {}, {}
    for b, block in enumerate(schedule.blocks):
        for i, ins in enumerate(block):
            ends[ins.stage] = max(ends.get(ins.stage, 0), instr[b][i][2])
            if ins.op == OP_ATTN and b != last and instr[b][i][2] > crit.get(ins.stage, (0, 0))[0]:
                crit[ins.stage] = (instr[b][i][2], instr[b][i][1])
    phases = attention_phases(schedule, instr, attn)
    assert list(phases) == ["poll", *ATTENTION_PHASES, "release"]
    polls = [(met - ends[stage - 1]) / 1000 for stage, (_, met) in crit.items()]
    assert phases["poll"] == pytest.approx(sum(polls) / len(polls))
    assert all(phases[name] == pytest.approx(phase_ns / 1000) for name in ATTENTION_PHASES)
    assert phases["release"] == pytest.approx((TAIL_NS - phase_ns * ATTN_PHASES) / 1000)
    with pytest.raises(ValueError, match="no attention stamps"):
        attention_phases(schedule, instr, [[[0] * ATTN_PHASES for _ in range(schedule.max_instrs)]
                                           for _ in schedule.blocks])


def test_critical_path_follows_the_block_that_ends_each_stage_last():
    # Two blocks, three stages (qkv on both, attention on block 0, o on block 1), two weight chunks per matmul.
    qkv = Instr(OP_QKV, 0, 0, 0, 1, -1, 0, 0)
    attn, o = Instr(OP_ATTN, 0, 0, 0, 1, 0, 2, 1), Instr(OP_O, 0, 0, 0, 1, 1, 1, 2)
    schedule = SimpleNamespace(blocks=[[qkv, attn], [qkv._replace(begin=1, end=2), o]],
                               chunks=lambda ins: 2 if ins.op in (OP_QKV, OP_O) else 0)
    instr = [[[0, 100, 5000], [5000, 5400, 7000]], [[0, 200, 6000], [6000, 7100, 9000]]]
    chunks = [[[50, 1000], [60, 3000]], [[70, 2000], [80, 4000], [6500, 7600], [6600, 8000]]]
    path = critical_path(schedule, instr, chunks)
    assert set(path) == {"attention", "o"}  # qkv is the first stage: nothing ends before it
    assert path["attention"] == pytest.approx({"dep_met": -0.6, "end": 1.0})  # after qkv's end (6000)
    assert path["o"] == pytest.approx({"dep_met": 0.1, "first_chunk": 0.6, "last_chunk": 1.0, "end": 2.0})


def test_matmul_phases_split_each_instruction_between_its_stamps():
    schedule = build_schedule(SHAPE, 6)
    instr, _ = synthetic_stamps(schedule)
    # staged 200 ns after the dependency, streamed when the last chunk landed, merged 50 ns later (the rest of the
    # tail is the release); attention and embedding slots stay zero, as the kernel leaves them for matmuls' readers.
    phases = [[[0] * ATTN_PHASES for _ in range(schedule.max_instrs)] for _ in schedule.blocks]
    for b, block in enumerate(schedule.blocks):
        for i, ins in enumerate(block):
            if ins.op not in (OP_ATTN, OP_EMBED):
                met, end = instr[b][i][1], instr[b][i][2]
                phases[b][i][:MATMUL_PHASES] = [met + 200, end - TAIL_NS, end - TAIL_NS + 50]
    result = matmul_phases(schedule, instr, phases)
    matmuls = {OP_NAMES[ins.op] for block in schedule.blocks for ins in block if ins.op not in (OP_ATTN, OP_EMBED)}
    assert set(result) == matmuls
    for op, parts in result.items():
        assert list(parts) == ["wait", *MATMUL_PHASE_NAMES, "release"]
        assert parts["wait"] == pytest.approx(WAIT_NS / 1000)
        assert parts["staged"] == pytest.approx(0.2)
        assert parts["merged"] == pytest.approx(0.05)
        assert parts["release"] == pytest.approx((TAIL_NS - 50) / 1000)
        durations = [instr[b][i][2] - instr[b][i][0] for b, block in enumerate(schedule.blocks)
                     for i, ins in enumerate(block) if OP_NAMES[ins.op] == op]
        assert sum(parts.values()) == pytest.approx(sum(durations) / len(durations) / 1000)
    with pytest.raises(ValueError, match="no matmul phase stamps"):
        matmul_phases(schedule, instr, [[[0] * ATTN_PHASES for _ in range(schedule.max_instrs)]
                                        for _ in schedule.blocks])


def test_tagged_repolls_report_the_handoff_on_the_critical_path():
    schedule = build_schedule(SHAPE, 6)
    instr, _ = synthetic_stamps(schedule)
    # qkv's words: re-read once by every block, five times by the first block of each qkv stage, whose dependency is
    # met last; no other op re-reads (so none is reported).
    counts = [[0] * schedule.max_instrs for _ in schedule.blocks]
    chosen: dict[int, int] = {}
    for b, block in enumerate(schedule.blocks):
        for i, ins in enumerate(block):
            if ins.op == OP_QKV:
                first = chosen.setdefault(ins.stage, b) == b
                counts[b][i] = 5 if first else 1
                instr[b][i][1] = T0 + 10**8 + (1 if first else 0)
    result = tagged_repolls(schedule, instr, counts)
    assert set(result) == {"qkv"}
    qkv = [counts[b][i] for b, block in enumerate(schedule.blocks) for i, ins in enumerate(block) if ins.op == OP_QKV]
    assert result["qkv"] == {"mean": pytest.approx(sum(qkv) / len(qkv)), "max": 5, "last": 5}
    assert 1 < result["qkv"]["mean"] < 5


def test_unwrap_timer_restores_stamps_across_a_32_bit_wrap():
    base = 7 * 2**32
    for reference, stamp in [(base + 100, base + 5000), (base - 3000, base + 20), (base + 20, base - 3000),
                             (base + 2**31 - 1, base + 2**31 + 1_000_000)]:
        assert unwrap_timer(stamp & 0xFFFFFFFF, reference) == stamp


def test_readers_refuse_untraced_stamps_and_bad_bins():
    schedule = build_schedule(SHAPE, 6)
    zeros = [[[0, 0, 0] for _ in range(schedule.max_instrs)] for _ in schedule.blocks]
    with pytest.raises(ValueError, match="no stamps"):
        stage_report(schedule, zeros)
    instr, chunks = synthetic_stamps(schedule)
    with pytest.raises(ValueError, match="bin_us"):
        chunk_timeline(schedule, instr, chunks, bin_us=0)
