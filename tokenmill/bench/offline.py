"""`tokenmill bench offline`: the engine against Hugging Face transformers (and optionally llama.cpp's llama-server)
on the same weights, prompts and lengths, in one run.

Measures single-stream TTFT and decode speed, aggregate throughput at a given concurrency, and on CUDA the batch-1
step time against the memory-bandwidth floor (weights bytes / measured copy bandwidth).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

CHAT_PROMPT = "Explain in a few sentences why the sky is blue, as you would to a curious child."


@dataclass
class StreamResult:
    ttft_s: float
    decode_tok_s: float  # tokens after the first / time after the first
    ms_per_token: float


@dataclass
class SystemResult:
    name: str
    single: StreamResult | None = None
    aggregate_tok_s: float | None = None
    aggregate_batch: int = 0
    extra: dict = field(default_factory=dict)


# ---- tokenmill ---------------------------------------------------------------------------------------------------

def bench_engine(engine, prompt_ids: list[int], output_len: int, concurrency: int, repeats: int,
                 temperature: float = 0.0, min_tokens: int = 0) -> SystemResult:
    from tokenmill.sampling_params import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=output_len, ignore_eos=True,
                            min_tokens=min(min_tokens, output_len))
    res = SystemResult("tokenmill")
    # warm-up (allocator, kernels, CUDA graphs are already captured)
    engine.generate_blocking([prompt_ids], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    singles = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        engine.add_request(prompt_ids, params)
        first = None
        n = 0
        while engine.has_unfinished_requests():
            outs = engine.step()
            if outs:
                if first is None:  # the token is on the host (with async scheduling the next step already runs)
                    first = time.perf_counter()
                n = len(outs[-1].outputs[0].token_ids)
        _sync(engine.device)
        end = time.perf_counter()
        singles.append(StreamResult(first - t0, (n - 1) / (end - first), 1000 * (end - first) / (n - 1)))
    res.single = _median_stream(singles)
    # aggregate: `concurrency` requests at once
    t0 = time.perf_counter()
    outs = engine.generate_blocking([prompt_ids] * concurrency, params)
    _sync(engine.device)
    dt = time.perf_counter() - t0
    res.aggregate_tok_s = sum(len(o.outputs[0].token_ids) for o in outs) / dt
    res.aggregate_batch = concurrency
    return res


def _median_stream(runs: list[StreamResult]) -> StreamResult:
    return StreamResult(
        statistics.median(r.ttft_s for r in runs),
        statistics.median(r.decode_tok_s for r in runs),
        statistics.median(r.ms_per_token for r in runs),
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- Hugging Face transformers ------------------------------------------------------------------------------------

def load_hf(source, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    if source.kind == "gguf":
        model = _load_hf_from_gguf(Path(source.path)).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    return model.to(device).eval()


def _load_hf_from_gguf(path: Path):
    """transformers' own GGUF import (its dequantization and Q/K un-permutation), without the `accelerate` package
    that `from_pretrained(gguf_file=...)` requires."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.for_model(**load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    with no_init_weights():  # every weight is loaded next
        model = AutoModelForCausalLM.from_config(config).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not set(missing) <= {"lm_head.weight"}:
        raise ValueError(f"transformers' GGUF import left {sorted(missing)[:4]} unfilled, {sorted(unexpected)[:4]} unused")
    model.tie_weights()
    return model


