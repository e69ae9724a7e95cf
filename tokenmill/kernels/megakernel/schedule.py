"""The megakernel's instruction lists: which block runs which tiles of which op, in what order, waiting for what.

Pure Python (no CUDA), so CI checks it on any machine. One decode step is a chain of *stages*:

    embed | for each layer: qkv, attention, o, gate_up, down | lm_head

A stage's work items are weight tiles (16 output rows of one matrix, or a K-segment of them: split-K), or for
attention (sequence, KV head, context split) triples. Every instruction of a stage waits until the previous stage's
completion counter reaches that stage's number of completed units (tiles, or merged attention groups). Each block
runs its instructions in stage order, so the earliest unfinished stage never waits on a later one: no deadlock as
long as every block is resident at once (the cooperative launch guarantees it). `Schedule.check()` verifies this
and that every work item is scheduled exactly once.

Tiles of one stage go to blocks as contiguous ranges (a block stages the activations once per instruction), and
the larger ranges go to the blocks with the least weight bytes so far, so every SM streams about the same bytes
over the whole step. The kernel's producer warp streams the weights of a block's instructions in list order, ahead
of the consumers, across stage boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

# Must match llama_decode.cu.
OP_EMBED, OP_QKV, OP_ATTN, OP_O, OP_GATE_UP, OP_DOWN, OP_LM_HEAD = range(7)
OP_NAMES = ("embed", "qkv", "attention", "o", "gate_up", "down", "lm_head")
TILE_ROWS = 16
CHUNK_K = 1024
ROW_PAD_BYTES = 64
STAGE_BYTES = TILE_ROWS * (CHUNK_K * 2 + ROW_PAD_BYTES)
RED_BYTES = 8 * 2 * 32 * 16
MISC_BYTES = 2048
SMEM_MAX = 232448  # dynamic shared memory per block on sm_90
XS_BUDGET = 66560  # activation buffer budget: 16 rows of 2048 bf16 (+ padding)
MAX_STAGES = 8
ATTN_CHUNK_BYTES = 16384  # attention chunk in a ring stage: K rows, then V rows, 16 KB each
NUM_CONSUMER_THREADS = 256
G_MAX = 8
MAX_BATCH = 16
MAX_ATTN_SPLITS = 32
BALANCE_MAX_SPLITS = 8  # a balanced schedule's splits: up to the consumer warps, so that the merge prefetches (m25a)
ITEM_COST_CHUNKS = 2  # balanced_split_tokens' model of an attention item's and a split merge's fixed costs
MERGE_COST_CHUNKS = 2
BALANCE_MARGIN = 0.95
ATTN_PHASES = 7  # stamps per traced attention instruction (trace.ATTENTION_PHASES names them)
MATMUL_PHASES = 3  # stamps per traced matmul instruction, in the same slots (trace.MATMUL_PHASE_NAMES)
INSTR_INTS = 8


class Instr(NamedTuple):
    op: int
    layer: int
    seg: int  # K segment (split-K ops), else 0
    begin: int  # first work item (tile or attention item)
    end: int  # one past the last
    dep_stage: int  # stage whose counter this instruction waits for (-1: none)
    dep_target: int  # counter value to wait for
    stage: int  # the counter this instruction adds its completed units to


@dataclass(frozen=True)
class DecodeShape:
    """What the schedule depends on: the model's shapes and the batch size."""

    batch: int
    hidden: int
    intermediate: int
    vocab: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    # Bytes of activations a K segment may stage (all batch rows): a smaller budget splits K more often and leaves
    # room for more weight-ring stages.
    xs_budget: int = XS_BUDGET

    @classmethod
    def of(cls, config, batch: int, xs_budget: int = XS_BUDGET) -> "DecodeShape":
        return cls(batch, config.hidden_size, config.intermediate_size, config.vocab_size,
                   config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.num_hidden_layers,
                   xs_budget)

    def max_kseg(self) -> int:
        """The longest K segment whose activations (batch rows of bf16) fit the activation buffer's budget."""
        per_row = self.xs_budget // self.batch - ROW_PAD_BYTES
        return (per_row // 2) // 32 * 32

    def attention_smem_bytes(self) -> int:
        """Attention's scratch in the activation buffer: the warps' softmax state, the split merge's weights, q and
        the warps' outputs."""
        group_width = self.num_q_heads // self.num_kv_heads * self.head_dim
        return 4 * (2 * 8 * G_MAX + MAX_ATTN_SPLITS * G_MAX + group_width + 8 * group_width)

    def xs_bytes(self) -> int:
        """Activation buffer: the widest staged K segment for every batch row, or attention's scratch."""
        widest = max(self.kseg(self.k(op)) for op in (OP_QKV, OP_O, OP_GATE_UP, OP_DOWN, OP_LM_HEAD))
        need = self.batch * (widest * 2 + ROW_PAD_BYTES)
        return -(-max(need, self.attention_smem_bytes()) // 128) * 128

    def residual_tags_fit(self) -> bool:
        """Whether the residual stream can be tagged (llama_decode.cu, "tagged residual stream"): batch 1, and a row
        of h's 32-bit words fits in the activation buffer behind the staged bf16 row."""
        return self.batch == 1 and self.hidden * 2 + ROW_PAD_BYTES + self.hidden * 4 <= self.xs_bytes()

    def num_stages(self) -> int:
        """Weight ring stages: as many as fit beside the activation buffer."""
        return min(MAX_STAGES, (SMEM_MAX - self.xs_bytes() - RED_BYTES - MISC_BYTES) // STAGE_BYTES)

    def smem_bytes(self) -> int:
        return self.num_stages() * STAGE_BYTES + RED_BYTES + MISC_BYTES + self.xs_bytes()

    def kseg(self, k: int) -> int:
        """Segment length for a reduction of length k: k itself when it fits, else equal CHUNK_K multiples."""
        limit = self.max_kseg()
        if k <= limit:
            return k
        segs = -(-k // limit)
        while k % segs or (k // segs) % CHUNK_K:
            segs += 1
            if segs > k // CHUNK_K:
                raise ValueError(f"cannot split K={k} into segments of at most {limit} (multiples of {CHUNK_K})")
        return k // segs

    def tiles(self, op: int) -> int:
        q_size = self.num_q_heads * self.head_dim
        return {
            OP_QKV: (q_size + 2 * self.num_kv_heads * self.head_dim) // TILE_ROWS,
            OP_O: self.hidden // TILE_ROWS,
            OP_GATE_UP: self.intermediate // 8,
            OP_DOWN: self.hidden // TILE_ROWS,
            OP_LM_HEAD: self.vocab // TILE_ROWS,
        }[op]

    def k(self, op: int) -> int:
        return {OP_QKV: self.hidden, OP_O: self.num_q_heads * self.head_dim, OP_GATE_UP: self.hidden,
                OP_DOWN: self.intermediate, OP_LM_HEAD: self.hidden}[op]

    def segs(self, op: int) -> int:
        return self.k(op) // self.kseg(self.k(op))


def div_magic(n: int) -> int:
    """2^32 / n rounded up: the kernel divides x by n as (x * magic) >> 32, which is x // n for every 0 <= x < 2^32 / n
    (x * (magic - 2^32 / n) < 1 there). Up to 2^32 (n = 1), so 33 bits."""
    if n < 1:
        raise ValueError(f"cannot divide by {n}")
    return (2**32 - 1) // n + 1


def ring_magic(num_stages: int) -> int:
    """div_magic(num_stages), which fits 32 bits: the kernel (ring_use) takes chunk c's ring use as a multiply-high
    by it (a launch has a few thousand chunks per block)."""
    if not 2 <= num_stages <= MAX_STAGES:
        raise ValueError(f"{num_stages} ring stages is outside 2..{MAX_STAGES}")
    return div_magic(num_stages)


def unsupported_reason(shape: DecodeShape) -> str | None:
    """Why the megakernel cannot run these shapes, or None."""
    s = shape
    if not 1 <= s.batch <= MAX_BATCH:
        return f"batch {s.batch} is outside 1..{MAX_BATCH}"
    if s.head_dim not in (32, 64, 128):
        return f"head_dim {s.head_dim} is not 32, 64 or 128"
    if s.num_q_heads % s.num_kv_heads or s.num_q_heads // s.num_kv_heads > G_MAX:
        return f"{s.num_q_heads} query heads per {s.num_kv_heads} KV heads: the group must divide and be <= {G_MAX}"
    if s.num_q_heads // s.num_kv_heads * s.head_dim > 1024:
        return "a KV head's query group is wider than 1024"
    for name, value in (("hidden_size", s.hidden), ("intermediate_size", s.intermediate),
                        ("num_heads * head_dim", s.num_q_heads * s.head_dim), ("vocab_size", s.vocab)):
        if value % 32:
            return f"{name} {value} is not a multiple of 32"
    if s.hidden > s.max_kseg():
        return f"hidden_size {s.hidden} does not fit one activation segment at batch {s.batch} ({s.max_kseg()})"
    for op in (OP_O, OP_DOWN):
        try:
            s.kseg(s.k(op))
        except ValueError as exc:
            return str(exc)
    if s.num_stages() < 2:
        return "shared memory holds fewer than two weight stages next to the activations"
    return None


def busiest_block_share(groups: int, splits: int, num_blocks: int) -> float:
    """The most context one block streams, in (sequence, KV head) contexts, when `groups` of them are cut into
    `splits` equal items dealt out evenly to `num_blocks` blocks."""
    return -(-groups * splits // num_blocks) / splits


def attention_splits(shape: DecodeShape, num_blocks: int, balance_max: int = BALANCE_MAX_SPLITS,
                     tolerance: float = 0.05) -> int:
    """Context splits per (sequence, KV head): about one attention item per block where there are fewer pairs than
    blocks. Where there are more than half as many (one split each, some blocks get none), up to `balance_max`
    splits: the fewest whose busiest block streams within `tolerance` of the least any count allows. An SM streams
    K / V at about its share of HBM, so at long contexts the busiest block sets the stage's time: 9 x 8 pairs on 132
    SMs in one split each leave 60 SMs without attention (the busiest block's share of a context 1.0); five splits
    give every block 2 or 3 items of a fifth (0.6). Such schedules use all splits or one (balanced_split_tokens).
    balance_max 0: one item per block at most."""
    groups = shape.batch * shape.num_kv_heads
    base = max(1, min(MAX_ATTN_SPLITS, num_blocks // groups))
    if base > 1:  # (m25a: balancing 6 x 8 pairs' two splits with up to eight lost 3 % at 4k)
        return base
    candidates = range(base, max(base, min(balance_max, MAX_ATTN_SPLITS)) + 1)
    least = min(busiest_block_share(groups, s, num_blocks) for s in candidates)
    return min(s for s in candidates if busiest_block_share(groups, s, num_blocks) <= least * (1 + tolerance))


def splits_balanced(shape: DecodeShape, num_blocks: int, splits: int) -> bool:
    """Whether `splits` is above one attention item per block: a balanced schedule, which uses all splits or one
    (balanced_split_tokens)."""
    return splits > attention_splits(shape, num_blocks, balance_max=0)


@dataclass
class Stage:
    index: int
    op: int
    layer: int
    units: int  # completion units the next stage waits for (tiles, attention groups, embedded rows)


@dataclass
class Schedule:
    shape: DecodeShape
    num_blocks: int
    attn_splits: int
    stages: list[Stage]
    blocks: list[list[Instr]] = field(default_factory=list)
    bytes_per_block: list[int] = field(default_factory=list)
    # Attention items claimed at run time (ATTN_CLAIM): every block holds each attention stage's instruction (its
    # item range unused), attn_splits is the split slots per (sequence, KV head) and claim_plan cuts the contexts.
    attn_claim: bool = False

    @property
    def attn_balanced(self) -> bool:
        return not self.attn_claim and splits_balanced(self.shape, self.num_blocks, self.attn_splits)

    @property
    def max_instrs(self) -> int:
        return max(len(b) for b in self.blocks)

    def chunks(self, instr: Instr) -> int:
        """Weight chunks (16 rows x up to CHUNK_K columns) the producer streams for one instruction. Attention's K / V
        chunks depend on the context lengths and are not counted: the chunk trace indexes weight chunks only."""
        if instr.op in (OP_EMBED, OP_ATTN):
            return 0
        return (instr.end - instr.begin) * -(-self.shape.kseg(self.shape.k(instr.op)) // CHUNK_K)

    @property
    def max_chunks(self) -> int:
        return max(sum(self.chunks(i) for i in block) for block in self.blocks)

    def encoded(self) -> tuple[list[int], list[int]]:
        """(instructions flat [num_blocks * max_instrs * INSTR_INTS], counts [num_blocks]) for the kernel."""
        width = self.max_instrs
        flat: list[int] = []
        for block in self.blocks:
            for instr in block:
                flat.extend(instr)
            flat.extend([0] * (INSTR_INTS * (width - len(block))))
        return flat, [len(b) for b in self.blocks]

    def check(self) -> None:
        """Raises AssertionError unless: every work item of every stage is scheduled exactly once; every instruction
        waits for the complete previous stage; every block's list is in stage order (so no block waits on a stage
        that a block stuck behind it would have to finish)."""
        s = self.shape
        for b, block in enumerate(self.blocks):
            stages = [i.stage for i in block]
            assert stages == sorted(stages), f"block {b}: instructions out of stage order"
            for instr in block:
                assert 0 <= instr.stage < len(self.stages)
                if instr.stage == 0:
                    assert instr.dep_stage == -1
                else:
                    prev = self.stages[instr.stage - 1]
                    assert instr.dep_stage == prev.index and instr.dep_target == prev.units, (
                        f"block {b}: {instr} does not wait for the whole previous stage")
                assert self.stages[instr.stage].op == instr.op and self.stages[instr.stage].layer == instr.layer
                assert 0 <= instr.begin < instr.end
        for stage in self.stages:
            instrs = [i for block in self.blocks for i in block if i.stage == stage.index]
            if stage.op == OP_EMBED:
                expected = {(0, m) for m in range(s.batch)}
            elif stage.op == OP_ATTN and self.attn_claim:
                per_block = [sum(i.stage == stage.index for i in block) for block in self.blocks]
                assert per_block == [1] * self.num_blocks, (
                    f"stage {stage.index}: a claimed attention stage needs one instruction in every block")
                continue
            elif stage.op == OP_ATTN:
                expected = {(0, x) for x in range(s.batch * s.num_kv_heads * self.attn_splits)}
            else:
                expected = {(seg, t) for seg in range(s.segs(stage.op)) for t in range(s.tiles(stage.op))}
            got = [(i.seg, x) for i in instrs for x in range(i.begin, i.end)]
            assert len(got) == len(set(got)) and set(got) == expected, (
                f"stage {stage.index} ({OP_NAMES[stage.op]}): work items scheduled {len(got)} times for "
                f"{len(expected)} items")


def simulate(schedule: Schedule, order_seed: int = 0) -> int:
    """Runs the instruction lists as the GPU would, one instruction at a time from a randomly chosen block whose
    next instruction's dependency is met, counting completions the way the kernel does (a split-K tile or an
    attention group completes when its last part does; the kernel leaves splits of short contexts empty, which
    only removes waits, so every context splitting fully is the case to check). Returns the number of instructions
    run; raises RuntimeError if no block can move while work remains (a deadlock)."""
    import random

    rng = random.Random(order_seed)
    s = schedule.shape
    done = [0] * len(schedule.stages)
    arrivals: dict[tuple, int] = {}
    cursor = [0] * len(schedule.blocks)
    ran = 0
    while True:
        ready = []
        for b, block in enumerate(schedule.blocks):
            if cursor[b] < len(block):
                instr = block[cursor[b]]
                if instr.dep_stage < 0 or done[instr.dep_stage] >= instr.dep_target:
                    ready.append(b)
        if not ready:
            if any(cursor[b] < len(block) for b, block in enumerate(schedule.blocks)):
                raise RuntimeError(f"deadlock: blocks stuck at {cursor}, stage counters {done}")
            return ran
        b = rng.choice(ready)
        instr = schedule.blocks[b][cursor[b]]
        cursor[b] += 1
        ran += 1
        completed = 0
        if instr.op == OP_ATTN and schedule.attn_claim:
            # Any block's producer may have claimed any item, and its consumers work it once they reach the stage's
            # instruction: the stage completes when the last block has run it.
            key = (instr.stage, "claimed")
            arrivals[key] = arrivals.get(key, 0) + 1
            done[instr.stage] += s.batch * s.num_kv_heads if arrivals[key] == schedule.num_blocks else 0
            continue
        for item in range(instr.begin, instr.end):
            if instr.op == OP_ATTN:
                key, parts = (instr.stage, item // schedule.attn_splits), schedule.attn_splits
            elif instr.op in (OP_O, OP_DOWN):
                key, parts = (instr.stage, item), s.segs(instr.op)
            else:
                key, parts = None, 1
            if key is None:
                completed += 1
                continue
            arrivals[key] = arrivals.get(key, 0) + 1
            completed += arrivals[key] == parts
        done[instr.stage] += completed


def attention_item_costs(head_dim: int) -> tuple[int, int]:
    """(item cost, merge cost) in context tokens: an attention item's fixed work (q, the output, the split arrival)
    and a split merge's, as ITEM_COST_CHUNKS and MERGE_COST_CHUNKS ring chunks of K / V. The cost models of
    balanced_split_tokens and claim_plan (the kernel's claim_item_cost, claim_merge_cost) both count in these."""
    chunk = ATTN_CHUNK_BYTES // (2 * head_dim)  # tokens
    return ITEM_COST_CHUNKS * chunk, MERGE_COST_CHUNKS * chunk


def balanced_split_tokens(shape: DecodeShape, num_blocks: int, splits: int) -> int:
    """The fewest tokens per split for which a balanced schedule's `splits` splits beat one: below, a context is one
    item. Per block, time ~ its K / V tokens + ITEM_COST_CHUNKS per item (q, the output, the split arrival) +
    MERGE_COST_CHUNKS for a split merge; all splits must win by BALANCE_MARGIN. (m25a, H200: 9 x 1k with five
    208-token splits +10.6 %, 9 x 2k with two of 1024 +5 %; 9 x 4k / 8k, 12 x 4k / 8k, 13 x 8k faster.)"""
    groups = shape.batch * shape.num_kv_heads
    items = -(-groups * splits // num_blocks)  # the busiest block's
    share = items / splits
    item_cost, merge_cost = attention_item_costs(shape.head_dim)
    if splits <= 1 or share >= BALANCE_MARGIN:
        return 1 << 30
    # share L + items a + m <= margin (L + a)
    least_context = (items * item_cost + merge_cost - BALANCE_MARGIN * item_cost) / (BALANCE_MARGIN - share)
    return max(1, math.ceil(least_context / splits))


class ClaimPlan(NamedTuple):
    """A claimed attention stage's work, from the step's context lengths (claim_plan)."""

    order: list[int]  # sequences in claim order: longest first, ties by index
    per_split: list[int]  # by sequence: context tokens per item (a multiple of 16)
    splits: list[int]  # by sequence: items per (sequence, KV head), 1 to MAX_ATTN_SPLITS
    items: int  # the stage's items: num_kv_heads * sum(splits)


CLAIM_MAX_SEQS = 32  # the producer warp holds one sequence's plan per lane


def claim_plan(seq_lens: list[int], num_kv_heads: int, num_blocks: int, min_split_tokens: int, item_cost: int,
               merge_cost: int) -> ClaimPlan:
    """How a claimed attention stage (ATTN_CLAIM: blocks take items from a per-layer counter at run time) cuts each
    (sequence, KV head) context. The kernel's producer warp computes the same plan at the step's first attention
    stage (claim_plan in llama_decode.cu); this is its reference.

    Items of one step are at most T tokens, T = the longest context over s, rounded up to 16, for the s in 1..32 that
    minimises the estimated stage time: rounds x (T + item_cost) (+ merge_cost if any context splits), where rounds
    = ceil(work / (num_blocks x (T + item_cost))) and work = every item's tokens + item_cost each. For equal
    contexts that is the greedy claim's makespan exactly; with one long context among short ones it cuts the long
    one into many items and leaves the short ones whole. T stays >= min_split_tokens unless s = 1."""
    if not 1 <= len(seq_lens) <= CLAIM_MAX_SEQS:
        raise ValueError(f"a claimed attention stage takes 1 to {CLAIM_MAX_SEQS} sequences, got {len(seq_lens)}")

    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    def round16(x: int) -> int:  # an item starts on a TMA box: 16 rows of a KV block
        return ceil_div(max(x, 1), 16) * 16

    def cut(n: int, t: int) -> tuple[int, int]:  # (tokens per item, items) of an n-token context, items <= t
        size = round16(ceil_div(n, max(1, ceil_div(n, t))))
        return size, max(1, ceil_div(n, size))

    lens = [max(0, int(n)) for n in seq_lens]
    best: tuple[list[int], list[int]] | None = None
    best_cost = 0
    for s in range(1, MAX_ATTN_SPLITS + 1):
        t = round16(ceil_div(max(lens), s))
        if s > 1 and t < min_split_tokens:
            break
        per, splits = zip(*(cut(n, t) for n in lens))
        work = num_kv_heads * (sum(lens) + item_cost * sum(splits))
        rounds = ceil_div(work, num_blocks * (t + item_cost))
        cost = rounds * (t + item_cost) + (merge_cost if max(splits) > 1 else 0)
        if best is None or cost < best_cost:
            best, best_cost = (list(per), list(splits)), cost
    assert best is not None
    per, splits = best
    order = sorted(range(len(lens)), key=lambda m: (-lens[m], m))
    return ClaimPlan(order, per, splits, num_kv_heads * sum(splits))


def claim_items(plan: ClaimPlan, seq_lens: list[int], num_kv_heads: int) -> list[tuple[int, int, int, int, int]]:
    """The items of a claimed attention stage in counter order, as the kernel decodes them: (sequence, KV head,
    split, first token, end token); sequences in plan.order, within one split-major (its KV heads' first splits
    first)."""
    out = []
    for m in plan.order:
        n = max(0, int(seq_lens[m]))
        for split in range(plan.splits[m]):
            t0 = split * plan.per_split[m]
            for kvh in range(num_kv_heads):
                out.append((m, kvh, split, t0, min(n, t0 + plan.per_split[m])))
    return out


def whole_split_layout(order: list[int], sizes: dict[int, int], splits: int) -> list[int]:
    """The blocks in the order their item ranges follow each other, for a balanced attention stage (all splits or
    one): a range that holds a (sequence, KV head)'s first split goes to the least loaded block left (first in
    `order`), any other range to the most loaded. A context in one split then runs on the blocks the unbalanced
    schedule would give it; every range holds at most one first split (sizes <= splits)."""
    left = list(order)
    layout, pos = [], 0
    while left:
        first = left[0]
        b = left.pop(0) if -pos % splits < sizes[first] else left.pop()
        layout.append(b)
        pos += sizes[b]
    return layout


def build_schedule(shape: DecodeShape, num_blocks: int, attn_balance_max: int = BALANCE_MAX_SPLITS,
                   attn_whole_layout: bool = False, attn_claim: bool = False) -> Schedule:
    """Instruction lists for `num_blocks` persistent blocks (one per SM); attn_balance_max: attention_splits'
    balance_max; attn_whole_layout: balanced attention stages laid out by whole_split_layout; attn_claim: attention
    items claimed at run time (Schedule.attn_claim)."""
    reason = unsupported_reason(shape)
    if reason is not None:
        raise ValueError(reason)
    if num_blocks < 1:
        raise ValueError("need at least one block")
    s = shape
    splits = MAX_ATTN_SPLITS if attn_claim else attention_splits(s, num_blocks, attn_balance_max)
    whole_layout = not attn_claim and attn_whole_layout and splits_balanced(s, num_blocks, splits)
    stages: list[Stage] = [Stage(0, OP_EMBED, -1, s.batch)]
    for layer in range(s.num_layers):
        for op in (OP_QKV, OP_ATTN, OP_O, OP_GATE_UP, OP_DOWN):
            units = s.batch * s.num_kv_heads if op == OP_ATTN else s.tiles(op)
            stages.append(Stage(len(stages), op, layer, units))
    stages.append(Stage(len(stages), OP_LM_HEAD, -1, s.tiles(OP_LM_HEAD)))

    blocks: list[list[Instr]] = [[] for _ in range(num_blocks)]
    load = [0] * num_blocks  # weight bytes streamed by each block so far
    for stage in stages:
        dep = (-1, 0) if stage.index == 0 else (stage.index - 1, stages[stage.index - 1].units)
        layer = max(stage.layer, 0)
        if stage.op == OP_EMBED:
            blocks[0].append(Instr(OP_EMBED, stage.layer, 0, 0, s.batch, *dep, stage.index))
            continue
        if stage.op == OP_ATTN and attn_claim:
            for block in blocks:
                block.append(Instr(OP_ATTN, layer, 0, 0, 1, *dep, stage.index))
            continue
        if stage.op == OP_ATTN:
            items = [(0, x) for x in range(s.batch * s.num_kv_heads * splits)]
            item_bytes = 0
        else:
            items = [(seg, t) for seg in range(s.segs(stage.op)) for t in range(s.tiles(stage.op))]
            item_bytes = TILE_ROWS * s.kseg(s.k(stage.op)) * 2
        q, r = divmod(len(items), num_blocks)
        # The blocks that streamed least so far take the longer ranges; ties by block index.
        order = sorted(range(num_blocks), key=lambda b: (load[b], b))
        sizes = {b: q + (rank < r) for rank, b in enumerate(order)}
        layout: list[int] = list(range(num_blocks))
        if stage.op == OP_ATTN and whole_layout:
            layout = whole_split_layout(order, sizes, splits)
        start = 0
        for b in layout:
            chunk = items[start:start + sizes[b]]
            start += sizes[b]
            if not chunk:
                continue
            load[b] += item_bytes * len(chunk)
            # A contiguous range of (seg, tile) items becomes one instruction per segment it touches.
            begin = 0
            while begin < len(chunk):
                end = begin
                while end < len(chunk) and chunk[end][0] == chunk[begin][0]:
                    end += 1
                blocks[b].append(Instr(stage.op, layer if stage.op != OP_LM_HEAD else -1, chunk[begin][0],
                                       chunk[begin][1], chunk[end - 1][1] + 1, *dep, stage.index))
                begin = end
    schedule = Schedule(s, num_blocks, splits, stages, blocks, load, attn_claim)
    schedule.check()
    return schedule
