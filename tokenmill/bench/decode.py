"""`tokenmill bench decode`: decode ms/token against the memory-bandwidth floor, in one GPU run.

    tokenmill bench decode --quick --out decode.json        # < 4 min on an H100, compile times included
    tokenmill bench decode --out decode.json                # more repeats, more transformers cells
    tokenmill bench decode --quick --sweep --out d.json     # + per-kernel tile sweep at batch 1, 4, 16 (< 3 min)

Measures the device-to-device copy bandwidth (read + write), then for each (batch, context) the floor
(weight bytes + KV bytes read) / bandwidth and the time per decode step of:
    hf-static     Hugging Face transformers, static cache (transformers compiles the forward by itself)
    torch-eager   our LlamaForCausalLM (Triton paged attention), eager
    torch-graph   the same step captured in a CUDA graph
    fused         FusedLlamaDecoder.decode_step (fused kernels, final norm + LM head + argmax) in a CUDA graph
    fused-pdl     the same with programmatic dependent launch (where triton and the GPU support it)
    megakernel    MegakernelLlamaDecoder: the whole step in one persistent kernel (sm_90a), argmax after it
Every step ends in greedy tokens (argmax), so all variants do the same work. Times are medians over many CUDA
graph replays timed with events (eager: per step). The model is Llama-3.2-1B-shaped with random weights; every
sequence of a batch sits at the same context length, its blocks scattered through the cache like a real pool.
A failing variant is reported in its cell and the run goes on. The fused step is also checked against the torch
step on the same inputs (max relative logit error, argmax agreement).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tokenmill.kernels.fused_llama import gemm_shape
from tokenmill.layers.attention_metadata import AttentionMetadata

BLOCK_SIZE = 16
VARIANTS = ("hf-static", "torch-eager", "torch-graph", "fused", "fused-pdl", "megakernel")
GEMV_OPS = ("qkv", "o", "gate_up", "down", "lm_head")
SHORT_CONTEXT = 256  # --short-context: the other sequences of a mixed-length cell (--long-seqs)
_TRACED: set[str] = set()


@dataclass
class VariantResult:
    ms: float | None = None
    error: str | None = None
    note: str | None = None


@dataclass
class Cell:
    batch: int
    context: int
    floor_ms: float
    kv_bytes: int
    results: dict[str, VariantResult] = field(default_factory=dict)
    check: dict | None = None  # fused vs torch on the same inputs


@dataclass
class Settings:
    batches: list[int]
    contexts: list[int]
    variants: list[str]
    trials: int
    replays: int
    eager_iters: int
    hf_cells: list[tuple[int, int]]
    hf_new_tokens: int
    hf_budget_s: float
    breakdown_batches: list[int]
    sweep: bool
    sweep_batches: list[int]
    sweep_budget_s: float
    seed: int
    # 0: every sequence of a cell holds the cell's context; N: only the first N do, the others short_context tokens
    # (a batch of mixed lengths: one long sequence among short ones)
    long_seqs: int = 0
    short_context: int = SHORT_CONTEXT


# ---- measuring ----------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of fn on the device: CUDA events around it on a GPU, the host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, trials: int = 9) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written; median of trials."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copies():
        for _ in range(5):
            dst.copy_(src)

    for _ in range(2):
        copies()
    times = [elapsed_ms(copies, device) / 5 for _ in range(trials)]
    return 2 * nbytes / (statistics.median(times) / 1000)


class _EagerReplay:
    """Stands in for a CUDA graph off the GPU (smoke runs): replay() calls the function again."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self.replay = fn


def capture_graph(fn: Callable[[], object], device: torch.device):
    """(graph, outputs of fn captured in it). fn runs twice first on a side stream: compiles happen outside."""
    if device.type != "cuda":
        return _EagerReplay(fn), fn()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize(device)
    return graph, out


def time_graph(graph, trials: int, replays: int, device: torch.device) -> float:
    """Median ms per replay over `trials` groups of `replays` back-to-back replays."""
    for _ in range(3):
        graph.replay()

    def group():
        for _ in range(replays):
            graph.replay()

    return statistics.median(elapsed_ms(group, device) / replays for _ in range(trials))


def time_eager(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    """Median ms of single calls (launch overhead included, as an eager decode loop pays it)."""
    for _ in range(2):
        fn()
    _sync(device)
    return statistics.median(elapsed_ms(fn, device) for _ in range(iters))


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text[:300]


# ---- the model and the inputs ---------------------------------------------------------------------------------------


def build_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int):
    """Our LlamaForCausalLM in `shape` with N(0, 0.02) weights drawn on the GPU (norm weights around 1)."""
    from tokenmill.config import ModelConfig
    from tokenmill.kernels.backends import get_attention_backend
    from tokenmill.models.llama import LlamaForCausalLM
    from tokenmill.models.random_weights import SHAPES

    hf_dict = dict(SHAPES[shape], architectures=["LlamaForCausalLM"])
    config = ModelConfig.from_hf_dict(hf_dict)
    backend = get_attention_backend("triton" if device.type == "cuda" else "auto", device)
    model = LlamaForCausalLM(config, dtype=dtype, device=device, attn_backend=backend)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.02, generator=gen)
            if name.endswith("norm.weight"):
                param.add_(1.0)
    return model, config, hf_dict


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata


