"""The attention kernels' prompt variants compile while the engine starts, not in the middle of serving."""

from __future__ import annotations

import pytest
import torch

from tokenmill.engine.engine import LLMEngine
from tokenmill.llm import make_engine_config
from tokenmill.sampling_params import SamplingParams


def compiled_variants(kernel) -> int:
    """Variants Triton holds for a @triton.jit kernel (the first element of each device's cache entry)."""
    return sum(len(entry[0]) for entry in kernel.device_caches.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_prefill_kernel_compiles_while_serving(tiny_model_dir):
    from tokenmill.kernels.triton.prefill import _paged_prefill_kernel

    engine = LLMEngine(make_engine_config(str(tiny_model_dir), device="cuda", dtype="float32", max_model_len=512,
                                          num_blocks=512, max_num_seqs=32, max_num_batched_tokens=256))
    warmed = compiled_variants(_paged_prefill_kernel)
    assert warmed > 0
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # prompts of every size class arriving while others decode: whole-step graphs, mixed steps of decodes and
    # chunks past the whole-step size, long chunks
    waves = [[[5] * 300], [[6 + i] * (10 + 7 * i) for i in range(12)], [[7] * 90, [8] * 200], [[9] * 3] * 20]
    for wave in waves:
        for prompt in wave:
            engine.add_request(prompt, params)
        for _ in range(3):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    assert compiled_variants(_paged_prefill_kernel) == warmed
