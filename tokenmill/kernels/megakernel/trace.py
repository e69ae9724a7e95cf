"""Reading the megakernel's global-timer stamps (MegakernelLlamaDecoder.enable_trace): pure Python over lists.

The kernel stamps, per block and instruction, (start, dependency met, end), and per weight chunk (producer issued
its copies, consumers found it landed), in nanoseconds of %globaltimer. From them:

- stage_report: when each stage's instructions started, waited and finished (the critical path per stage);
- chunk_timeline: weight bytes issued per time bin over all SMs (the demand on HBM: a producer issues a chunk only
  when a ring slot frees, so a dip means rings full behind stalled consumers) and, per op, the two latencies that
  frame every instruction: dependency met -> first chunk landed (staging the activations) and last chunk landed ->
  end (reduction, epilogue, release);
- critical_path: per op, when the block that ends each stage last met its dependency, used its first and last
  weight chunks and ended;
- attention_phases: where the attention stage's critical block spends its time, phase by phase;
- stage_windows: how much of the copy bandwidth the producers used in each stage's window, and on whose weights;
- chunk_cadence: when one op's chunks were issued and used (who set the pace: HBM or the consumers).
"""

from __future__ import annotations

import bisect
import statistics
from typing import Iterator, Sequence

from tokenmill.kernels.megakernel.schedule import (
    ATTN_PHASES, CHUNK_K, MATMUL_PHASES, OP_ATTN, OP_EMBED, OP_NAMES, TILE_ROWS, Schedule,
)

Stamps = Sequence[Sequence[Sequence[int]]]  # [block][slot][field]

# What ends at each of the kernel's attention stamps (of a block's last non-empty item; "issued": q's copy and this
# step's K / V rows asked for; "q_landed": those and the first chunk's past K / V in shared memory; scores,
# softmax and pv: of the first chunk, pv through the item's last chunk).
ATTENTION_PHASES = ("issued", "q_landed", "scores", "softmax", "pv", "written", "merged")
assert len(ATTENTION_PHASES) == ATTN_PHASES
# What ends at each of a matmul instruction's stamps: its activations staged in shared memory (RMSNorm'd where the
# op has a norm); every tile's weights used and its output (or split-K partial) stored; the split-K tiles this
# block completed added up and stored.
MATMUL_PHASE_NAMES = ("staged", "streamed", "merged")
assert len(MATMUL_PHASE_NAMES) == MATMUL_PHASES


def unwrap_timer(low: int, reference: int) -> int:
    """A full global-timer stamp from its low 32 bits and a full stamp taken within 2 s of it."""
    stamp = (reference & ~0xFFFFFFFF) | (low & 0xFFFFFFFF)
    if stamp < reference - 2**31:
        stamp += 2**32
    elif stamp > reference + 2**31:
        stamp -= 2**32
    return stamp


def _origin(instr_stamps: Stamps) -> int:
    stamped = [v for block in instr_stamps for row in block for v in row if v > 0]
    if not stamped:
        raise ValueError("no stamps: was the launch traced?")
    return min(stamped)


def stage_report(schedule: Schedule, instr_stamps: Stamps) -> dict:
    """Per stage: first start, earliest dependency met, last end and the mean wait of its instructions; plus the
    step's span. Microseconds from the first stamp."""
    t0 = _origin(instr_stamps)
    per_stage: dict[int, dict] = {}
    for b, block in enumerate(schedule.blocks):
        for i, instr in enumerate(block):
            start, met, end = (int(x) - t0 for x in instr_stamps[b][i])
            row = per_stage.setdefault(instr.stage, dict(stage=instr.stage, op=OP_NAMES[instr.op], layer=instr.layer,
                                                         first_start=start, dep_met=met, last_end=end, wait_sum=0,
                                                         instrs=0))
            row["first_start"] = min(row["first_start"], start)
            row["dep_met"] = min(row["dep_met"], met)
            row["last_end"] = max(row["last_end"], end)
            row["wait_sum"] += met - start
            row["instrs"] += 1
    rows = [per_stage[k] for k in sorted(per_stage)]
    for row in rows:
        for key in ("first_start", "dep_met", "last_end", "wait_sum"):
            row[key] = row[key] / 1000.0
        row["mean_wait_us"] = row.pop("wait_sum") / row["instrs"]
    return dict(span_us=max(r["last_end"] for r in rows), stages=rows)


def _first_chunks(schedule: Schedule) -> dict[tuple[int, int], int]:
    """(block, instruction index) -> the index of the instruction's first weight chunk in its block's chunk trace."""
    first: dict[tuple[int, int], int] = {}
    for b, block in enumerate(schedule.blocks):
        chunk = 0
        for i, instr in enumerate(block):
            first[b, i] = chunk
            chunk += schedule.chunks(instr)
    return first


