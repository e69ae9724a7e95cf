"""What the HTTP server's own process spends per streamed token (Linux: reads /proc).

Starts `tokenmill serve MODEL` (by default a tiny random Llama, whose engine steps cost next to nothing, so the server
is the busy part), streams C completions of T tokens each at once from a lean asyncio client (raw HTTP/1.1, so the
client takes little of the machine), and reports the CPU time of the server's process and of its engine process
per output token, the output tok/s and the tokens per SSE chunk. Rounds alternate nothing: run it twice to see
the noise.

    python scripts/server_cost.py [MODEL] --streams 64 --tokens 400 --rounds 3 --out server_cost.json

MODEL must take token-id prompts below its vocabulary size (`--vocab`, default 500).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from tokenmill.serve.testing import ServerProcess

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(c) for c in text)
    return found


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process onto these CPUs."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


async def stream_one(port: int, body: bytes) -> tuple[int, int]:
    """One streamed completion over its own connection: (completion tokens from the usage chunk, SSE events)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"server answered {status!r}: {await reader.read(2000)!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    data = await reader.read()  # the whole chunked body (the server closes: Connection: close)
    writer.close()
    events = data.count(b"data: ")
    last_json = data[data.rfind(b"data: {"):]
    usage = json.loads(last_json[6:last_json.index(b"\r\n")].split(b"\n")[0])["usage"]
    return usage["completion_tokens"], events


async def one_round(port: int, streams: int, tokens: int, prompt_len: int, vocab: int, seed: int) -> dict:
    bodies = []
    for i in range(streams):
        prompt = [(seed * 7919 + i * 31 + j * 17) % (vocab - 2) + 2 for j in range(prompt_len)]
        bodies.append(json.dumps({"prompt": prompt, "max_tokens": tokens, "stream": True, "ignore_eos": True,
                                  "temperature": 1.0, "stream_options": {"include_usage": True}}).encode())
    t0 = time.perf_counter()
    results = await asyncio.gather(*(stream_one(port, b) for b in bodies))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": sum(r[0] for r in results), "events": sum(r[1] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="default: a tiny random Llama made in a temporary directory")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=400, help="output tokens per stream")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=500, help="prompt ids are drawn below this")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--serve-arg", action="append", default=[], help="passed to tokenmill serve (repeatable)")
    ap.add_argument("--pin", action="store_true",
                    help="the server's process on CPU 0, its engine and this client on the others (steadier numbers "
                         "on a small machine)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import torch

            from tokenmill.models.random_weights import make_random_model_dir

            model = str(make_random_model_dir(Path(tmp) / "tiny", "tiny", torch.float32))
        rows = []
        serve_args = ["--max-num-seqs", str(args.streams), *args.serve_arg]
        with ServerProcess(model, serve_args, start_timeout_s=300) as server:
            port, engine_pids = server.port, children(server.process.pid)
            if args.pin:
                others = set(range(1, os.cpu_count() or 2)) or {0}
                pin(server.process.pid, {0})
                for p in engine_pids:
                    pin(p, others)
                os.sched_setaffinity(0, others)
            asyncio.run(one_round(port, min(8, args.streams), 32, args.prompt_len, args.vocab, 0))  # warm-up
            for r in range(args.rounds):
                before = (cpu_seconds(server.process.pid), sum(sum(cpu_seconds(p)) for p in engine_pids))
                res = asyncio.run(one_round(port, args.streams, args.tokens, args.prompt_len, args.vocab, r + 1))
                after = (cpu_seconds(server.process.pid), sum(sum(cpu_seconds(p)) for p in engine_pids))
                user, system = (1e6 * (a - b) / res["tokens"] for a, b in zip(after[0], before[0]))
                res["server_us_per_token"] = user + system
                res["server_system_us_per_token"] = system
                res["engine_us_per_token"] = 1e6 * (after[1] - before[1]) / res["tokens"]
                res["tok_s"] = res["tokens"] / res["wall_s"]
                res["tokens_per_event"] = res["tokens"] / max(1, res["events"])
                rows.append(res)
                print(f"round {r}: {res['tokens']} tokens in {res['wall_s']:.2f} s ({res['tok_s']:,.0f} tok/s), "
                      f"server {res['server_us_per_token']:.1f} us/token "
                      f"({res['server_system_us_per_token']:.1f} in the kernel), "
                      f"engine {res['engine_us_per_token']:.1f} us/token, "
                      f"{res['tokens_per_event']:.2f} tokens per SSE event", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"model": args.model or "tiny random", "streams": args.streams,
                                        "tokens": args.tokens, "serve_args": args.serve_arg,
                                        "date": time.strftime("%Y-%m-%d"), "rounds": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
