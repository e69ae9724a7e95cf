"""How long the megakernel's attention stage takes on its busiest block, static schedules against claimed items: a
per-block model, no GPU. An item costs its context tokens plus a fixed cost (schedule.ITEM_COST_CHUNKS chunks, in
tokens); a static schedule's blocks work their ranges as the kernel cuts them (attn_item in llama_decode.cu), a
claimed stage's items go greedily, in claim order, to whichever block is free first. Prints, per batch of context
lengths, the busiest block's tokens both ways (DECODE_NOTES session 26).

    PYTHONPATH=. python scripts/attention_balance_model.py --blocks 132
"""

from __future__ import annotations

import argparse
import heapq

from tokenmill.kernels.megakernel import schedule as sch

LLAMA_1B = dict(hidden=2048, intermediate=8192, vocab=128256, num_q_heads=32, num_kv_heads=8, head_dim=64,
                num_layers=16)
MIN_SPLIT_TOKENS = 128  # decoder.DEFAULT_MIN_SPLIT_TOKENS
CASES = ([1024] * 16, [4096] * 9, [8192] * 9, [1024], [4096] * 16, [16384] * 16, [16384] + [256] * 15,
         [16384] + [256] * 7, [8192] + [256] * 8, [16384] + [256] * 3, [16384, 256])


ITEM_COST, MERGE_COST = sch.attention_item_costs(LLAMA_1B["head_dim"])  # as the decoder passes the kernel


def static_busiest(lens: list[int], num_blocks: int) -> int:
    """The busiest block's tokens (plus each item's cost) in one attention stage of the static schedule."""
    shape = sch.DecodeShape(batch=len(lens), **LLAMA_1B)
    schedule = sch.build_schedule(shape, num_blocks)
    splits, heads = schedule.attn_splits, shape.num_kv_heads
    least = (sch.balanced_split_tokens(shape, num_blocks, splits) if schedule.attn_balanced else MIN_SPLIT_TOKENS)
    stage = next(s.index for s in schedule.stages if s.op == sch.OP_ATTN)
    busiest = 0
    for block in schedule.blocks:
        load = 0
        for instr in (i for i in block if i.stage == stage):
            for item in range(instr.begin, instr.end):
                split, n = item % splits, lens[item // (splits * heads)]
                even = -(-n // splits)
                if schedule.attn_balanced:
                    tokens = even if even >= least else max(n, 1)
                else:
                    tokens = max(even, least)
                per = -(-tokens // 16) * 16
                if split < max(1, -(-n // per)):  # the kernel skips a split past the context's last
                    load += max(0, min(n, split * per + per) - split * per) + ITEM_COST
        busiest = max(busiest, load)
    return busiest


def claimed_makespan(lens: list[int], num_blocks: int) -> tuple[int, sch.ClaimPlan]:
    heads = LLAMA_1B["num_kv_heads"]
    plan = sch.claim_plan(lens, heads, num_blocks, MIN_SPLIT_TOKENS, ITEM_COST, MERGE_COST)
    free_at = [0] * num_blocks
    for _, _, _, t0, t1 in sch.claim_items(plan, lens, heads):
        heapq.heappush(free_at, heapq.heappop(free_at) + (t1 - t0) + ITEM_COST)
    return max(free_at), plan


def describe(lens: list[int]) -> str:
    counts: dict[int, int] = {}
    for n in lens:
        counts[n] = counts.get(n, 0) + 1
    return " + ".join(f"{c} x {n}" for n, c in sorted(counts.items(), reverse=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=132, help="blocks (SMs): 132 on H100 SXM and H200")
    args = parser.parse_args()
    print(f"{'contexts':<24} {'static':>8} {'claimed':>8} {'ratio':>6}  claimed splits")
    for lens in CASES:
        static = static_busiest(list(lens), args.blocks)
        claimed, plan = claimed_makespan(list(lens), args.blocks)
        print(f"{describe(lens):<24} {static:>8} {claimed:>8} {claimed / static:>6.2f}  {sorted(set(plan.splits))}")


if __name__ == "__main__":
    main()