@torch.inference_mode()
def bench_hf(model, prompt_ids: list[int], output_len: int, concurrency: int, repeats: int,
             device: torch.device, compile_static: bool) -> SystemResult:
    name = "transformers" + (" static cache+compile" if compile_static else "")
    res = SystemResult(name)
    kwargs = dict(do_sample=False, pad_token_id=0)
    if compile_static:
        # transformers compiles the decoding forward by itself when the cache is static.
        kwargs.update(cache_implementation="static")
    ids = torch.tensor([prompt_ids], device=device)

    def run(batch_ids, n):
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(batch_ids, attention_mask=torch.ones_like(batch_ids), max_new_tokens=n,
                             min_new_tokens=n, **kwargs)
        _sync(device)
        return time.perf_counter() - t0, out.shape[1] - batch_ids.shape[1]

    run(ids, 4)  # warm-up
    if compile_static:  # compile for both lengths used below
        run(ids, output_len)
        run(ids, 1)
    singles = []
    for _ in range(repeats):
        t1, _ = run(ids, 1)
        tn, n = run(ids, output_len)
        singles.append(StreamResult(t1, (n - 1) / (tn - t1), 1000 * (tn - t1) / (n - 1)))
    res.single = _median_stream(singles)
    batch = ids.repeat(concurrency, 1)
    dt, n = run(batch, output_len)
    res.aggregate_tok_s = concurrency * n / dt
    res.aggregate_batch = concurrency
    return res


# ---- llama.cpp's llama-server ---------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServerExited(RuntimeError):
    """llama-server died (at startup or while serving)."""


@contextlib.contextmanager
def llama_server(binary: str, gguf: str, slots: int, ctx: int, threads: int, extra_args: tuple[str, ...] = ()):
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots), "-c", str(ctx * slots),
         "-t", str(threads), "--no-webui", *extra_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    import httpx

    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise LlamaServerExited(f"llama-server exited with {proc.returncode}")
            time.sleep(0.5)
        try:
            yield url
        except Exception as exc:
            time.sleep(0.5)  # a crash shows up as a dropped connection first
            if proc.poll() is not None:
                raise LlamaServerExited(f"llama-server exited with {proc.returncode} while serving") from exc
            raise
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def bench_llama_server(binary: str, gguf: str, prompt_ids: list[int], output_len: int, concurrency: int,
                       slots: int, repeats: int) -> SystemResult:
    import asyncio

    import httpx

    res = SystemResult(f"llama.cpp llama-server ({slots} slots)")
    body = {"prompt": prompt_ids, "n_predict": output_len, "temperature": 0, "ignore_eos": True,
            "cache_prompt": False, "stream": True}

    async def one(client: httpx.AsyncClient, url: str) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first = None
        n = 0
        async with client.stream("POST", url + "/completion", json=body, timeout=600) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    chunk = json.loads(line[6:])
                    if chunk.get("stop"):
                        n = chunk.get("tokens_predicted", n)
                        continue
                    first = first or time.perf_counter()
                    n += 1
        return first - t0, time.perf_counter() - first, n

    async def main(url: str) -> None:
        # A fresh connection per request: llama-server may close an idle kept-alive connection just as the next
        # request reuses it ("Server disconnected without sending a response").
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as client:
            await one(client, url)  # warm-up
            singles = []
            for _ in range(repeats):
                ttft, rest, n = await one(client, url)
                singles.append(StreamResult(ttft, (n - 1) / rest, 1000 * rest / (n - 1)))
            res.single = _median_stream(singles)
            t0 = time.perf_counter()
            results = await asyncio.gather(*(one(client, url) for _ in range(concurrency)))
            res.aggregate_tok_s = sum(r[2] for r in results) / (time.perf_counter() - t0)
            res.aggregate_batch = concurrency

    ctx = len(prompt_ids) + output_len + 64
    # Native builds may crash in their repacked AVX512/AMX weight kernels (SIGILL or SIGSEGV at startup or on the
    # first request on the 2-core CI VM); then the server runs without repacking, and the result records it.
    for extra_args in ((), ("--no-repack",)):
        try:
            with llama_server(binary, gguf, slots, ctx=ctx, threads=os.cpu_count() or 2, extra_args=extra_args) as url:
                asyncio.run(main(url))
        except LlamaServerExited as exc:
            res.extra.setdefault("crashes", []).append(f"{' '.join(extra_args) or 'default'}: {exc}")
            continue
        res.extra["extra_args"] = list(extra_args)
        return res
    raise LlamaServerExited(f"llama-server kept crashing: {res.extra['crashes']}")


