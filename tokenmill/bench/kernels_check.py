"""Correctness and speed of the Triton attention kernels at realistic sizes (run on a GPU).

    python -m tokenmill.bench.kernels_check --out kernels.json            # Llama-3.2-1B shapes, bf16
    python -m tokenmill.bench.kernels_check --out kernels.json --sweep    # also try split counts / tile configs

Decode: batch x context grid; each case checks the cache write and the output against an fp32 reference, then
times the attention kernel (auto split count and no split), the full step (cache write + attention) eagerly and
replayed from a CUDA graph, and reports bandwidth as KV bytes read / time. Prefill: fresh and chunked prompts
vs the reference, timed, with SDPA (flash) on the same dense K/V as a speed reference. A small mixed-length
batch is also checked against tokenmill.layers.attention.paged_attention when that module exists.

Without CUDA it runs tiny sizes in Triton's interpreter (set TRITON_INTERPRET=1) as a smoke test; its timings
mean nothing there.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from tokenmill.layers.attention_metadata import AttentionMetadata

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass
class ModelShape:
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 64
    block_size: int = 16


@dataclass
class DecodeCase:
    batch: int
    context: int
    num_splits: int
    max_abs_err: float
    cache_write_ok: bool
    passed: bool
    kv_bytes: int
    attn_us: float
    attn_no_split_us: float
    step_us: float
    step_graph_us: float | None
    attn_gbps: float
    attn_no_split_gbps: float
    sweep: list[dict] = field(default_factory=list)
    error: str | None = None


@dataclass
class PrefillCase:
    batch: int
    query_len: int
    context: int
    max_abs_err: float
    passed: bool
    attn_us: float
    attn_tflops: float
    sdpa_us: float | None
    sdpa_tflops: float | None
    sweep: list[dict] = field(default_factory=list)
    error: str | None = None


# ----------------------------------------------------------------------------------------------- inputs


class PagedBatch(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache_layer: torch.Tensor
    meta: AttentionMetadata
    tables: list[list[int]]


def random_paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    shape: ModelShape,
    dtype: torch.dtype,
    device: torch.device,
    spare_blocks: int = 8,
    room: int = 0,
    seed: int = 0,
) -> PagedBatch:
    """This step's q, k, v, a random cache whose sequences own shuffled blocks (enough for `room` more tokens
    each), and the metadata."""
    gen = torch.Generator(device=device).manual_seed(seed)
    bs = shape.block_size
    blocks_needed = [math.ceil((s + room) / bs) for s in seq_lens]
    num_blocks = sum(blocks_needed) + spare_blocks
    order = torch.randperm(num_blocks, generator=gen, device=device).tolist()
    tables, used = [], 0
    for n in blocks_needed:
        tables.append(order[used : used + n])
        used += n
    cache = torch.randn(
        2, num_blocks, bs, shape.num_kv_heads, shape.head_dim, generator=gen, device=device, dtype=dtype
    )
    meta = AttentionMetadata.build(query_lens, seq_lens, tables, bs, device=device)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, shape.num_q_heads, shape.head_dim, generator=gen, device=device, dtype=dtype)
    k = torch.randn(num_tokens, shape.num_kv_heads, shape.head_dim, generator=gen, device=device, dtype=dtype)
    v = torch.randn(num_tokens, shape.num_kv_heads, shape.head_dim, generator=gen, device=device, dtype=dtype)
    return PagedBatch(q, k, v, cache, meta, tables)


def reference_from_cache(
    q: torch.Tensor, kv_cache_layer: torch.Tensor, meta: AttentionMetadata, scale: float, query_chunk: int = 1024
) -> torch.Tensor:
    """fp32 causal attention per sequence over its gathered context (the cache already holds this step's K/V)."""
    _, _, bs, num_kv_heads, head_dim = kv_cache_layer.shape
    group = q.shape[1] // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        blocks = meta.block_tables[i, : math.ceil(seq_len / bs)].long()
        keys = kv_cache_layer[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        values = kv_cache_layer[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        key_pos = torch.arange(seq_len, device=q.device)
        for c in range(start, end, query_chunk):
            c_end = min(c + query_chunk, end)
            scores = torch.einsum("qhd,khd->hqk", q[c:c_end].float(), keys) * scale
            query_pos = torch.arange(seq_len - (end - c), seq_len - (end - c_end), device=q.device)
            scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
            out[c:c_end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out


def cache_holds_step_kv(
    k: torch.Tensor, v: torch.Tensor, kv_cache_layer: torch.Tensor, meta: AttentionMetadata
) -> bool:
    _, _, _, num_kv_heads, head_dim = kv_cache_layer.shape
    flat_k = kv_cache_layer[0].reshape(-1, num_kv_heads, head_dim)
    flat_v = kv_cache_layer[1].reshape(-1, num_kv_heads, head_dim)
    return bool(torch.equal(flat_k[meta.slot_mapping], k) and torch.equal(flat_v[meta.slot_mapping], v))


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if not torch.isfinite(actual).all():
        return float("inf")
    return (actual.float() - expected).abs().max().item()


# ----------------------------------------------------------------------------------------------- timing


def time_us(fn: Callable[[], object], device: torch.device) -> float:
    """Median microseconds per call: triton's do_bench (L2 flushed between calls) on CUDA, wall clock elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def graph_replay_us(step: Callable[[], object], device: torch.device) -> float | None:
    """Captures `step` in a CUDA graph and times replays (None off CUDA)."""
    if device.type != "cuda":
        return None
    step()  # compile and warm up outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    return time_us(graph.replay, device)


# ----------------------------------------------------------------------------------------------- decode


def decode_case(
    batch: int, context: int, shape: ModelShape, dtype: torch.dtype, device: torch.device, sweep: bool
) -> DecodeCase:
    from tokenmill.kernels.triton import (
        choose_num_splits,
        paged_attention,
        paged_decode,
    )
    from tokenmill.kernels.triton.decode import num_sms

    q, k, v, cache, meta, _ = random_paged_batch([1] * batch, [context] * batch, shape, dtype, device, seed=batch)
    scale = 1.0 / math.sqrt(shape.head_dim)
    out = paged_attention(q, k, v, cache, meta, scale)
    cache_ok = cache_holds_step_kv(k, v, cache, meta)
    err = max_err(out, reference_from_cache(q, cache, meta, scale))
    no_split = paged_decode(q, cache, meta.block_tables, meta.seq_lens, scale, num_splits=1)
    err = max(err, max_err(no_split, reference_from_cache(q, cache, meta, scale)))

    splits = choose_num_splits(batch, shape.num_kv_heads, meta.block_tables.shape[1] * shape.block_size,
                               num_sms(device))
    kv_bytes = 2 * batch * context * shape.num_kv_heads * shape.head_dim * cache.element_size()
    attn_us = time_us(lambda: paged_decode(q, cache, meta.block_tables, meta.seq_lens, scale), device)
    attn_1_us = time_us(lambda: paged_decode(q, cache, meta.block_tables, meta.seq_lens, scale, num_splits=1),
                        device)
    step = lambda: paged_attention(q, k, v, cache, meta, scale)
    step_us = time_us(step, device)
    step_graph_us = graph_replay_us(step, device)

    sweep_rows = []
    if sweep:
        for num_splits in sorted({1, 2, 4, 8, 16, 32, 64, splits}):
            if num_splits > max(1, context // 64):
                continue
            for block_n, num_warps, num_stages in ((64, 4, 2), (32, 4, 2), (64, 4, 3), (128, 8, 2), (64, 2, 2)):
                fn = lambda: paged_decode(q, cache, meta.block_tables, meta.seq_lens, scale,
                                          num_splits=num_splits, block_n=block_n, num_warps=num_warps,
                                          num_stages=num_stages)
                us = time_us(fn, device)
                sweep_rows.append(dict(num_splits=num_splits, block_n=block_n, num_warps=num_warps,
                                       num_stages=num_stages, us=us, gbps=kv_bytes / us / 1e3))
        sweep_rows.sort(key=lambda r: r["us"])

    return DecodeCase(
        batch=batch, context=context, num_splits=splits, max_abs_err=err, cache_write_ok=cache_ok,
        passed=cache_ok and err <= TOLERANCE[dtype], kv_bytes=kv_bytes, attn_us=attn_us,
        attn_no_split_us=attn_1_us, step_us=step_us, step_graph_us=step_graph_us,
        attn_gbps=kv_bytes / attn_us / 1e3, attn_no_split_gbps=kv_bytes / attn_1_us / 1e3, sweep=sweep_rows[:5],
    )


def check_graph_replay_with_new_inputs(shape: ModelShape, dtype: torch.dtype, device: torch.device) -> dict:
    """Capture a decode step, move every sequence one token on through the captured buffers, replay, compare."""
    from tokenmill.kernels.triton import paged_attention

    seq_lens = [5, 300, 16, 1024, 1, 64, 999, 2047]
    q, k, v, cache, meta, tables = random_paged_batch([1] * 8, seq_lens, shape, dtype, device, room=1, seed=99)
    scale = 1.0 / math.sqrt(shape.head_dim)
    step_out = torch.empty_like(q)
    step = lambda: paged_attention(q, k, v, cache, meta, scale, out=step_out)
    step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    next_meta = AttentionMetadata.build([1] * 8, [s + 1 for s in seq_lens], tables, shape.block_size, device=device)
    meta.slot_mapping.copy_(next_meta.slot_mapping)
    meta.seq_lens.copy_(next_meta.seq_lens)
    for t in (q, k, v):
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    err = max_err(step_out, reference_from_cache(q, cache, next_meta, scale))
    cache_ok = cache_holds_step_kv(k, v, cache, next_meta)
    return dict(max_abs_err=err, cache_write_ok=cache_ok, passed=cache_ok and err <= TOLERANCE[dtype])


def check_mixed_lengths(shape: ModelShape, dtype: torch.dtype, device: torch.device, max_context: int) -> dict:
    """Random lengths (1, non-multiples of the block size, ...) in decode and mixed batches, vs the references."""
    from tokenmill.kernels.triton import paged_attention

    gen = torch.Generator().manual_seed(1234)
    results = {}
    scale = 1.0 / math.sqrt(shape.head_dim)
    seq_lens = [1, 2, 15, 17] + torch.randint(1, max_context + 1, (28,), generator=gen).tolist()
    prefill_q = [min(s, int(q)) for s, q in zip(seq_lens, torch.randint(1, 300, (32,), generator=gen))]
    for name, query_lens in (("decode", [1] * len(seq_lens)), ("mixed", prefill_q)):
        q, k, v, cache, meta, _ = random_paged_batch(query_lens, seq_lens, shape, dtype, device, seed=7)
        project_cache = cache.clone()
        out = paged_attention(q, k, v, cache, meta, scale)
        row = dict(max_abs_err=max_err(out, reference_from_cache(q, cache, meta, scale)),
                   cache_write_ok=cache_holds_step_kv(k, v, cache, meta))
        try:
            from tokenmill.layers.attention import paged_attention as project_reference
        except ImportError:
            row["vs_project_reference"] = "tokenmill.layers.attention not present"
        else:
            expected = project_reference(q, k, v, project_cache, meta, scale)
            row["vs_project_reference"] = max_err(out, expected.float())
            row["project_cache_equal"] = bool(torch.equal(project_cache, cache))
        row["passed"] = row["cache_write_ok"] and row["max_abs_err"] <= TOLERANCE[dtype] and (
            not isinstance(row["vs_project_reference"], float)
            or (row["vs_project_reference"] <= TOLERANCE[dtype] and row["project_cache_equal"])
        )
        results[name] = row
    return results


# ----------------------------------------------------------------------------------------------- prefill


def prefill_case(
    batch: int, query_len: int, context: int, shape: ModelShape, dtype: torch.dtype, device: torch.device,
    sweep: bool,
) -> PrefillCase:
    from tokenmill.kernels.triton import paged_attention, paged_prefill

    q, k, v, cache, meta, _ = random_paged_batch([query_len] * batch, [context] * batch, shape, dtype, device,
                                                 seed=3)
    scale = 1.0 / math.sqrt(shape.head_dim)
    out = paged_attention(q, k, v, cache, meta, scale)
    err = max_err(out, reference_from_cache(q, cache, meta, scale))
    attn = lambda: paged_prefill(q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                                 meta.max_query_len, scale)
    attn_us = time_us(attn, device)
    visible = sum(context - query_len + j + 1 for j in range(query_len))
    flops = 4 * batch * shape.num_q_heads * shape.head_dim * visible
    sdpa_us = None
    if query_len == context and device.type == "cuda":
        # Same K/V laid out densely: the speed of torch's flash path, which paging must compete with.
        dense_q = q.view(batch, query_len, shape.num_q_heads, shape.head_dim).transpose(1, 2)
        dense_k = k.view(batch, query_len, shape.num_kv_heads, shape.head_dim).transpose(1, 2)
        dense_v = v.view(batch, query_len, shape.num_kv_heads, shape.head_dim).transpose(1, 2)
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(
            dense_q, dense_k, dense_v, is_causal=True, scale=scale, enable_gqa=True
        )
        sdpa_us = time_us(sdpa, device)
    sweep_rows = []
    if sweep:
        for block_m in (64, 128):
            for block_n in (32, 64, 128):
                for num_warps in (4, 8):
                    for num_stages in (2, 3):
                        fn = lambda: paged_prefill(
                            q, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len,
                            scale, block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                        )
                        try:
                            us = time_us(fn, device)
                        except Exception as e:  # e.g. a tile config that runs out of shared memory
                            print(f"  prefill config m={block_m} n={block_n} w={num_warps} s={num_stages}: {e!r}")
                            continue
                        sweep_rows.append(dict(block_m=block_m, block_n=block_n, num_warps=num_warps,
                                               num_stages=num_stages, us=us, tflops=flops / us / 1e6))
        sweep_rows.sort(key=lambda r: r["us"])
    return PrefillCase(
        batch=batch, query_len=query_len, context=context, max_abs_err=err, passed=err <= TOLERANCE[dtype],
        attn_us=attn_us, attn_tflops=flops / attn_us / 1e6, sdpa_us=sdpa_us,
        sdpa_tflops=None if sdpa_us is None else flops / sdpa_us / 1e6, sweep=sweep_rows[:5],
    )


# ----------------------------------------------------------------------------------------------- driver


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shape = ModelShape(args.num_q_heads, args.num_kv_heads, args.head_dim, args.block_size)
    import triton

    report: dict = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, triton=triton.__version__, dtype=args.dtype, shape=asdict(shape),
        decode=[], prefill=[],
    )
    print(f"# {report['device']}  torch {torch.__version__}  triton {triton.__version__}  {args.dtype}  "
          f"Hq={shape.num_q_heads} Hkv={shape.num_kv_heads} D={shape.head_dim} block={shape.block_size}")

    print("\n## decode (one query token per sequence); GB/s = K+V bytes read / attention time")
    print(f"{'batch':>5} {'ctx':>6} {'splits':>6} {'attn us':>9} {'GB/s':>7} {'nosplit us':>10} {'GB/s':>7} "
          f"{'step us':>8} {'graph us':>8} {'max err':>9} ok")
    for batch in args.batches:
        for context in args.contexts:
            try:
                case = decode_case(batch, context, shape, dtype, device, args.sweep)
            except Exception as e:  # keep going: one failing shape should not hide the others
                traceback.print_exc()
                nan = float("nan")
                case = DecodeCase(batch=batch, context=context, num_splits=0, max_abs_err=nan, cache_write_ok=False,
                                  passed=False, kv_bytes=0, attn_us=nan, attn_no_split_us=nan, step_us=nan,
                                  step_graph_us=None, attn_gbps=nan, attn_no_split_gbps=nan, error=repr(e))
            report["decode"].append(asdict(case))
            print(f"{batch:>5} {context:>6} {case.num_splits:>6} {_fmt(case.attn_us):>9} {_fmt(case.attn_gbps, 0):>7} "
                  f"{_fmt(case.attn_no_split_us):>10} {_fmt(case.attn_no_split_gbps, 0):>7} {_fmt(case.step_us):>8} "
                  f"{_fmt(case.step_graph_us):>8} {case.max_abs_err:>9.2e} {'yes' if case.passed else 'NO'}"
                  + (f"  {case.error}" if case.error else ""))
            for row in case.sweep[:3]:
                print(f"{'':>12} sweep: splits={row['num_splits']} block_n={row['block_n']} warps={row['num_warps']} "
                      f"stages={row['num_stages']} -> {row['us']:.1f} us {row['gbps']:.0f} GB/s")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    print("\n## prefill (paged, causal); TFLOP/s counts only visible (causal) scores")
    print(f"{'batch':>5} {'q len':>6} {'ctx':>6} {'attn us':>9} {'TFLOP/s':>8} {'sdpa us':>9} {'TFLOP/s':>8} "
          f"{'max err':>9} ok")
    for batch, query_len, context in args.prefills:
        try:
            pcase = prefill_case(batch, query_len, context, shape, dtype, device, args.sweep)
        except Exception as e:
            traceback.print_exc()
            nan = float("nan")
            pcase = PrefillCase(batch=batch, query_len=query_len, context=context, max_abs_err=nan, passed=False,
                                attn_us=nan, attn_tflops=nan, sdpa_us=None, sdpa_tflops=None, error=repr(e))
        report["prefill"].append(asdict(pcase))
        print(f"{batch:>5} {query_len:>6} {context:>6} {_fmt(pcase.attn_us):>9} {_fmt(pcase.attn_tflops):>8} "
              f"{_fmt(pcase.sdpa_us):>9} {_fmt(pcase.sdpa_tflops):>8} {pcase.max_abs_err:>9.2e} "
              f"{'yes' if pcase.passed else 'NO'}" + (f"  {pcase.error}" if pcase.error else ""))
        for row in pcase.sweep[:3]:
            print(f"{'':>12} sweep: block_m={row['block_m']} block_n={row['block_n']} warps={row['num_warps']} "
                  f"stages={row['num_stages']} -> {row['us']:.1f} us {row['tflops']:.1f} TFLOP/s")

    print("\n## checks")
    for name, check in (
        ("mixed_lengths", lambda: check_mixed_lengths(shape, dtype, device, max(args.contexts))),
        ("cuda_graph_replay", lambda: check_graph_replay_with_new_inputs(shape, dtype, device)
         if device.type == "cuda" else {"skipped": "needs CUDA"}),
    ):
        try:
            report[name] = check()
        except Exception as e:
            traceback.print_exc()
            report[name] = {"passed": False, "error": repr(e)}
        print(f"{name}: {json.dumps(report[name])}")

    report["all_passed"] = (
        all(c["passed"] for c in report["decode"]) and all(c["passed"] for c in report["prefill"])
        and all(r.get("passed", True) for r in report["mixed_lengths"].values() if isinstance(r, dict))
        and report["cuda_graph_replay"].get("passed", True)
    )
    print(f"\nall correctness checks passed: {report['all_passed']}")
    return report


def _prefill_spec(text: str) -> tuple[int, int, int]:
    try:
        batch, query_len, context = (int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"prefill case must be BATCHxQUERYxCONTEXT, got {text!r}") from None
    if not 0 < query_len <= context:
        raise argparse.ArgumentTypeError(f"need 0 < query_len <= context in {text!r}")
    return batch, query_len, context


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the JSON report here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--num-q-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    parser.add_argument("--prefills", type=_prefill_spec, nargs="+",
                        default=[_prefill_spec(s) for s in ("1x512x512", "1x2048x2048", "1x8192x8192",
                                                            "4x1024x1024", "1x512x4096", "8x256x2048")],
                        help="BATCHxQUERYxCONTEXT; query < context is a chunked prefill after cached context")
    parser.add_argument("--sweep", action="store_true", help="also time split counts and tile configs per case")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (for the CPU interpreter)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_q_heads, args.num_kv_heads, args.head_dim = 4, 2, 64
        args.batches, args.contexts = [1, 3], [20, 300]
        args.prefills = [(1, 20, 20), (2, 5, 40)]
    torch.manual_seed(0)
    report = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
