"""tokenmill command line: serve | chat | generate | bench | train."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable

from tokenmill.config import (
    ASYNC_SCHEDULING_CHOICES,
    CUDAGRAPH_MODES,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    batch_limits,
)
from tokenmill.plotting import PlottingUnavailable


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'2GiB', '512MB', '1.5g', '1073741824' → bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 2GiB, 512MiB or a number of bytes)")
    return int(float(m.group(1)) * _UNITS[unit])


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, Hugging Face folder or hub id (default: SmolLM2-135M-Instruct)")
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer source if not the model's own")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="weight-only quantization (CPU). auto: int4/int8 for a quantized GGUF on CPU when --dtype is "
                        "auto (computing in bf16), else none")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=None, help="most sequences in one batch")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget of one step")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument("--kv-cache-memory", type=parse_size, default=None,
                   help="KV cache size, e.g. 2GiB (CPU default: up to 2GiB)")
    g.add_argument("--num-gpu-blocks-override", "--num-kv-blocks", dest="num_blocks", type=int, default=None)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--decode-backend", default="auto", choices=["auto", "torch", "triton", "fused", "megakernel"],
                   help="torch|triton: the model with that attention; fused: fused Triton kernels for decode "
                        "steps; megakernel: one persistent CUDA kernel per decode step (sm_90 GPUs, bf16 Llama). "
                        "fused and megakernel fall back (megakernel -> fused -> model) where they do not apply; "
                        "auto (default): on a GPU the megakernel and fused kernels where they apply, quietly, else "
                        "the model with the best attention")
    g.add_argument("--megakernel-max-batch", type=int, default=EngineConfig.megakernel_max_batch, metavar="N",
                   help="with --decode-backend megakernel: its largest decode batch at any context; larger ones run "
                        "the fused kernels (default 8: up to where it beat them on the H100)")
    g.add_argument("--megakernel-short-context-batch", type=int,
                   default=EngineConfig.megakernel_short_context_batch, metavar="N",
                   help="with --decode-backend megakernel: also run it up to this batch while no sequence is longer "
                        "than --megakernel-short-context (default 16)")
    g.add_argument("--megakernel-short-context", type=int, default=EngineConfig.megakernel_short_context,
                   metavar="TOKENS", help="see --megakernel-short-context-batch; 0: off (default by card: 4096 on "
                                          "H200s, where it beat the fused kernels by 6 %% or more up to 4k; 1536 "
                                          "elsewhere: on the H100 it won at 1k and lost at 4k)")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (--cudagraph-mode none)")
    g.add_argument("--cudagraph-mode", choices=CUDAGRAPH_MODES, default="full_and_piecewise",
                   help="CUDA graphs for decode steps (full) and, piece by piece around attention, for steps with "
                        "prompt chunks (piecewise)")
    g.add_argument("--async-scheduling", choices=ASYNC_SCHEDULING_CHOICES, default="auto",
                   help="plan and launch each step before the previous step's tokens reach the host, overlapping "
                        "the host's work with the GPU's (auto, the default: on for CUDA devices)")
    g.add_argument("--parcae-recurrence", type=int, default=None, metavar="T",
                   help="Parcae looped models: loops to serve at (default: the model's mean recurrence)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    import torch

    on_gpu = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    max_num_seqs, max_num_batched_tokens = batch_limits(on_gpu, args.max_num_seqs, args.max_num_batched_tokens,
                                                        cpu_defaults=(64, 512))
    sched = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=args.max_model_len or 1 << 30,  # clamped to the model's length by the engine
    )
    cache = CacheConfig(
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    return EngineConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        served_model_name=getattr(args, "served_model_name", None),
        dtype=args.dtype,
        quantization=args.quantization,
        device=args.device,
        seed=args.seed,
        decode_backend=args.decode_backend,
        megakernel_max_batch=getattr(args, "megakernel_max_batch", EngineConfig.megakernel_max_batch),
        megakernel_short_context_batch=getattr(args, "megakernel_short_context_batch",
                                               EngineConfig.megakernel_short_context_batch),
        megakernel_short_context=getattr(args, "megakernel_short_context", EngineConfig.megakernel_short_context),
        enforce_eager=args.enforce_eager,
        cudagraph_mode=getattr(args, "cudagraph_mode", "full_and_piecewise"),
        async_scheduling=getattr(args, "async_scheduling", "auto"),
        parcae_recurrence=getattr(args, "parcae_recurrence", None),
        cache=cache,
        scheduler=sched,
    )


# ---- serve -------------------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)  # settings are checked before the server's imports (uvicorn, FastAPI)
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.serve.launch import run_server, run_servers

    if args.api_server_count > 1 and not args.engine_process:
        raise CLIError("--api-server-count > 1 needs the engine in its own process (drop --no-engine-process)")
    engine = AsyncEngine.from_config(config, engine_process=args.engine_process, front_ends=args.api_server_count)
    try:
        _check_max_model_len(args, engine.max_model_len)
        if args.api_server_count == 1:
            run_server(engine, host=args.host, port=args.port, api_key=args.api_key, log_level=args.log_level)
        else:
            try:
                run_servers(engine, args.api_server_count, host=args.host, port=args.port, api_key=args.api_key,
                            log_level=args.log_level)
            except OSError as exc:
                raise CLIError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    finally:
        engine.shutdown()
    return 0


def _check_max_model_len(args: argparse.Namespace, max_model_len: int) -> None:
    """The engine clamps max_model_len to the model's; one asked for on the command line must not shrink silently."""
    if args.max_model_len is not None and args.max_model_len > max_model_len:
        raise CLIError(f"--max-model-len {args.max_model_len} is larger than the model's context length "
                       f"({max_model_len} tokens)")


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def _port(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port (1-65535): {text!r}")
    return int(text)


# ---- generate and chat -------------------------------------------------------------------------------------------

def _sampling_from_args(args: argparse.Namespace):
    from tokenmill.sampling_params import SamplingParams

    return SamplingParams(
        n=getattr(args, "n", 1),
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
        max_tokens=args.max_tokens,
        stop=args.stop or [],
        state_seed=getattr(args, "state_seed", None),
    )


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=temperature)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--state-seed", type=int, default=None,
                   help="Parcae looped models: seed of the initial loop state (default: --seed)")


