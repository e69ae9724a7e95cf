"""GPU smoke tests (skipped without CUDA): bf16 autocast training, and several runs sharing one GPU."""

from __future__ import annotations

import math

import pytest
import torch

from tests.train.test_trainer import tiny_cfg
from tokenmill.train.studies import run_many
from tokenmill.train.trainer import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("injection", ["parcae", "linear", "additive"])
def test_bf16_training_on_cuda(tiny_dataset, tmp_path, injection):
    cfg = tiny_cfg(tiny_dataset, tmp_path / injection, device="cuda", steps=30)
    cfg.model.injection = injection
    result = train(cfg)
    assert result.status == "completed" and math.isfinite(result.val_loss) and result.val_loss < math.log(320)


def test_parallel_runs_share_the_gpu(tiny_dataset, tmp_path):
    configs = [tiny_cfg(tiny_dataset, tmp_path / f"r{i}", device="cuda", steps=10, eval_every=0) for i in range(3)]
    results = run_many(configs, jobs=3)
    assert [r["status"] for r in results] == ["completed"] * 3
