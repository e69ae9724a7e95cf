"""Where a megakernel decode step spends its time: one traced launch per (batch, context), on an sm_90 GPU.

Writes, per cell, the raw global-timer stamps (per instruction: start / dependency met / end and its phase ends;
per weight chunk: producer issued / consumers found it landed) to <out>/timeline_b<B>_c<C>.pt, prints the
per-stage summary, the block that ends each stage last, each matmul's phases, attention's critical path by phase,
the weight bytes the producers issued per microsecond over all SMs (HBM demand) and the share of the step in
which that demand is below half the copy bandwidth, how much of the copy bandwidth each stage's window used (and
on whose weights), when qkv's, gate_up's and down's chunks were issued and used, and plots the demand to
<out>/timeline_b<B>_c<C>.png.

    PYTHONPATH=. python scripts/megakernel_timeline.py --cells 1x1024,16x1024 --out /tmp/timeline
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tokenmill.bench.decode import _sync, build_model, make_kv_cache, measure_copy_bandwidth, step_inputs
from tokenmill.kernels.megakernel.decoder import MegakernelLlamaDecoder
from tokenmill.kernels.megakernel.trace import (
    attention_phases, chunk_cadence, chunk_timeline, critical_path, matmul_phases, per_op_stage_times, stage_report,
    stage_windows, tagged_repolls,
)
from tokenmill.plotting import PlottingUnavailable, pyplot


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="1x1024", help="comma-separated BATCHxCONTEXT")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--out", type=Path, default=Path("timeline"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    cells = [tuple(int(x) for x in c.split("x")) for c in args.cells.split(",")]
    model, config, _ = build_model(args.shape, torch.bfloat16, device, seed=0)
    kv_cache = make_kv_cache(config, max(b for b, _ in cells), max(c for _, c in cells), torch.bfloat16, device, 1)
    bandwidth = measure_copy_bandwidth(device)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    decoder = MegakernelLlamaDecoder(model)
    for batch, context in cells:
        inputs = step_inputs(batch, context, kv_cache.shape[2], config.vocab_size, device, seed=batch)
        decoder.enable_trace(batch)
        for _ in range(3):  # the last launch's stamps are kept
            decoder.decode_logits(inputs.input_ids, inputs.positions, kv_cache, inputs.meta)
        _sync(device)
        schedule, instr_stamps, chunk_stamps = decoder.trace_stamps(batch)  # one device-to-host copy
        phase_stamps = decoder.phase_stamps(batch)
        repolls = tagged_repolls(schedule, instr_stamps, decoder.repoll_counts(batch))
        phases = attention_phases(schedule, instr_stamps, phase_stamps)
        mm_phases = matmul_phases(schedule, instr_stamps, phase_stamps)
        report = stage_report(schedule, instr_stamps)
        timeline = chunk_timeline(schedule, instr_stamps, chunk_stamps)
        path = critical_path(schedule, instr_stamps, chunk_stamps)
        windows = stage_windows(schedule, instr_stamps, chunk_stamps, bandwidth)
        cadence = {op: chunk_cadence(schedule, instr_stamps, chunk_stamps, op) for op in ("qkv", "gate_up", "down")}
        stem = args.out / f"timeline_b{batch}_c{context}"
        torch.save(dict(trace=instr_stamps, chunk_trace=chunk_stamps, phase_trace=phase_stamps, report=report,
                        timeline=timeline, attention_phases=phases, matmul_phases=mm_phases, critical_path=path,
                        tagged_repolls=repolls, stage_windows=windows, chunk_cadence=cadence,
                        blocks=[list(map(tuple, b)) for b in schedule.blocks], bandwidth=bandwidth), f"{stem}.pt")
        rate = timeline["issued_GBps"]
        low = sum(1 for r in rate if r < 0.5 * bandwidth / 1e9) / len(rate)
        print(f"b={batch} ctx={context}: span {report['span_us']:.1f} us; issue rate below half the copy bandwidth "
              f"in {100 * low:.0f}% of the 1-us bins")
        stages = report["stages"]
        print("  per op, us (mean over layers): stage end to stage end | dependency met -> first chunk landed | "
              "last chunk landed -> end")
        for op, row in per_op_stage_times(report).items():
            print(f"  {op:9s} {row['stage_us']:7.2f} | {timeline['staging_us'].get(op, 0.0):5.2f} | "
                  f"{timeline['tail_us'].get(op, 0.0):5.2f}")
        print("  the block that ends each stage last, us after the previous stage's end (mean over layers): "
              "dependency met | first chunk used | last chunk used | end")
        for op, row in path.items():
            print(f"  {op:9s} " + " | ".join(f"{row[k]:6.2f}" if k in row else "     -"
                                            for k in ("dep_met", "first_chunk", "last_chunk", "end")))
        print("  matmul instructions, us per phase (mean over all blocks): "
              + "; ".join(f"{op} " + " ".join(f"{name} {us:.2f}" for name, us in parts.items())
                          for op, parts in mm_phases.items()))
        print("  attention's critical block, us per phase (mean over layers): "
              + ", ".join(f"{name} {us:.2f}" for name, us in phases.items()))
        if repolls:
            print("  tagged words re-read before they were complete (a consumer's most; mean / max over instructions; "
                  "the last instruction to meet its dependency, mean over stages): "
                  + "; ".join(f"{op} {r['mean']:.1f} / {r['max']} / {r['last']:.1f}" for op, r in repolls.items()))
        print(f"  HBM use per stage window (previous stage's end to this one's, mean over layers; the step "
              f"{windows['step']['of_bandwidth']:.2f} of the copy bandwidth): us | MB issued | of bandwidth | "
              f"whose weights, MB")
        for op, row in windows["ops"].items():
            owners = ", ".join(f"{owner} {mb:.1f}" for owner, mb in sorted(row["by_op"].items(), key=lambda x: -x[1])
                               if mb >= 0.05)
            print(f"  {op:9s} {row['window_us']:7.2f} | {row['issued_MB']:6.1f} | {row['of_bandwidth']:4.2f} | {owners}")
        print("  chunks issued / used, us after the previous stage's end (mean over instructions with that many "
              "chunks; used long after issued: the consumers set the pace)")
        for op, groups in cadence.items():
            for count, row in groups.items():
                print(f"  {op:9s} x{count:<3d} ({row['instructions']:4d}) issued "
                      + " ".join(f"{t:6.2f}" for t in row["issued_us"]))
                print(f"  {'':9s} {'':4s} {'':6s} used   " + " ".join(f"{t:6.2f}" for t in row["used_us"]))
        decoder.enable_trace(batch, on=False)
        try:
            plt = pyplot()
        except PlottingUnavailable:
            continue
        fig, ax = plt.subplots(figsize=(14, 4))
        ax.plot([i * timeline["bin_us"] for i in range(len(rate))], rate, lw=0.8)
        ax.axhline(bandwidth / 1e9, color="k", ls="--", lw=0.8, label="copy bandwidth")
        for row in stages:
            if row["op"] in ("qkv", "attention"):
                ax.axvline(row["last_end"], color="r" if row["op"] == "attention" else "g", lw=0.4)
        ax.set_xlabel("us since the first instruction (green: qkv ends, red: attention ends)")
        ax.set_ylabel("weight bytes issued, GB/s")
        ax.set_title(f"megakernel b={batch} ctx={context}: HBM demand over one decode step")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(f"{stem}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
