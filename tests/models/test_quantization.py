"""Quantized models against their fp32 selves: a tiny random Llama through the paged runner, SmolLM2 from its GGUF,
and the policy that picks a quantization for a source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokenmill.layers.quantized_linear import QuantizedLinear, quantized_kernels_available
from tokenmill.models import quantization
from tokenmill.models.hub import ModelSource
from tokenmill.models.loader import load_model
from tokenmill.models.quantization import resolve_quantization

pytestmark = pytest.mark.skipif(not quantized_kernels_available(), reason="torch lacks the CPU low-bit kernels")

CPU = torch.device("cpu")


def _token_ids(n: int, seed: int, vocab: int = 128) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tiny_llama_quantized_matches_its_dequantized_weights_in_fp32(tmp_path, tiny_hf, paged, mode):
    """The reference holds the dequantized weights in fp32, so only bf16 rounding separates the two (measured mean KL
    ~7e-4, the same as an unquantized bf16 model vs fp32); a layout or scale bug would be O(1)."""
    tiny_hf.save(tmp_path, "llama", seed=4)
    reference = load_model(tmp_path, dtype=torch.float32).model
    model = load_model(tmp_path, dtype=torch.bfloat16).model
    model.quantize_(mode)
    assert isinstance(model.layers[0].mlp.gate_up_proj, QuantizedLinear)
    assert model.quantized_lm_head is not None and model.quantized_lm_head.mode == "int8"
    with torch.no_grad():
        for ref_module, module in zip(reference.modules(), model.modules()):
            if isinstance(module, QuantizedLinear):
                ref_module.weight.copy_(module.dequantized_weight())
        reference.lm_head.weight.copy_(model.quantized_lm_head.dequantized_weight())
    seqs = [_token_ids(n, seed) for n, seed in ((23, 1), (9, 2), (31, 3))]
    lengths = [len(s) for s in seqs]
    expected = [torch.log_softmax(x, -1) for x in paged.run(reference, seqs, paged.one_step(lengths))]
    # one prefill step (the dense bf16 path) and token by token (the low-bit kernels: <= 3 rows) alike
    for schedule in (paged.one_step(lengths), paged.token_by_token(lengths), paged.chunked(lengths)):
        got = paged.run(model, seqs, schedule)
        kl = torch.cat([_kl(exp, torch.log_softmax(logits, -1)) for exp, logits in zip(expected, got)])
        assert kl.mean() < 3e-3 and kl.max() < 3e-2, f"{mode}: mean KL {kl.mean():.5f}, max {kl.max():.4f}"


@pytest.fixture(scope="module")
def smollm2_logprobs(smollm2_path):
    """fp32 reference logprobs of SmolLM2 on an English paragraph, and a way to compute them for another model."""
    from tokenmill.layers.attention_metadata import AttentionMetadata
    from tokenmill.tokenizer import Tokenizer

    text = (
        "The sky looks blue because sunlight is made of many colors. When it passes through the air, the tiny "
        "molecules scatter the short blue waves much more than the long red ones, so blue light reaches our eyes "
        "from every direction. At sunset the light travels through more air and the blue is scattered away."
    )
    ids = Tokenizer.from_gguf(smollm2_path).encode(text, add_special_tokens=False)

    def logprobs(model) -> torch.Tensor:
        """A prefill of all but the last 6 tokens (the dense bf16 path of quantized layers), then 6 decode steps of
        one token (the low-bit kernels); logprobs at every position."""
        cfg = model.config
        n = len(ids)
        table = list(range(1, n // 16 + 2))
        kv = torch.zeros(cfg.num_hidden_layers, 2, n // 16 + 2, 16, cfg.num_key_value_heads, cfg.head_dim,
                         dtype=model.dtype)
        chunks = [(0, n - 6)] + [(i, i + 1) for i in range(n - 6, n)]
        logits = []
        with torch.inference_mode():
            for start, end in chunks:
                meta = AttentionMetadata.build([end - start], [end], [table], 16)
                hidden = model(torch.tensor(ids[start:end]), torch.arange(start, end), kv, meta)
                logits.append(model.compute_logits(hidden))
        return torch.cat(logits).log_softmax(-1)

    reference = logprobs(load_model(smollm2_path, dtype=torch.float32).model)
    return ids, reference, logprobs


@pytest.mark.slow
@pytest.mark.parametrize("mode, max_mean_kl", [("int4", 0.006), ("int8", 0.015)])
def test_smollm2_quantized_logprobs_stay_close_to_fp32(smollm2_path, smollm2_logprobs, mode, max_mean_kl):
    """int4 re-packs the file's own Q4_1 codes (measured mean KL ~0.002 vs fp32, below bf16 weights alone ~0.001
    plus bf16 activations); int8 per row is coarser than Q4_1's blocks of 32 (~0.007)."""
    ids, reference, logprobs = smollm2_logprobs
    model = load_model(smollm2_path, dtype=torch.bfloat16).model
    model.quantize_(mode)
    got = logprobs(model)
    kl = _kl(reference, got)
    targets = torch.tensor(ids[1:])
    token_gap = (got[:-1].gather(1, targets[:, None]) - reference[:-1].gather(1, targets[:, None])).abs()
    assert kl.mean() < max_mean_kl, f"mean KL {kl.mean():.5f}"
    assert token_gap.max() < 0.6 and token_gap.mean() < 0.15, f"logprob gaps max {token_gap.max():.3f}"
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def test_auto_picks_int4_for_the_q4_1_default_model_on_cpu_only(smollm2_path):
    source = ModelSource("gguf", Path(smollm2_path))
    assert quantization.gguf_weight_format(smollm2_path) == "Q4_1"
    assert resolve_quantization("auto", source, CPU, "auto") == "int4"
    assert resolve_quantization("auto", source, CPU, "float32") == "none"  # an explicit dtype keeps fp weights
    assert resolve_quantization("auto", source, torch.device("cuda"), "auto") == "none"
    assert resolve_quantization("int8", source, CPU, "float32") == "int8"


