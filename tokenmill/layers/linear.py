"""Uninitialized linear/embedding modules: weights are allocated in the target dtype/device and filled by a loader,
so building a large model costs no random initialization and no extra copy."""

from __future__ import annotations

import torch
from torch import nn


def _empty_param(*shape: int, dtype: torch.dtype | None, device: torch.device | str | None) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def empty_linear(
    in_features: int,
    out_features: int,
    bias: bool,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias, device="meta")
    layer.weight = _empty_param(out_features, in_features, dtype=dtype, device=device)
    if bias:
        layer.bias = _empty_param(out_features, dtype=dtype, device=device)
    return layer


def empty_embedding(
    num_embeddings: int,
    embedding_dim: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Embedding:
    # Given its weight, nn.Embedding skips reset_parameters: its normal_ (even on "meta") imports torch._dynamo,
    # ~1.5-2.5 s of start-up on a 2-core machine.
    weight = torch.empty(num_embeddings, embedding_dim, dtype=dtype, device=device)
    return nn.Embedding(num_embeddings, embedding_dim, _weight=weight, _freeze=True)
