"""How many intra-op threads torch gets on CPU.

Offline (LLM, benchmarks): every core the process may use; torch's default.

Serving: the engine thread shares the process with the HTTP event loop (request parsing, tokenization, one SSE chunk
per request per step) and with its GIL. torch's OpenMP workers spin while they wait for each other, so a worker
preempted by another thread stalls every parallel region until it runs again (on the shared 2-core CI VM, with one
other busy process, a 2-thread decode step went from 18 ms to over a second). One core is left to the event loop:
there `tokenmill serve` with SmolLM2 streamed ~36 tok/s single-stream and ~360 tok/s at 32 concurrent requests
with 1 thread, against ~28 and ~345 with 2 (load average ~1.4; the offline engine alone is faster with 2).
An explicit OMP_NUM_THREADS (or a thread count passed as `requested`) wins.

Serving from the engine's own process (engine_process.py, the default of `tokenmill serve`): the HTTP side is another
process that mostly waits on sockets, and the engine takes every core. On the 2-core VM with SmolLM2 (chat,
`sessions=8,rate=2,scale=0.25`, alternated twice): TPOT p50 134 / 123 ms with 1 thread, 29 / 33 ms with 2; output
29 / 29 tok/s against 65 / 58.
"""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def serving_threads(device: torch.device, requested: int | None = None, shares_process: bool = True) -> int | None:
    """Intra-op threads for an engine behind an HTTP server: one core left to the event loop where the engine
    shares its process, every core where it has a process of its own. None leaves torch's setting alone (CUDA, or
    the user chose through OMP_NUM_THREADS)."""
    if device.type != "cpu":
        return None
    if requested is not None:
        if requested < 1:
            raise ValueError(f"thread count must be >= 1, got {requested}")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, usable_cores() - 1) if shares_process else usable_cores()


def apply_threads(threads: int | None) -> None:
    """Sets torch's intra-op thread count (process-wide; call it from the thread that runs the engine too)."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
