from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from tokenmill.kernels import AttentionBackend, get_attention_backend

HAS_REFERENCE = importlib.util.find_spec("tokenmill.layers.attention") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