def _weight_chunks(schedule: Schedule, chunk_stamps: Stamps) -> Iterator[tuple[int, int, list[tuple[int, int, int]]]]:
    """Per instruction that streams weights: (block, instruction index, [(issued, consumed, bytes) per chunk])."""
    first_chunk = _first_chunks(schedule)
    for b, block in enumerate(schedule.blocks):
        for i, instr in enumerate(block):
            count = schedule.chunks(instr)
            if not count:
                continue
            kseg = schedule.shape.kseg(schedule.shape.k(instr.op))
            per_tile = -(-kseg // CHUNK_K)
            chunks = []
            for c in range(count):
                issued, consumed = chunk_stamps[b][first_chunk[b, i] + c]
                length = min(CHUNK_K, kseg - (c % per_tile) * CHUNK_K)
                chunks.append((int(issued), int(consumed), TILE_ROWS * length * 2))
            yield b, i, chunks


def chunk_timeline(schedule: Schedule, instr_stamps: Stamps, chunk_stamps: Stamps, bin_us: float = 1.0) -> dict:
    """Weight bytes issued per `bin_us` bin over all blocks (GB/s), and per op the mean over its instructions of
    `staging_us` (dependency met -> first chunk landed) and `tail_us` (last chunk landed -> instruction end)."""
    if bin_us <= 0:
        raise ValueError("bin_us must be > 0")
    t0 = _origin(instr_stamps)
    issues: list[tuple[float, int]] = []
    staging: dict[str, list[float]] = {}
    tail: dict[str, list[float]] = {}
    for b, i, chunks in _weight_chunks(schedule, chunk_stamps):
        issues.extend(((issued - t0) / 1000.0, nbytes) for issued, _, nbytes in chunks)
        _, met, end = ((int(x) - t0) / 1000.0 for x in instr_stamps[b][i])
        name = OP_NAMES[schedule.blocks[b][i].op]
        staging.setdefault(name, []).append((chunks[0][1] - t0) / 1000.0 - met)
        tail.setdefault(name, []).append(end - (chunks[-1][1] - t0) / 1000.0)
    if not issues:
        raise ValueError("the schedule streams no weights")
    bins = [0.0] * (int(max(t for t, _ in issues) / bin_us) + 1)
    for t, nbytes in issues:
        bins[max(0, int(t / bin_us))] += nbytes
    return dict(
        bin_us=bin_us,
        issued_GBps=[b / (bin_us * 1e3) for b in bins],
        staging_us={k: statistics.mean(v) for k, v in staging.items()},
        tail_us={k: statistics.mean(v) for k, v in tail.items()},
    )


def per_op_stage_times(report: dict) -> dict[str, dict]:
    """From stage_report: per op, the mean time from the previous stage's end to this stage's end (its share of the
    critical path) and the mean wait of its instructions."""
    stages = report["stages"]
    per_op: dict[str, list[tuple[float, float]]] = {}
    for prev, cur in zip(stages, stages[1:]):
        per_op.setdefault(cur["op"], []).append((cur["last_end"] - prev["last_end"], cur["mean_wait_us"]))
    return {op: dict(stage_us=statistics.mean(v[0] for v in vals), wait_us=statistics.mean(v[1] for v in vals),
                     count=len(vals)) for op, vals in per_op.items()}


def _stage_ends(schedule: Schedule, instr_stamps: Stamps, counts=lambda b, i, instr: True
                ) -> tuple[dict[int, int], dict[int, tuple[int, int, int]]]:
    """Per stage: the end of its last instruction, and (end, block, instr) of its last-ending instruction among
    those `counts(block, instr_index, instr)` accepts."""
    ends: dict[int, int] = {}
    last: dict[int, tuple[int, int, int]] = {}
    for b, block in enumerate(schedule.blocks):
        for i, instr in enumerate(block):
            end = int(instr_stamps[b][i][2])
            ends[instr.stage] = max(ends.get(instr.stage, 0), end)
            if counts(b, i, instr) and end > last.get(instr.stage, (0,))[0]:
                last[instr.stage] = (end, b, i)
    return ends, last


def critical_path(schedule: Schedule, instr_stamps: Stamps, chunk_stamps: Stamps) -> dict[str, dict[str, float]]:
    """Per op, the mean over its stages of the stage's last block to end, in microseconds after the previous
    stage's end: `dep_met`, `first_chunk` and `last_chunk` (its first and last weight chunks taken up by the
    consumers; absent for attention) and `end`. A chunk issued before the previous stage ended shows how far ahead
    the producer ran."""
    ends, last = _stage_ends(schedule, instr_stamps)
    first_chunk = _first_chunks(schedule)
    per_op: dict[str, dict[str, list[float]]] = {}
    for stage, (end, b, i) in sorted(last.items()):
        if stage - 1 not in ends:
            continue  # the first stage: nothing before it
        instr = schedule.blocks[b][i]
        before = ends[stage - 1]
        row = {"dep_met": int(instr_stamps[b][i][1]), "end": end}
        count = schedule.chunks(instr)
        if count:
            row["first_chunk"] = int(chunk_stamps[b][first_chunk[b, i]][1])
            row["last_chunk"] = int(chunk_stamps[b][first_chunk[b, i] + count - 1][1])
        parts = per_op.setdefault(OP_NAMES[instr.op], {})
        for key, at in row.items():
            parts.setdefault(key, []).append((at - before) / 1000.0)
    order = ("dep_met", "first_chunk", "last_chunk", "end")
    return {op: {k: statistics.mean(parts[k]) for k in order if k in parts} for op, parts in per_op.items()}


def attention_phases(schedule: Schedule, instr_stamps: Stamps, attn_stamps: Stamps) -> dict[str, float]:
    """The attention stages' critical path, split by phase: in every attention stage the block that ended last,
    from the previous stage's end to its dependency met (`poll`), then each of ATTENTION_PHASES from the one
    before, then `release` (merged -> instruction end). Mean over the attention stages, microseconds; the parts
    sum to the stage's end-to-end time."""
    ends, critical = _stage_ends(schedule, instr_stamps,
                                 lambda b, i, instr: instr.op == OP_ATTN and all(attn_stamps[b][i]))
    if not critical:
        raise ValueError("no attention stamps: was the launch traced, with a non-empty attention item?")
    names = ("poll",) + ATTENTION_PHASES + ("release",)
    parts: dict[str, list[float]] = {name: [] for name in names}
    for stage, (end, b, i) in sorted(critical.items()):
        marks = [ends[stage - 1], int(instr_stamps[b][i][1]), *map(int, attn_stamps[b][i]), end]
        for name, before, after in zip(names, marks, marks[1:]):
            parts[name].append((after - before) / 1000.0)
    return {name: statistics.mean(values) for name, values in parts.items()}


def matmul_phases(schedule: Schedule, instr_stamps: Stamps, phase_stamps: Stamps) -> dict[str, dict[str, float]]:
    """Per matmul op, the mean over its instructions (every block) of `wait` (start -> dependency met), each of
    MATMUL_PHASE_NAMES from the one before, then `release` (merged -> instruction end). Microseconds; the parts sum
    to the instructions' mean start-to-end time."""
    names = ("wait",) + MATMUL_PHASE_NAMES + ("release",)
    per_op: dict[str, dict[str, list[float]]] = {}
    for b, block in enumerate(schedule.blocks):
        for i, instr in enumerate(block):
            stamps = phase_stamps[b][i][:MATMUL_PHASES]
            if instr.op in (OP_EMBED, OP_ATTN) or not all(stamps):
                continue
            marks = [int(instr_stamps[b][i][0]), int(instr_stamps[b][i][1]), *map(int, stamps),
                     int(instr_stamps[b][i][2])]
            parts = per_op.setdefault(OP_NAMES[instr.op], {name: [] for name in names})
            for name, before, after in zip(names, marks, marks[1:]):
                parts[name].append((after - before) / 1000.0)
    if not per_op:
        raise ValueError("no matmul phase stamps: was the launch traced?")
    return {op: {name: statistics.mean(values) for name, values in parts.items()} for op, parts in per_op.items()}


def tagged_repolls(schedule: Schedule, instr_stamps: Stamps, counts: Sequence[Sequence[int]]) -> dict[str, dict]:
    """Per matmul op that staged tagged words (MegakernelLlamaDecoder.repoll_counts; batch 1): how often its
    consumers had to re-read words that did not yet carry the writer's tag — the mean and the max over its
    instructions, and `last`: the mean over its stages of the count of the instruction whose dependency was met
    last (the handoff on the critical path). Zero re-reads there means the words were complete at the first read, so
    the handoff's time is the read itself, not the wait for the writers."""
    per_op: dict[str, list[int]] = {}
    latest: dict[int, tuple[int, int, str]] = {}  # stage -> (dependency met, count, op) of its latest instruction
    for b, block in enumerate(schedule.blocks):
        for i, instr in enumerate(block):
            if instr.op in (OP_EMBED, OP_ATTN):
                continue
            name = OP_NAMES[instr.op]
            per_op.setdefault(name, []).append(int(counts[b][i]))
            met = int(instr_stamps[b][i][1])
            if instr.stage not in latest or met > latest[instr.stage][0]:
                latest[instr.stage] = (met, int(counts[b][i]), name)
    result = {}
    for name, values in per_op.items():
        if not any(values):
            continue
        last = [count for _, count, op in latest.values() if op == name]
        result[name] = {"mean": statistics.mean(values), "max": max(values), "last": statistics.mean(last)}
    return result


def stage_windows(schedule: Schedule, instr_stamps: Stamps, chunk_stamps: Stamps, bandwidth: float) -> dict:
    """How busy the producers keep HBM in each stage's window (the previous stage's end to this stage's end): per
    op, the mean over its stages of the window (`window_us`), the weight bytes issued in it (`issued_MB`), their
    rate as a fraction of `bandwidth` (bytes/s: the copy bandwidth), and `by_op`: whose weights those were (a
    producer runs ahead of its consumers as far as its ring allows). `step`: the same over every window after the
    first stage's. A window well under 1.0 is HBM waiting for the rings to drain behind a dependency."""
    if bandwidth <= 0:
        raise ValueError("bandwidth must be > 0")
    ends, _ = _stage_ends(schedule, instr_stamps)
    ordered = sorted(ends)
    stage_op = {stage.index: OP_NAMES[stage.op] for stage in schedule.stages}
    issued = sorted((at, nbytes, stage_op[schedule.blocks[b][i].stage])
                    for b, i, chunks in _weight_chunks(schedule, chunk_stamps) for at, _, nbytes in chunks)
    times = [at for at, _, _ in issued]
    per_op: dict[str, dict[str, list]] = {}
    for prev, stage in zip(ordered, ordered[1:]):
        lo, hi = ends[prev], ends[stage]
        in_window = issued[bisect.bisect_left(times, lo):bisect.bisect_left(times, hi)]
        by_op: dict[str, float] = {}
        for _, nbytes, owner in in_window:
            by_op[owner] = by_op.get(owner, 0.0) + nbytes / 1e6
        row = per_op.setdefault(stage_op[stage], {"window_us": [], "issued_MB": [], "by_op": []})
        row["window_us"].append((hi - lo) / 1000.0)
        row["issued_MB"].append(sum(by_op.values()))
        row["by_op"].append(by_op)
    if not per_op:
        raise ValueError("fewer than two stages: no window to measure")

    def fraction(megabytes: float, microseconds: float) -> float:
        return megabytes * 1e6 / (microseconds * 1e-6) / bandwidth if microseconds > 0 else 0.0

    result = {}
    for op, row in per_op.items():
        owners = {owner for window in row["by_op"] for owner in window}
        window_us, issued_mb = statistics.mean(row["window_us"]), statistics.mean(row["issued_MB"])
        result[op] = {"window_us": window_us, "issued_MB": issued_mb, "of_bandwidth": fraction(issued_mb, window_us),
                      "by_op": {owner: statistics.mean(w.get(owner, 0.0) for w in row["by_op"]) for owner in owners}}
    total_us = sum(sum(row["window_us"]) for row in per_op.values())
    total_mb = sum(sum(row["issued_MB"]) for row in per_op.values())
    return {"ops": result, "step": {"window_us": total_us, "issued_MB": total_mb,
                                    "of_bandwidth": fraction(total_mb, total_us)}}


def chunk_cadence(schedule: Schedule, instr_stamps: Stamps, chunk_stamps: Stamps, op: str) -> dict[int, dict]:
    """When op's weight chunks were issued and used, in microseconds after the previous stage's end: per chunk
    count (blocks with more tiles have more chunks), the mean over those instructions of each chunk's issue and
    use. A chunk used long after its issue sat landed in the ring (the consumers set the pace); a chunk used about
    one load latency after its issue was waited for (HBM set it)."""
    if op not in OP_NAMES:
        raise ValueError(f"unknown op {op!r}: one of {', '.join(OP_NAMES)}")
    ends, _ = _stage_ends(schedule, instr_stamps)
    groups: dict[int, list[list[tuple[float, float]]]] = {}
    for b, i, chunks in _weight_chunks(schedule, chunk_stamps):
        instr = schedule.blocks[b][i]
        if OP_NAMES[instr.op] != op or instr.stage - 1 not in ends:
            continue
        before = ends[instr.stage - 1]
        groups.setdefault(len(chunks), []).append(
            [((issued - before) / 1000.0, (consumed - before) / 1000.0) for issued, consumed, _ in chunks])
    if not groups:
        raise ValueError(f"no traced {op} instruction after the first stage")
    return {count: {"instructions": len(rows),
                    "issued_us": [statistics.mean(r[c][0] for r in rows) for c in range(count)],
                    "used_us": [statistics.mean(r[c][1] for r in rows) for c in range(count)]}
            for count, rows in sorted(groups.items())}