# ---- GPU floor ------------------------------------------------------------------------------------------------------

def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    iters = 20
    start.record()
    for _ in range(iters):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    return 2 * src.numel() * iters / (start.elapsed_time(end) / 1000)


def make_random_llama_dir(shape: str, dtype: torch.dtype) -> Path:
    """A Hugging Face folder with random weights in a known shape (so every system loads identical weights)."""
    from tokenmill.models.random_weights import make_random_model_dir

    out = Path(tempfile.mkdtemp(prefix=f"tokenmill-{shape}-"))
    return make_random_model_dir(out, shape, dtype, device="cuda" if torch.cuda.is_available() else "cpu")


# ---- report ---------------------------------------------------------------------------------------------------------

def print_table(results: list[SystemResult], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    base = results[0]
    table = Table(title=title)
    for col in ("system", "TTFT ms", "decode tok/s", "ms/token", "aggregate tok/s", "× (single)", "× (aggregate)"):
        table.add_column(col, justify="right")
    for r in results:
        s = r.single
        table.add_row(
            r.name,
            f"{s.ttft_s * 1000:.1f}" if s else "-",
            f"{s.decode_tok_s:.1f}" if s else "-",
            f"{s.ms_per_token:.3f}" if s else "-",
            f"{r.aggregate_tok_s:.1f} (b={r.aggregate_batch})" if r.aggregate_tok_s else "-",
            f"{base.single.decode_tok_s / s.decode_tok_s:.2f}" if s and base.single else "-",
            f"{base.aggregate_tok_s / r.aggregate_tok_s:.2f}" if r.aggregate_tok_s and base.aggregate_tok_s else "-",
        )
    Console().print(table)
    print("× columns: tokenmill's figure divided by that system's (higher is better for tokenmill)")


def run(args: argparse.Namespace) -> int:
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.llm import make_engine_config
    from tokenmill.models.hub import resolve_model

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = args.model
    if args.random_shape:
        model = str(make_random_llama_dir(args.random_shape, dtype))
    source = resolve_model(model)
    # The engine resolves "auto" itself (on CPU a quantized GGUF runs int4/int8 weights in bf16); the peers get
    # dtype_name (fp32 on CPU, as transformers is usually run there).
    config = make_engine_config(
        model, dtype=args.dtype, quantization=args.quantization, device=str(device),
        max_num_seqs=max(args.concurrency, 1),
        max_num_batched_tokens=max(2048, args.concurrency), max_model_len=args.max_model_len,
        enable_prefix_caching=False,  # every repeat pays its full prefill, as llama-server does with cache_prompt off
        decode_backend=args.decode_backend, megakernel_short_context=args.megakernel_short_context,
        async_scheduling=args.async_scheduling, cudagraph_mode=args.cudagraph_mode,
        fused_sampling=args.fused_sampling,
    )
    engine = LLMEngine(config)
    tok = engine.tokenizer
    if args.random_shape:
        vocab = engine.model_config.vocab_size
        prompt_ids = torch.randint(3, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        prompt_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}]),
                                add_special_tokens=False)
    results = [bench_engine(engine, prompt_ids, args.output_len, args.concurrency, args.repeats, args.temperature,
                            args.min_tokens)]
    results[0].name = f"tokenmill ({args.decode_backend}{', async' if engine.async_scheduling else ''})"
    report: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": _machine(device),
        "model": str(source.path) if not args.random_shape else f"random {args.random_shape}",
        "dtype": dtype_name,
        "engine_dtype": str(engine.dtype).removeprefix("torch."),
        "engine_quantization": engine.quantization,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "prompt_tokens": len(prompt_ids),
        "output_tokens": args.output_len,
        "concurrency": args.concurrency,
        "async_scheduling": engine.async_scheduling,
        "cudagraph_mode": args.cudagraph_mode if device.type == "cuda" else "none",
        "temperature": args.temperature,
        "min_tokens": args.min_tokens,
        "fused_sampling": engine.sampler.fused_race,
    }
    if device.type == "cuda":
        bw = measure_copy_bandwidth(device)
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        floor_ms = 1000 * weight_bytes / bw
        report.update(copy_bandwidth_TBps=bw / 1e12, weight_bytes=weight_bytes, floor_ms_per_token=floor_ms,
                      engine_fraction_of_floor=floor_ms / results[0].single.ms_per_token)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print_table(results, "tokenmill alone")
    peers = []
    if not args.no_hf:
        peers.append(lambda: bench_hf(load_hf(source, dtype, device), prompt_ids, args.output_len, args.concurrency,
                                      args.repeats, device, False))
        if device.type == "cuda" and not args.no_compile:
            peers.append(lambda: bench_hf(load_hf(source, dtype, device), prompt_ids, args.output_len, 1,
                                          args.repeats, device, True))
    if args.llama_server:
        if source.kind != "gguf":
            raise ValueError("--llama-server needs a GGUF model")
        peers.append(lambda: bench_llama_server(args.llama_server, str(source.path), prompt_ids, args.output_len,
                                                args.concurrency, args.llama_slots, args.repeats))
    for peer in peers:
        try:
            results.append(peer())
        except Exception as exc:  # a peer that fails is reported, not fatal: our numbers still stand
            print(f"peer failed: {exc!r}")
            report.setdefault("peer_errors", []).append(repr(exc))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(results, f"bench offline · {report['model']} · {report['machine']}")
    if device.type == "cuda":
        print(f"copy bandwidth {report['copy_bandwidth_TBps']:.2f} TB/s → batch-1 floor "
              f"{report['floor_ms_per_token']:.3f} ms/token; tokenmill at "
              f"{100 * report['engine_fraction_of_floor']:.0f}% of the floor")
    report["results"] = [asdict(r) for r in results]
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    if args.random_shape:
        shutil.rmtree(source.path, ignore_errors=True)
    return 0


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} × {os.cpu_count()} cores"


