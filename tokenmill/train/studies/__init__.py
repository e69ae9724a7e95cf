"""Parcae studies: the learning-rate stability sweep (lr_sweep), quality per parameter and vs test-time loops (quality),
and their plots (plots). `run_many` trains a list of runs back to back or in parallel worker processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tokenmill.train.trainer import TrainConfig


def _train_worker(cfg_dict: dict[str, Any], threads: int) -> dict[str, Any]:
    import torch

    from tokenmill.train.trainer import train

    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig.from_dict(cfg_dict)
    try:
        return train(cfg).to_dict()
    except Exception as e:  # noqa: BLE001 - a crashed run is a result of the study, not the end of it
        return {
            "status": "error",
            "reason": f"{type(e).__name__}: {e}",
            "run_name": cfg.run_name,
            "out_dir": cfg.out_dir,
        }


def completed_summary(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / "summary.json"
    return json.loads(path.read_text()) if path.exists() else None


def run_many(
    configs: list[TrainConfig],
    jobs: int = 1,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    reuse: bool = True,
) -> list[dict[str, Any]]:
    """Trains every config (results in the same order). With jobs > 1 each run gets its own spawned process (CUDA-
    safe), so several small runs share one GPU. A run whose folder already has summary.json is reused when `reuse`;
    an unfinished folder is cleared and trained again."""
    results: list[dict[str, Any] | None] = [None] * len(configs)
    todo = []
    for i, cfg in enumerate(configs):
        done = completed_summary(cfg.out_dir) if reuse else None
        if done is not None:
            results[i] = done
            if on_result:
                on_result(done)
            continue
        if Path(cfg.out_dir).exists():
            shutil.rmtree(cfg.out_dir)
        todo.append(i)
    threads = max(1, (os.cpu_count() or 1) // max(1, jobs)) if jobs > 1 else 0
    if jobs <= 1:
        for i in todo:
            results[i] = _train_worker(configs[i].to_dict(), threads)
            if on_result:
                on_result(results[i])
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(_train_worker, configs[i].to_dict(), threads): i for i in todo}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if on_result:
                    on_result(results[futures[future]])
    return [r for r in results if r is not None]
