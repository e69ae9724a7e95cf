"""Small host values to the device without waiting for it.

`torch.tensor(values, device="cuda")` copies with non_blocking=False, which synchronises the host with the
stream: every queued kernel must finish first. Called while the previous step still runs on the GPU (async
scheduling), that one line serialises host and device again. Staging the values in pinned memory and copying with
non_blocking=True queues the copy behind that work instead; PyTorch's pinned-memory cache keeps the buffer until
the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def to_device(values: Sequence[Any], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.tensor(values, dtype=dtype) on `device`, queued on the current stream without a host synchronisation."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