def make_kv_cache(config, max_batch: int, max_context: int, dtype: torch.dtype, device: torch.device, seed: int):
    """A random (never zero) KV cache with room for max_batch sequences of max_context tokens, plus block 0."""
    blocks = max_batch * math.ceil(max_context / BLOCK_SIZE) + 1
    shape = (config.num_hidden_layers, 2, blocks, BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    gen = torch.Generator(device=device).manual_seed(seed)
    cache = torch.empty(shape, dtype=dtype, device=device)
    cache.normal_(0.0, 1.0, generator=gen)
    return cache


def cell_lengths(batch: int, context: int, long_seqs: int = 0, short_context: int = SHORT_CONTEXT) -> list[int]:
    """Each sequence's tokens in a cell: all `context`, or (long_seqs > 0) the first long_seqs of them and the rest
    min(short_context, context)."""
    if long_seqs <= 0:
        return [context] * batch
    return [context] * min(long_seqs, batch) + [min(short_context, context)] * max(0, batch - long_seqs)


def step_inputs(batch: int, context: int, num_blocks: int, vocab: int, device: torch.device, seed: int,
                lengths: list[int] | None = None) -> StepInputs:
    """One decode step: every sequence has `context` tokens including the new one (or lengths[i]); blocks are
    shuffled."""
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [context] * batch
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 stays reserved
    tables, start = [], 0
    for length in lengths:
        tables.append(order[start:start + math.ceil(length / BLOCK_SIZE)])
        start += len(tables[-1])
    meta = AttentionMetadata.build([1] * batch, lengths, tables, BLOCK_SIZE, device=device)
    ids = torch.randint(0, vocab, (batch,), generator=gen).to(device)
    positions = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=device)
    return StepInputs(ids, positions, meta)


# ---- variants -------------------------------------------------------------------------------------------------------


def torch_step(model, kv_cache, inputs: StepInputs):
    def run():
        hidden = model(inputs.input_ids, inputs.positions, kv_cache, inputs.meta)
        logits = model.compute_logits(hidden)
        return logits, logits.argmax(-1)

    return run


def fused_step(decoder, kv_cache, inputs: StepInputs):
    if not hasattr(decoder, "decode_step"):  # the megakernel: logits from one launch, then argmax
        def run_megakernel():
            logits = decoder.decode_logits(inputs.input_ids, inputs.positions, kv_cache, inputs.meta)
            return logits, logits.argmax(-1)

        return run_megakernel

    def run():
        out = decoder.decode_step(inputs.input_ids, inputs.positions, kv_cache, inputs.meta, argmax=True)
        return out.logits, out.tokens

    return run


