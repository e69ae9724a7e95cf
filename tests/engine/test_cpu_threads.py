"""The CPU thread policy: offline engines keep torch's threads; a serving engine leaves a core to the event loop
where it shares the server's process and takes them all in a process of its own."""

from __future__ import annotations

import pytest
import torch

from tokenmill.engine import cpu_threads
from tokenmill.engine.cpu_threads import serving_threads


def test_serving_leaves_one_core_to_the_event_loop(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = torch.device("cpu")
    for cores, expected in ((1, 1), (2, 1), (8, 7)):
        monkeypatch.setattr(cpu_threads, "usable_cores", lambda cores=cores: cores)
        assert serving_threads(cpu) == expected
        assert serving_threads(cpu, shares_process=False) == cores  # the engine in a process of its own
    assert serving_threads(cpu, requested=3) == 3
    assert serving_threads(torch.device("cuda")) is None


def test_an_explicit_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert serving_threads(torch.device("cpu")) is None
    with pytest.raises(ValueError, match=">= 1"):
        serving_threads(torch.device("cpu"), requested=0)


def test_async_engine_sets_and_restores_threads(tiny_model_dir, monkeypatch):
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.llm import make_engine_config

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 3)
    before = torch.get_num_threads()
    engine = AsyncEngine.from_config(make_engine_config(str(tiny_model_dir), device="cpu", max_model_len=64))
    try:
        assert torch.get_num_threads() == 2
    finally:
        engine.shutdown()
    assert torch.get_num_threads() == before
