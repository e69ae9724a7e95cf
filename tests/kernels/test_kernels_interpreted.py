"""Runs the Triton kernel tests in Triton's CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is imported, so the kernel tests run in a subprocess: the rest of
the suite keeps a normally imported triton.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
REPO_ROOT = Path(__file__).resolve().parents[2]
GROUPS = {
    "attention": [HERE / "test_attention_kernels.py"],
    "fused_decode": [HERE / "test_fused_decode_kernels.py", HERE / "test_fused_decode_model.py"],
    "piecewise": [HERE.parent / "models" / "test_piecewise.py", "-k", "whole_steps"],
    "sample": [HERE / "test_sample_kernel.py"],
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernel tests run directly")
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"), reason="already interpreting: tests run directly"
)
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_triton_kernels_under_the_interpreter(group):
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *map(str, GROUPS[group])],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"interpreted {group} tests failed:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-2000:]