def compare_logits(ref: torch.Tensor, out: torch.Tensor) -> dict:
    ref, out = ref.float(), out.float()
    ref_logp, logp = ref.double().log_softmax(-1), out.double().log_softmax(-1)
    return dict(
        max_rel_err=((out - ref).abs().max() / ref.abs().max()).item(),
        kl=(ref_logp.exp() * (ref_logp - logp)).sum(-1).max().item(),
        argmax_agree=(out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        finite=bool(torch.isfinite(out).all()),
    )


class HFStaticBench:
    """transformers LlamaForCausalLM with the same shape (its own random weights), generate() with a static cache.

    ms/token comes from per-token timestamps of one generate call (a streamer), so the static cache has one shape
    per cell and transformers compiles once per cell; the first (prefill) token is excluded.
    """

    def __init__(self, hf_dict: dict, dtype: torch.dtype, device: torch.device, seed: int) -> None:
        from transformers import LlamaConfig
        from transformers import LlamaForCausalLM as HFLlama

        torch.manual_seed(seed)
        config = LlamaConfig(**{k: v for k, v in hf_dict.items() if k != "architectures"})
        with torch.device(device):
            self.model = HFLlama(config).to(dtype).eval()
        self.device = device
        self.vocab = config.vocab_size

    def ms_per_token(self, batch: int, context: int, new_tokens: int, repeats: int = 3) -> float:
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Stamps(BaseStreamer):
            def put(self, value):
                stamps.append(time.perf_counter())

            def end(self):
                pass

        prompt_len = max(1, context - new_tokens // 2)
        gen = torch.Generator().manual_seed(batch * 7919 + context)
        ids = torch.randint(3, self.vocab, (batch, prompt_len), generator=gen).to(self.device)
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      do_sample=False, pad_token_id=0, cache_implementation="static")
        per_token = []
        with torch.inference_mode():
            self.model.generate(ids, **kwargs)  # compiles for this shape
            for _ in range(repeats):
                stamps.clear()
                self.model.generate(ids, streamer=Stamps(), **kwargs)
                # put() sees the prompt first, then each new token; decode time runs from the first new token.
                if len(stamps) < new_tokens:
                    raise RuntimeError(f"the streamer saw {len(stamps)} puts for {new_tokens} new tokens")
                decode = stamps[-new_tokens:]
                per_token.append(1000 * (decode[-1] - decode[0]) / (len(decode) - 1))
        return statistics.median(per_token)


# ---- per-kernel breakdown and tile sweep ---------------------------------------------------------------------------


def op_bytes(config, op: str, batch: int, context: int, dtype_bytes: int) -> int:
    c = config
    q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {
        "qkv": (q_size + 2 * kv_size) * c.hidden_size * dtype_bytes,
        "attention": batch * context * 2 * kv_size * dtype_bytes,
        "o": c.hidden_size * q_size * dtype_bytes,
        "gate_up": 2 * c.intermediate_size * c.hidden_size * dtype_bytes,
        "down": c.hidden_size * c.intermediate_size * dtype_bytes,
        "lm_head": c.vocab_size * c.hidden_size * dtype_bytes,
    }[op]


def op_launcher(decoder, op: str, kv_cache, inputs: StepInputs, gemv_config=None, use_pdl: bool = False):
    """fn() that runs `op` once per layer (each with that layer's weights, so nothing is re-read from L2)."""
    from tokenmill.kernels.triton.decode import paged_decode
    from tokenmill.kernels.triton.fused_decode import gate_up_silu, linear_residual, lm_head, qkv_rope_cache

    d, cfg = decoder, decoder.config
    m = inputs.input_ids.shape[0]
    dev, dt = d.device, d.dtype
    gen = torch.Generator(device=dev).manual_seed(1)
    h = torch.randn(m, cfg.hidden_size, generator=gen, device=dev).to(dt)
    attn = torch.randn(m, d.num_q_heads, d.head_dim, generator=gen, device=dev).to(dt)
    act = torch.randn(m, cfg.intermediate_size, generator=gen, device=dev).to(dt)
    q = torch.empty(m, d.num_q_heads, d.head_dim, device=dev, dtype=dt)
    counters = d.counters
    kw = dict(counters=counters, use_pdl=use_pdl)
    meta = inputs.meta

    def run():
        if op == "lm_head":
            for _ in range(4):  # 4 x 525 MB: well past L2
                lm_head(h, d.lm_head_weight, norm_weight=d.final_norm, eps=d.eps, argmax=True,
                        config=gemv_config or d.gemv_config("lm_head", m), **kw)
            return
        for i, layer in enumerate(d.layers):
            if op == "qkv":
                qkv_rope_cache(h, layer.attn_norm, d.eps, layer.qkv, layer.qkv_bias, inputs.positions, d.cos, d.sin,
                               meta.slot_mapping, kv_cache[i], d.num_q_heads, q_out=q,
                               config=gemv_config or d.gemv_config("qkv", m), **kw)
            elif op == "attention":
                paged_decode(attn, kv_cache[i], meta.block_tables, meta.seq_lens, d.scale, out=q)
            elif op == "o":
                linear_residual(attn.view(m, -1), layer.o, h, config=gemv_config or d.gemv_config("o", m), **kw)
            elif op == "gate_up":
                gate_up_silu(h, layer.mlp_norm, d.eps, layer.gate_up, out=act,
                             config=gemv_config or d.gemv_config("gate_up", m), **kw)
            elif op == "down":
                linear_residual(act, layer.down, h, config=gemv_config or d.gemv_config("down", m), **kw)

    calls = 4 if op == "lm_head" else len(d.layers)
    return run, calls


# Tensor-core shapes tried at every batch >= 2: (block_n, block_k, split_k, num_warps, num_stages). Around the
# heuristic's picks (qkv 32x256; gate_up and lm_head 64x128; o 16x256; down 16x128 split 4 with 4 stages), plus the
# neighbours that separate K step from split count and from stage count.
DOT_CANDIDATES = [
    (16, 256, 1, 4, 3), (16, 256, 2, 4, 3), (16, 256, 4, 4, 3), (16, 128, 2, 4, 4), (16, 128, 4, 4, 4),
    (32, 256, 1, 4, 3), (32, 256, 2, 4, 3), (64, 128, 1, 4, 3), (64, 256, 1, 4, 3),
]
# CUDA-core shapes at batch 1: (block_n, block_k, split_k, num_warps).
CUDA_CORE_CANDIDATES = [(2, 2048, 1, 4), (4, 1024, 1, 4), (8, 512, 1, 4), (16, 256, 1, 4), (4, 2048, 1, 8),
                        (8, 512, 2, 4)]
# CUDA-core shapes for batches 2-4, all rows in one program (block_m x block_n x block_k fp32 in registers).
SMALL_BATCH_CUDA_CORE_CANDIDATES = [(2, 1024, 1, 4), (4, 512, 1, 4), (4, 256, 1, 4)]


def sweep_candidates(op: str, batch: int, config) -> list:
    """Alternative tile shapes around the heuristic's choice, legal for this op's shape. Batches 2-4 get both
    paths: the tensor-core tiles and CUDA-core tiles holding the whole batch."""
    from tokenmill.kernels.triton.fused_config import GemvConfig, check_gemv_config

    n, k, pair_half = gemm_shape(config, op)
    if batch == 1:
        raw = [GemvConfig(bn, bk, 1, s, False, w, 1) for bn, bk, s, w in CUDA_CORE_CANDIDATES]
    else:
        bm = max(16, 1 << (batch - 1).bit_length())
        raw = [GemvConfig(bn, bk, bm, s, True, w, st) for bn, bk, s, w, st in DOT_CANDIDATES]
        if batch <= 4:
            bm_small = 1 << (batch - 1).bit_length()
            raw += [GemvConfig(bn, bk, bm_small, s, False, w, 1) for bn, bk, s, w in SMALL_BATCH_CUDA_CORE_CANDIDATES]
    legal = []
    for cand in raw:
        try:
            check_gemv_config(cand, n, k, pair_half)
        except ValueError:
            continue
        legal.append(cand)
    return legal


# ---- the run --------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    if args.replot:
        return replot(args)
    settings = make_settings(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("bench decode needs a CUDA GPU, and torch sees none")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif args.shape != "tiny":
        raise ValueError("off the GPU, bench decode runs only as a smoke test: --shape tiny (its times mean nothing)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    out_path = Path(args.out) if args.out else None
    t_start = time.perf_counter()
    report: dict = dict(
        date=time.strftime("%Y-%m-%d %H:%M"), host=platform.node(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        torch=torch.__version__, shape=args.shape, dtype=args.dtype, quick=args.quick, settings=asdict(settings),
    )
    with contextlib.suppress(ImportError):
        import triton

        report["triton"] = triton.__version__
    with contextlib.suppress(ImportError):
        import transformers

        report["transformers"] = transformers.__version__

    def save() -> None:
        report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        if out_path:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(report, indent=2, default=str))

    bandwidth = measure_copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 24))
    model, config, hf_dict = build_model(args.shape, dtype, device, settings.seed)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = config.kv_bytes_per_token(dtype)
    report.update(copy_bandwidth_TBps=bandwidth / 1e12, weight_bytes=weight_bytes, kv_bytes_per_token=kv_per_token,
                  batch1_floor_ms=1000 * weight_bytes / bandwidth)
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e12:.3f} TB/s (read + write); weights "
          f"{weight_bytes / 1e9:.3f} GB -> batch-1 floor {report['batch1_floor_ms']:.3f} ms/token; KV "
          f"{kv_per_token} B/token", flush=True)

    if settings.long_seqs:
        print(f"mixed lengths: {settings.long_seqs} sequence(s) of each cell at its context, the others at "
              f"{settings.short_context} tokens", flush=True)
    kv_cache = make_kv_cache(config, max(settings.batches + settings.breakdown_batches + settings.sweep_batches),
                             max(settings.contexts + [1024]), dtype, device, settings.seed)
    decoders = make_decoders(model, settings.variants, report)

    cells: list[Cell] = []
    report["cells"] = []
    for batch in settings.batches:
        for context in settings.contexts:
            lengths = cell_lengths(batch, context, settings.long_seqs, settings.short_context)
            kv_bytes = sum(lengths) * kv_per_token
            cell = Cell(batch, context, 1000 * (weight_bytes + kv_bytes) / bandwidth, kv_bytes)
            inputs = step_inputs(batch, context, kv_cache.shape[2], config.vocab_size, device,
                                 settings.seed + batch * 100003 + context, lengths)
            run_cell(cell, model, decoders, kv_cache, inputs, settings, device)
            cells.append(cell)
            report["cells"].append(asdict(cell))
            print(cell_line(cell), flush=True)
            save()
    print_table(cells, report, [v for v in settings.variants if v != "hf-static"])
    report["fused_max_batch"] = fused_max_batch(cells)

    if settings.breakdown_batches and "fused" in decoders:
        report["breakdown"] = run_breakdown(decoders["fused"], kv_cache, settings, bandwidth, device)
        save()
    if settings.breakdown_batches and "megakernel" in decoders:
        report["megakernel_trace"] = run_megakernel_trace(decoders["megakernel"], kv_cache, settings, device)
        save()
    if settings.sweep and "fused" in decoders:
        report["sweep"] = run_sweep(decoders["fused"], kv_cache, settings, bandwidth, device)
        save()

    # transformers last: torch.compile changes global state, and a slow compile must not cost our numbers.
    if "hf-static" in settings.variants and settings.hf_cells:
        del decoders, model, kv_cache  # transformers needs room for its own copy of the weights and its cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run_hf(cells, report, hf_dict, dtype, device, settings)
        save()
    if settings.breakdown_batches or settings.sweep or "hf-static" in settings.variants:
        print_table(cells, report, settings.variants)  # again, last, so it ends the output
    save()
    if out_path:
        print(f"wrote {out_path} ({report['elapsed_s']} s)")
        write_plot(report, out_path.with_suffix(".png"))
    return 0


