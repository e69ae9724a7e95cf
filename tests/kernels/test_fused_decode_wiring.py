"""`--decode-backend fused` in the engine: it applies where it can and falls back, with a log line, where it cannot.

On CPU (no interpreter) the engine must fall back to the torch model and generate exactly what the torch backend
does; on CUDA the fused path runs decode steps (in CUDA graphs) and must match the torch model's greedy tokens.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.kernels.backends import triton_available, triton_interpreted
from tokenmill.kernels.fused_llama import FusedDecodeUnsupported, make_fused_decoder, unsupported_reason
from tokenmill.llm import make_engine_config
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_model(**overrides) -> LlamaForCausalLM:
    fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16)
    fields.update(overrides)
    model = LlamaForCausalLM(ModelConfig(**fields))
    model.init_random_weights(seed=0)
    return model


def test_unsupported_models_and_devices_are_named():
    assert "Llama family" in unsupported_reason(torch.nn.Linear(4, 4), "cpu")
    if not triton_interpreted():
        assert "CUDA" in unsupported_reason(tiny_model(), "cpu")
    assert "head_dim" in unsupported_reason(tiny_model(head_dim=8, num_attention_heads=4), "cpu")
    quantized = tiny_model()
    quantized.quantized_lm_head = object()
    assert "quantized" in unsupported_reason(quantized, "cpu")


@pytest.mark.skipif(DEVICE == "cuda" or triton_interpreted(), reason="checks the CPU fallback")
def test_make_fused_decoder_falls_back_on_cpu_with_a_warning(caplog):
    from tokenmill.kernels.fused_llama import FusedLlamaDecoder

    with caplog.at_level(logging.WARNING, logger="tokenmill.kernels.fused_llama"):
        assert make_fused_decoder(tiny_model(), "cpu") is None
    assert "does not apply" in caplog.text
    if triton_available():
        with pytest.raises(FusedDecodeUnsupported):
            FusedLlamaDecoder(tiny_model())


def generate(model_dir, backend: str, prompts: list[list[int]]):
    engine = LLMEngine(make_engine_config(str(model_dir), dtype="float32", device=DEVICE, max_model_len=128,
                                          decode_backend=backend, max_num_seqs=4, num_blocks=64))
    outs = engine.generate_blocking(prompts, GREEDY)
    return engine, [o.outputs[0].token_ids for o in outs]


@pytest.mark.skipif(triton_interpreted(), reason="the engine path under the interpreter is covered on CUDA")
def test_engine_with_fused_backend_generates_the_torch_tokens(tiny_model_dir):
    prompts = [[5, 17, 300, 42], [7] * 11, [100, 200]]
    _, reference = generate(tiny_model_dir, "torch", prompts)
    engine, fused = generate(tiny_model_dir, "fused", prompts)
    from tokenmill.kernels.fused_llama import FusedLlamaDecoder

    uses_fused = any(isinstance(m, FusedLlamaDecoder) for m in engine.runner.decode_models)
    assert uses_fused == (DEVICE == "cuda")
    assert fused == reference