def _stream_one(engine, prompt_ids: list[int], params, write: Callable[[str], None]) -> str:
    request_id = engine.add_request(prompt_ids, params)
    printed = 0
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != request_id:
                continue
            text = out.outputs[0].text
            write(text[printed:])
            printed = len(text)
            if out.error:
                raise CLIError(out.error)
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill.engine.engine import LLMEngine

    params = _sampling_from_args(args)
    engine = LLMEngine(engine_config_from_args(args))
    _check_max_model_len(args, engine.max_model_len)
    tok = engine.tokenizer
    if args.chat:
        prompt_ids = tok.encode(
            tok.apply_chat_template([{"role": "user", "content": args.prompt}]), add_special_tokens=False
        )
    else:
        prompt_ids = tok.encode(args.prompt)
    if params.n == 1:
        _stream_one(engine, prompt_ids, params, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
    else:
        (out,) = engine.generate_blocking([prompt_ids], params)
        for c in out.outputs:
            print(f"--- [{c.index}] ({c.finish_reason})\n{c.text}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tokenmill.engine.engine import LLMEngine

    params = _sampling_from_args(args)
    engine = LLMEngine(engine_config_from_args(args))
    _check_max_model_len(args, engine.max_model_len)
    tok = engine.tokenizer
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print(f"tokenmill chat · {engine.config.served_model_name} · Ctrl-D or /exit to leave, /reset to start over")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt_ids = tok.encode(tok.apply_chat_template(messages), add_special_tokens=False)
        if len(prompt_ids) >= engine.max_model_len:
            print("[the conversation no longer fits the context; /reset to start over]")
            messages.pop()
            continue
        params.max_tokens = min(args.max_tokens, engine.max_model_len - len(prompt_ids))
        reply = _stream_one(engine, prompt_ids, params, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": reply})


# ---- parser ------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="tokenmill LLM inference engine")
    parser.add_argument("--version", action="version", version=f"tokenmill {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="step the engine in a process of its own, so HTTP handling and streaming do not share "
                        "its GIL (default; --no-engine-process: on a thread of the server's process)")
    p.add_argument("--api-server-count", type=_positive_int, default=1,
                   help="HTTP server processes sharing the port and the engine (as vLLM's flag): one Python process "
                        "streams ~10-15k tok/s at most, less than a GPU decodes at high concurrency")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate from one prompt, streaming to stdout")
    add_engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--n", type=int, default=1)
    _add_sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive streaming chat")
    add_engine_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(p, temperature=0.7)
    p.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    for register in _optional_registrations("bench"):
        register(bench_sub)
    for register in _optional_registrations("top"):
        register(sub)
    return parser


def _optional_registrations(where: str) -> list[Callable]:
    """Subcommands that live next to their code (bench offline/serve/decode, train)."""
    import importlib

    modules = {
        "bench": ["tokenmill.bench.offline", "tokenmill.bench.serve_client", "tokenmill.bench.decode",
                  "tokenmill.bench.megakernel_ab"],
        "top": ["tokenmill.train.cli"],
    }[where]
    found = []
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("tokenmill"):
                continue
            raise
        found.append(module.register)
    return found


def _version() -> str:
    from tokenmill import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, PlottingUnavailable) as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