def write_plot(report: dict, path: Path) -> None:
    from tokenmill.bench.decode_plot import plot_decode
    from tokenmill.plotting import PlottingUnavailable

    try:
        print(f"wrote {plot_decode(report, path)}")
    except PlottingUnavailable as exc:
        print(f"no plot: {exc}")


def replot(args: argparse.Namespace) -> int:
    """--replot: the figure of a saved run (no GPU)."""
    from tokenmill.bench.decode_plot import load_report, plot_decode

    source = Path(args.replot)
    print(f"wrote {plot_decode(load_report(source), Path(args.out) if args.out else source.with_suffix('.png'))}")
    return 0


def make_settings(args: argparse.Namespace) -> Settings:
    def ints(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise ValueError(f"expected positive integers, got {text!r}")
        return values

    long_seqs, short_context = args.long_seqs, args.short_context
    if long_seqs < 0 or short_context < 1:
        raise ValueError(f"--long-seqs must be >= 0 and --short-context >= 1, got {long_seqs} and {short_context}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    hf_cells = []
    default_hf = "1x128" if args.quick else "1x128,1x1024,4x1024,16x1024"
    for item in (args.hf_cells if args.hf_cells is not None else default_hf).split(","):
        if item.strip():
            b, _, c = item.strip().partition("x")
            hf_cells.append((int(b), int(c)))
    return Settings(
        batches=ints(args.batches),
        contexts=ints(args.contexts),
        variants=variants,
        trials=7 if args.quick else 21,
        replays=5 if args.quick else 10,
        eager_iters=7 if args.quick else 21,
        hf_cells=hf_cells,
        hf_new_tokens=32 if args.quick else 64,
        hf_budget_s=args.hf_budget_s,
        breakdown_batches=[] if args.no_breakdown else ([1, 16] if args.quick else [1, 4, 16]),
        sweep=args.sweep,
        sweep_batches=ints(args.sweep_batches),
        sweep_budget_s=args.sweep_budget_s,
        seed=args.seed,
        long_seqs=long_seqs,
        short_context=short_context,
    )


def make_decoders(model, variants: list[str], report: dict) -> dict:
    from tokenmill.kernels.fused_llama import FusedLlamaDecoder

    decoders = {}
    for name, pdl in (("fused", False), ("fused-pdl", True)):
        if name not in variants:
            continue
        try:
            decoder = FusedLlamaDecoder(model, use_pdl=pdl)
            if pdl and not decoder.use_pdl:
                report.setdefault("notes", []).append("fused-pdl: PDL unsupported here (GPU or triton)")
                continue
            decoders[name] = decoder
        except Exception as exc:  # a variant that cannot even be built is reported, not fatal
            report.setdefault("notes", []).append(f"{name}: {short_error(exc)}")
    if "megakernel" in variants:
        try:
            from tokenmill.kernels.megakernel.decoder import MegakernelLlamaDecoder

            t0 = time.perf_counter()
            decoders["megakernel"] = MegakernelLlamaDecoder(model)
            report["megakernel_build_s"] = round(time.perf_counter() - t0, 2)
        except Exception as exc:
            report.setdefault("notes", []).append(f"megakernel: {short_error(exc)}")
    return decoders


def run_cell(cell: Cell, model, decoders: dict, kv_cache, inputs: StepInputs, settings: Settings,
             device: torch.device) -> None:
    outputs = {}
    for variant in settings.variants:
        if variant == "hf-static":
            continue
        result = VariantResult()
        try:
            if variant == "torch-eager":
                result.ms = time_eager(torch_step(model, kv_cache, inputs), settings.eager_iters, device)
            elif variant == "torch-graph":
                graph, out = capture_graph(torch_step(model, kv_cache, inputs), device)
                result.ms = time_graph(graph, settings.trials, settings.replays, device)
                graph.replay()
                outputs[variant] = out[0].clone()
                del graph
            elif variant in decoders:
                graph, out = capture_graph(fused_step(decoders[variant], kv_cache, inputs), device)
                result.ms = time_graph(graph, settings.trials, settings.replays, device)
                graph.replay()
                outputs[variant] = out[0].clone()
                if not torch.equal(out[1], out[0].argmax(-1)):
                    result.note = f"{variant} argmax differs from argmax of its logits"
                del graph
            else:
                result.error = "not available (see notes)"
        except Exception as exc:  # one failing variant must not cost the others
            result.error = short_error(exc)
            if variant not in _TRACED:  # one traceback per variant keeps the table inside the output tail
                _TRACED.add(variant)
                traceback.print_exc()
        cell.results[variant] = result
        _sync(device)
    if "torch-graph" in outputs:
        cell.check = {v: compare_logits(outputs["torch-graph"], outputs[v]) for v in outputs if v != "torch-graph"}


def run_breakdown(decoder, kv_cache, settings: Settings, bandwidth: float, device: torch.device) -> list[dict]:
    """Each fused op alone, once per layer in one CUDA graph: us per call and achieved bandwidth."""
    rows = []
    config, elem = decoder.config, decoder.dtype.itemsize
    print("\nper-kernel breakdown (one CUDA graph per op; us per call; GB/s over bytes that must move):")
    for batch in settings.breakdown_batches:
        context = 1024
        inputs = step_inputs(batch, context, kv_cache.shape[2], config.vocab_size, device, settings.seed + batch)
        for op in ("qkv", "attention", "o", "gate_up", "down", "lm_head"):
            row = dict(batch=batch, context=context, op=op)
            try:
                fn, calls = op_launcher(decoder, op, kv_cache, inputs)
                graph, _ = capture_graph(fn, device)
                us = 1000 * time_graph(graph, settings.trials, settings.replays, device) / calls
                nbytes = op_bytes(config, op, batch, context, elem)
                row.update(us=us, bytes=nbytes, GBps=nbytes / us / 1e3,
                           pct_of_copy=100 * nbytes / us / 1e-6 / bandwidth)
                if op in GEMV_OPS:
                    row["config"] = asdict(decoder.gemv_config(op, batch))
                del graph
            except Exception as exc:
                row["error"] = short_error(exc)
            rows.append(row)
            if "error" in row:
                print(f"  b={batch:<3} {op:9s} error: {row['error']}")
            else:
                print(f"  b={batch:<3} {op:9s} {row['us']:8.2f} us  {row['GBps']:7.0f} GB/s  "
                      f"{row['pct_of_copy']:5.1f}% of copy bw")
    return rows


def run_megakernel_trace(decoder, kv_cache, settings: Settings, device: torch.device) -> list[dict]:
    """One traced megakernel step per breakdown batch at context 1k: per op, the mean time from the previous stage's
    end to this stage's end (its share of the critical path) and the mean time its instructions waited."""
    from tokenmill.kernels.megakernel.trace import per_op_stage_times

    print("\nmegakernel trace (one launch with global-timer stamps; us, mean over layers):")
    out = []
    for batch in settings.breakdown_batches:
        inputs = step_inputs(batch, 1024, kv_cache.shape[2], decoder.config.vocab_size, device, settings.seed + batch)
        try:
            decoder.enable_trace(batch)
            for _ in range(3):  # the last launch's stamps are kept; earlier ones warm up
                decoder.decode_logits(inputs.input_ids, inputs.positions, kv_cache, inputs.meta)
            _sync(device)
            report = decoder.trace_report(batch)
            decoder.enable_trace(batch, on=False)
        except Exception as exc:
            out.append(dict(batch=batch, error=short_error(exc)))
            continue
        stages = report["stages"]
        summary = per_op_stage_times(report)
        print(f"  b={batch} ctx=1024 span {report['span_us']:.1f} us: " + ", ".join(
            f"{op} {v['stage_us']:.1f} (wait {v['wait_us']:.1f})" for op, v in summary.items()))
        out.append(dict(batch=batch, context=1024, span_us=report["span_us"], per_op=summary, stages=stages))
    return out


def run_sweep(decoder, kv_cache, settings: Settings, bandwidth: float, device: torch.device) -> list[dict]:
    """Tile shapes around the heuristic for every GEMM op at each sweep batch: us per call and GB/s.

    The heuristic's shape goes first in each (batch, op); once settings.sweep_budget_s is spent the remaining
    shapes are recorded as skipped, so the run's length stays bounded on a cold triton cache.
    """
    rows = []
    config, elem = decoder.config, decoder.dtype.itemsize
    started = time.perf_counter()
    print("\ntile sweep (us per call; * = the heuristic's choice):")
    for batch in settings.sweep_batches:
        inputs = step_inputs(batch, 1024, kv_cache.shape[2], config.vocab_size, device, settings.seed + batch)
        for op in GEMV_OPS:
            chosen = decoder.gemv_config(op, batch)
            candidates = [chosen] + [c for c in sweep_candidates(op, batch, config) if c != chosen]
            nbytes = op_bytes(config, op, batch, 1024, elem)
            for cand in candidates:
                row = dict(batch=batch, op=op, config=asdict(cand), heuristic=cand == chosen)
                if time.perf_counter() - started > settings.sweep_budget_s:
                    row["error"] = f"skipped: sweep budget of {settings.sweep_budget_s:.0f} s spent"
                    rows.append(row)
                    continue
                try:
                    fn, calls = op_launcher(decoder, op, kv_cache, inputs, gemv_config=cand)
                    graph, _ = capture_graph(fn, device)
                    us = 1000 * time_graph(graph, settings.trials, settings.replays, device) / calls
                    row.update(us=us, GBps=nbytes / us / 1e3, pct_of_copy=100 * nbytes / us / 1e-6 / bandwidth)
                    del graph
                except Exception as exc:
                    row["error"] = short_error(exc)
                rows.append(row)
                c = cand
                shape = (f"bn={c.block_n:<3} bk={c.block_k:<4} bm={c.block_m:<2} split={c.split_k} "
                         f"dot={int(c.use_dot)} warps={c.num_warps} stages={c.num_stages}")
                mark = "*" if row["heuristic"] else " "
                result = f"{row['us']:8.2f} us {row['pct_of_copy']:5.1f}%" if "us" in row else row["error"][:80]
                print(f" {mark} b={batch:<3} {op:8s} {shape}  {result}", flush=True)
    print(f"  (sweep: {time.perf_counter() - started:.0f} s)")
    print_sweep_summary(sweep_summary(rows, len(decoder.layers)))
    return rows


def sweep_summary(rows: list[dict], num_layers: int) -> list[dict]:
    """Per (batch, op): the heuristic's time, the fastest shape, and the us per decode step between them
    (GEMMs run once per layer, the LM head once)."""
    summary = []
    for batch, op in dict.fromkeys((r["batch"], r["op"]) for r in rows):
        timed = [r for r in rows if r["batch"] == batch and r["op"] == op and "us" in r]
        picked = next((r for r in timed if r["heuristic"]), None)
        if not timed or picked is None:
            continue
        best = min(timed, key=lambda r: r["us"])
        per_step = 1 if op == "lm_head" else num_layers
        summary.append(dict(batch=batch, op=op, heuristic_us=picked["us"], best_us=best["us"], best=best["config"],
                            us_per_step_left=per_step * (picked["us"] - best["us"])))
    return summary


def print_sweep_summary(summary: list[dict]) -> None:
    if not summary:
        return
    print("\nsweep summary (us per call; 'left' = us per decode step the heuristic loses to the best shape):")
    for s in summary:
        b = s["best"]
        shape = f"bn={b['block_n']} bk={b['block_k']} bm={b['block_m']} split={b['split_k']} dot={int(b['use_dot'])}"
        print(f"  b={s['batch']:<3} {s['op']:8s} heuristic {s['heuristic_us']:8.2f}  best {s['best_us']:8.2f} "
              f"({shape}, w{b['num_warps']} s{b['num_stages']})  left {s['us_per_step_left']:6.1f}")
    for batch in dict.fromkeys(s["batch"] for s in summary):
        left = sum(s["us_per_step_left"] for s in summary if s["batch"] == batch)
        print(f"  b={batch:<3} total left: {left:.0f} us per decode step")


def fused_max_batch(cells: list[Cell]) -> int | None:
    """Largest measured batch up to which `fused` beats `torch-graph` at every context of every batch (the
    value for FusedLlamaDecoder.max_batch_size); 0 when it loses at the smallest batch, None when not measured."""
    batches = sorted({c.batch for c in cells})
    best: int | None = None
    for batch in batches:
        pairs = [(c.results.get("fused"), c.results.get("torch-graph")) for c in cells if c.batch == batch]
        if any(f is None or t is None or f.ms is None or t.ms is None for f, t in pairs):
            return best
        if not all(f.ms < t.ms for f, t in pairs):
            return best if best is not None else 0
        best = batch
    return best


def run_hf(cells: list[Cell], report: dict, hf_dict: dict, dtype, device, settings: Settings) -> None:
    by_key = {(c.batch, c.context): c for c in cells}
    started = time.perf_counter()
    print(f"\ntransformers static cache + compile: cells {settings.hf_cells}", flush=True)
    try:
        bench = HFStaticBench(hf_dict, dtype, device, settings.seed)
    except Exception as exc:
        report.setdefault("notes", []).append(f"hf-static: could not build the model: {short_error(exc)}")
        return
    hf_results = []
    for batch, context in settings.hf_cells:
        result = VariantResult()
        if time.perf_counter() - started > settings.hf_budget_s:
            result.error = f"skipped: transformers budget of {settings.hf_budget_s:.0f} s spent"
        else:
            t0 = time.perf_counter()
            try:
                result.ms = bench.ms_per_token(batch, context, settings.hf_new_tokens)
                result.note = f"{time.perf_counter() - t0:.0f} s incl. compile"
            except Exception as exc:  # torch.compile guard failures, recompile limits, OOM: reported, not fatal
                result.error = short_error(exc)
                if "hf-static" not in _TRACED:
                    _TRACED.add("hf-static")
                    traceback.print_exc()
        hf_results.append(dict(batch=batch, context=context, **asdict(result)))
        print(f"  hf-static b={batch} ctx={context}: "
              + (f"{result.ms:.3f} ms/token ({result.note})" if result.ms is not None else result.error), flush=True)
        if (batch, context) in by_key:
            by_key[(batch, context)].results["hf-static"] = result
    report["hf_static"] = hf_results
    report["cells"] = [asdict(c) for c in cells]


# ---- report -------------------------------------------------------------------------------------------------------


def cell_line(cell: Cell) -> str:
    parts = [f"b={cell.batch} ctx={cell.context} floor {cell.floor_ms:.3f}"]
    parts += [f"{name} {r.ms:.3f}" if r.ms is not None else f"{name} ERR" for name, r in cell.results.items()]
    return " | ".join(parts)


def print_table(cells: list[Cell], report: dict, variants: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    mixed = report.get("settings", {}).get("long_seqs", 0)
    lengths = (f" · {mixed} sequence(s) at the context, the others at {report['settings']['short_context']} tokens"
               if mixed else "")
    table = Table(title=f"decode ms/token (% of floor) · {report['device']} · copy {report['copy_bandwidth_TBps']:.2f}"
                        f" TB/s · weights {report['weight_bytes'] / 1e9:.2f} GB{lengths}")
    table.add_column("batch", justify="right")
    table.add_column("context", justify="right")
    table.add_column("floor ms", justify="right")
    for v in variants:
        table.add_column(v, justify="right")
    checked = [v for v in ("fused", "megakernel") if v in variants]
    for v in checked:
        table.add_column(f"{v} vs torch", justify="right")
    for cell in cells:
        row = [str(cell.batch), str(cell.context), f"{cell.floor_ms:.3f}"]
        for v in variants:
            r = cell.results.get(v)
            if r is None:
                row.append("-")
            elif r.ms is None:
                row.append("err" if r.error and not r.error.startswith("skipped") else "skip")
            else:
                row.append(f"{r.ms:.3f} ({100 * cell.floor_ms / r.ms:.0f}%)")
        for v in checked:
            chk = (cell.check or {}).get(v)
            row.append(f"{chk['max_rel_err']:.1e} / {chk['argmax_agree']:.2f}" if chk else "-")
        table.add_row(*row)
    Console(width=200).print(table)
    errors = {(c.batch, c.context, v): r.error for c in cells for v, r in c.results.items() if r.error}
    for (b, ctx, v), err in list(errors.items())[:10]:
        print(f"  error b={b} ctx={ctx} {v}: {err}")
    wins = fused_max_batch(cells)
    if wins is not None:
        print(f"  fused beats torch-graph at every context up to batch {wins} (FusedLlamaDecoder.max_batch_size)")
    for note in report.get("notes", []):
        print(f"  note: {note}")


def register(subparsers) -> None:
    p = subparsers.add_parser("decode", help="decode ms/token vs the memory-bandwidth floor (CUDA)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and one transformers cell (< 4 min on H100)")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--contexts", default="128,1024,4096")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--hf-cells", default=None,
                   help="BATCHxCONTEXT cells for transformers (each compiles); default 1x128 with --quick")
    p.add_argument("--hf-budget-s", type=float, default=240.0, help="stop starting transformers cells after this")
    p.add_argument("--no-breakdown", action="store_true", help="skip the per-kernel breakdown")
    p.add_argument("--sweep", action="store_true", help="also time alternative tile shapes for every GEMM op")
    p.add_argument("--sweep-batches", default="1,4,16", help="batches the tile sweep covers")
    p.add_argument("--sweep-budget-s", type=float, default=150.0,
                   help="stop starting sweep shapes after this (the rest are recorded as skipped)")
    p.add_argument("--shape", default="llama-3.2-1b", choices=["llama-3.2-1b", "tiny"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--long-seqs", type=int, default=0, metavar="N",
                   help="mixed lengths: only the first N sequences of a cell hold its context, the others "
                        "--short-context tokens (0: all hold it)")
    p.add_argument("--short-context", type=int, default=SHORT_CONTEXT, metavar="TOKENS",
                   help="with --long-seqs: the other sequences' tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write JSON results here (and their plot beside it, .png)")
    p.add_argument("--replot", default=None, metavar="JSON",
                   help="only draw the plot of a saved run (to --out, default beside the JSON); no GPU needed")
    p.set_defaults(func=run)