def register(subparsers) -> None:
    from tokenmill.config import ASYNC_SCHEDULING_CHOICES, CUDAGRAPH_MODES, EngineConfig

    p = subparsers.add_parser("offline", help="engine vs transformers (and llama.cpp) on the same model")
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--random-shape", choices=["llama-3.2-1b", "tiny"], default=None,
                   help="benchmark random weights of this shape instead of a model")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="the engine's weight quantization (auto: int4/int8 for a quantized GGUF on CPU)")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length for --random-shape")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--decode-backend", default="auto", choices=["auto", "torch", "triton", "fused", "megakernel"])
    p.add_argument("--megakernel-short-context", type=int, default=EngineConfig.megakernel_short_context,
                   metavar="TOKENS", help="with --decode-backend megakernel: it also takes batches up to 16 while "
                                          "no sequence is longer (0: off; default: the card's, as serve)")
    p.add_argument("--async-scheduling", default="auto", choices=ASYNC_SCHEDULING_CHOICES,
                   help="the engine's async scheduling (auto: on for CUDA)")
    p.add_argument("--cudagraph-mode", default=EngineConfig.cudagraph_mode, choices=CUDAGRAPH_MODES,
                   help="the engine's CUDA graphs: whole decode steps, and prompt chunks piece by piece")
    p.add_argument("--temperature", type=float, default=0.0, help="tokenmill's sampling temperature (0: greedy)")
    p.add_argument("--min-tokens", type=int, default=0, help="tokenmill's min_tokens (EOS forbidden until then)")
    p.add_argument("--fused-sampling", action=argparse.BooleanOptionalAction, default=True,
                   help="on a GPU, greedy and temperature rows in one fused path (--no-fused-sampling: torch ops)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--no-compile", action="store_true", help="skip transformers static cache + torch.compile")
    p.add_argument("--llama-server", default=None, help="path to llama.cpp's llama-server binary")
    p.add_argument("--llama-slots", type=int, default=4)
    p.add_argument("--output", default=None, help="write JSON results here")
    p.set_defaults(func=run)
