"""Which weight quantization an engine runs with: `EngineConfig.quantization` resolved against the model source.

"auto" quantizes only where it loses (almost) nothing and the kernels exist: on CPU, for a GGUF whose decoder weights
are already quantized, when no dtype was asked for. Uniform 4-bit blocks of 32 map onto int4 in groups of 32: Q4_0
and Q4_1 exactly, up to the bf16 rounding of their scales (see quantize_int4), Q4_K sub-blocks within half a step;
other formats (the non-uniform IQ4 grids, Q5, Q6, Q8) get int8 per output channel. A float source, an explicit --dtype, or a CUDA device keeps
full-precision weights. Measured on SmolLM2-135M Q4_1 against fp32: mean KL 0.002 for int4, 0.007 for int8.
"""

from __future__ import annotations

from collections import Counter

import torch

from tokenmill.layers.quantized_linear import QUANTIZATION_MODES, quantized_kernels_available
from tokenmill.models.hub import ModelSource

_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
_UNIFORM_FOUR_BIT = {"Q4_0", "Q4_1", "Q4_K"}


def gguf_weight_format(path) -> str | None:
    """The most common storage type of the 2-D weights of a GGUF file's decoder blocks ("Q4_1", "F16", ...)."""
    from tokenmill.models.gguf_weights import open_gguf

    reader = open_gguf(path)
    kinds = Counter(
        t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2
    )
    return kinds.most_common(1)[0][0] if kinds else None


def auto_quantization(source: ModelSource, device: torch.device) -> str:
    """The quantization "auto" means for this source and device (see the module docstring)."""
    if device.type != "cpu" or source.kind != "gguf" or not quantized_kernels_available():
        return "none"
    fmt = gguf_weight_format(source.path)
    if fmt is None or fmt in _FLOAT_TYPES:
        return "none"
    return "int4" if fmt in _UNIFORM_FOUR_BIT else "int8"


def resolve_quantization(requested: str, source: ModelSource, device: torch.device, dtype_requested: str) -> str:
    """requested: auto | none | int8 | int4. An explicit dtype (anything but "auto") turns "auto" into "none", so
    `--dtype float32` still means full fp32 weights. Raises ValueError for what cannot run."""
    if requested not in ("auto", *QUANTIZATION_MODES):
        raise ValueError(f"unknown quantization {requested!r}; choose one of auto, {', '.join(QUANTIZATION_MODES)}")
    if requested == "auto":
        return "none" if dtype_requested != "auto" else auto_quantization(source, device)
    if requested != "none":
        if device.type != "cpu":
            raise ValueError(f"--quantization {requested} is implemented for CPU only (device is {device})")
        if not quantized_kernels_available():
            raise ValueError(f"--quantization {requested} needs torch >= 2.5 (this is {torch.__version__})")
    return requested
