from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tokenmill.kernels import AttentionBackend, get_attention_backend

HAS_REFERENCE = importlib.util.find_spec("tokenmill.layers.attention") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.mark.parametrize("setting,expected", [(None, "1"), ("0", "0")])
def test_triton_kernels_pin_fp_fusion_unless_the_environment_says(setting, expected):
    # Triton 3.10 turns FP fusion off by default; importing our Triton kernels keeps it on (the numerics they were
    # measured with) without overriding a user's explicit choice. A fresh interpreter: the pin happens at import.
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_DEFAULT_FP_FUSION"}
    if setting is not None:
        env["TRITON_DEFAULT_FP_FUSION"] = setting
    code = "import os, tokenmill.kernels.triton; print(os.environ['TRITON_DEFAULT_FP_FUSION'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == expected


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("flash", "cpu")


@pytest.mark.skipif(INTERPRETING, reason="the interpreter runs Triton kernels on CPU")
def test_triton_backend_refuses_cpu_without_the_interpreter():
    with pytest.raises(ValueError, match="CUDA"):
        get_attention_backend("triton", "cpu")


@pytest.mark.skipif(not HAS_REFERENCE, reason="tokenmill.layers.attention is not written yet")
def test_auto_on_cpu_is_the_torch_reference():
    from tokenmill.layers.attention import paged_attention

    backend = get_attention_backend("auto", torch.device("cpu"))
    assert isinstance(backend, AttentionBackend)
    assert backend.name == "torch"
    assert backend.attention is paged_attention
    assert not backend.supports_cuda_graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_auto_on_cuda_is_triton_and_graph_capturable():
    backend = get_attention_backend("auto", "cuda")
    assert backend.name == "triton"
    assert backend.supports_cuda_graphs


def _backends_here() -> list[tuple[str, str]]:
    found = [("torch", "cpu")]
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        found.append(("triton", "cuda"))
    return found


@pytest.mark.parametrize("name,device", _backends_here())
def test_out_receives_the_result(name, device):
    """backend(..., out=buffer) writes the attention output into the buffer (kernels directly, the reference by a
    copy) and gives what the call without `out` gives."""
    from tokenmill.layers.attention_metadata import AttentionMetadata

    backend = get_attention_backend(name, device)
    dtype = torch.float32
    query_lens, seq_lens, tables = [3, 1], [5, 7], [[1, 2], [3, 4]]
    tokens = sum(query_lens)

    def run(out):
        cache = torch.zeros(2, 5, 4, 2, 16, dtype=dtype).to(device)
        q, k, v = (torch.randn(tokens, h, 16, generator=torch.Generator().manual_seed(i)).to(device)
                   for i, h in enumerate((4, 2, 2)))
        meta = AttentionMetadata.build(query_lens, seq_lens, tables, 4, device)
        return backend(q, k, v, cache, meta, 0.35, out=out)

    expected = run(None)
    buffer = torch.full((tokens, 4, 16), float("nan"), device=device)
    result = run(buffer)
    torch.testing.assert_close(buffer, expected)
    assert result.data_ptr() == buffer.data_ptr()