@pytest.mark.parametrize("fmt, expected", [("Q4_0", "int4"), ("Q4_K", "int4"), ("IQ4_NL", "int8"), ("Q8_0", "int8"),
                                           ("Q6_K", "int8"), ("F16", "none"), ("BF16", "none"), (None, "none")])
def test_auto_follows_the_gguf_storage_type(monkeypatch, fmt, expected):
    monkeypatch.setattr(quantization, "gguf_weight_format", lambda path: fmt)
    assert quantization.auto_quantization(ModelSource("gguf", Path("m.gguf")), CPU) == expected


def test_auto_keeps_float_checkpoints_and_rejects_bad_requests(tiny_model_dir):
    source = ModelSource("hf_dir", Path(tiny_model_dir))
    assert resolve_quantization("auto", source, CPU, "auto") == "none"
    assert resolve_quantization("int4", source, CPU, "auto") == "int4"
    with pytest.raises(ValueError, match="unknown quantization"):
        resolve_quantization("fp8", source, CPU, "auto")
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quantization("int8", source, torch.device("cuda"), "auto")


@pytest.mark.slow
def test_engine_defaults_to_int4_in_bf16_for_the_default_model_on_cpu(smollm2_path):
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.llm import make_engine_config
    from tokenmill.sampling_params import SamplingParams

    engine = LLMEngine(make_engine_config(str(smollm2_path), device="cpu", max_model_len=256, num_blocks=64))
    assert engine.quantization == "int4" and engine.dtype == torch.bfloat16
    assert engine.runner.kv_cache.dtype == torch.bfloat16
    prompt = engine.tokenizer.encode("The capital of France is", add_special_tokens=False)
    (out,) = engine.generate_blocking([prompt], SamplingParams(temperature=0.0, max_tokens=4))
    assert "Paris" in out.outputs[0].text
    fp32 = LLMEngine(make_engine_config(str(smollm2_path), device="cpu", dtype="float32", max_model_len=256,
                                        num_blocks=64))
    assert fp32.quantization == "none" and fp32.dtype == torch.float32
