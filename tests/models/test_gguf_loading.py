"""GGUF loading: tiny llama/qwen2 files written the way llama.cpp's converter writes them (Q/K rows permuted for
llama, mixed quantization types, llama3 rope as a rope_freqs tensor) must reproduce transformers' logits; and the
real SmolLM2 Q4_1 file must match transformers' own GGUF import."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from tokenmill.models.gguf_weights import unpermute_qk_rows
from tokenmill.models.loader import load_model

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# One storage type per weight kind, so every dequantization path is exercised.
_STORAGE = {
    "token_embd": Q.Q8_0,
    "attn_q": Q.Q8_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.F16,
    "attn_output": Q.BF16,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.Q5_0,
    "ffn_down": Q.Q4_0,
    "output": Q.Q8_0,
}


def llamacpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q_proj/k_proj rows of llama models."""
    return (
        rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
    )


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GGUF_NAMES:
        return _GGUF_NAMES[hf_name]
    layer, rest = hf_name[len("model.layers.") :].split(".", 1)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_BLOCK[module]}.{kind}"


def write_tiny_gguf(path: Path, hf_model, arch: str, rope_freqs: torch.Tensor | None = None) -> None:
    """Writes hf_model as a GGUF and sets hf_model's weights to the dequantized values, so both hold the same."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_token_list([f"<{i}>" for i in range(cfg.vocab_size)])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    permute = arch == "llama"
    with torch.no_grad():
        for hf_name, param in hf_model.state_dict().items():
            if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            name = _gguf_name(hf_name)
            weights = param.float().numpy()
            qtype = Q.F32 if weights.ndim == 1 else _STORAGE[name.split(".")[-2]]
            stored = quantize(weights, qtype)
            # Rows quantize independently, so permuting quantized rows equals quantizing permuted rows.
            if permute and name.endswith("attn_q.weight"):
                stored = llamacpp_permute(stored, cfg.num_attention_heads)
            elif permute and name.endswith("attn_k.weight"):
                stored = llamacpp_permute(stored, cfg.num_key_value_heads)
            writer.add_tensor(name, stored, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
            param.copy_(torch.from_numpy(dequantize(quantize(weights, qtype), qtype).reshape(weights.shape)))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unpermute_inverts_llamacpp_permute():
    rows = np.arange(6 * 8 * 3, dtype=np.float32).reshape(48, 3)
    for heads in (1, 2, 6):
        permuted = torch.from_numpy(llamacpp_permute(rows, heads))
        assert not torch.equal(permuted, torch.from_numpy(rows))
        torch.testing.assert_close(unpermute_qk_rows(permuted, heads), torch.from_numpy(rows), atol=0, rtol=0)
    bias = np.arange(48, dtype=np.float32)
    torch.testing.assert_close(
        unpermute_qk_rows(torch.from_numpy(llamacpp_permute(bias, 4)), 4), torch.from_numpy(bias)
    )


@pytest.mark.parametrize("variant", ["llama-untied", "llama3-rope-freqs-tied", "qwen2-bias-tied"])
def test_tiny_gguf_matches_transformers(tmp_path, tiny_hf, paged, variant):
    arch = "qwen2" if variant.startswith("qwen2") else "llama"
    overrides = {} if variant == "llama-untied" else {"tie_word_embeddings": True}
    rope_freqs = None
    if variant.startswith("llama3"):
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        overrides["rope_scaling"] = tiny_hf.llama3_rope
        hf_model = tiny_hf.make(arch, seed=4, **overrides)
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_model.config, "cpu")
        head_dim = hf_model.config.hidden_size // hf_model.config.num_attention_heads
        base = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_freqs = base / scaled  # what llama.cpp's converter stores for llama3 scaling
        assert (rope_freqs > 1).any()
    else:
        hf_model = tiny_hf.make(arch, seed=4, **overrides)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf_model, arch, rope_freqs)

    loaded = load_model(path)
    assert loaded.source.kind == "gguf" and loaded.source.path == path.resolve()
    cfg = loaded.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (128, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert cfg.tie_word_embeddings == hf_model.config.tie_word_embeddings
    assert cfg.attention_bias == (arch == "qwen2")
    assert (cfg.bos_token_id, cfg.eos_token_ids, cfg.architecture) == (0, [1], arch)

    gen = torch.Generator().manual_seed(5)
    sequences = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (40, 9)]
    ours = paged.run(loaded.model, sequences, paged.chunked([40, 9], seed=2))
    for seq, logits in zip(sequences, ours):
        diff = (torch.log_softmax(logits, -1) - tiny_hf.logprobs(hf_model, seq)).abs().max().item()
        assert diff < 1e-3, f"{variant}: max |logprob diff| {diff}"


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_gguf_import(paged):
    from tokenmill.models import hub

    path = hub.cache_dir() / "models" / hub.DEFAULT_MODEL_FILE
    if not path.is_file():
        pytest.skip(f"default model not present at {path}")
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    loaded = load_model(path)
    assert loaded.config.tie_word_embeddings and loaded.config.num_key_value_heads == 3
    # transformers' own GGUF import (de-quantization and Q/K reverse permutation), without needing accelerate.
    hf_config = LlamaConfig(**load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(hf_config)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    with no_init_weights():  # every weight is loaded next; skip 135M parameters of random init
        hf_model = LlamaForCausalLM(hf_config).float().eval()
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf_model.tie_weights()

    sequences = [[1, 9690, 198, 504, 3458, 282, 4198, 314, 253, 1789, 30, 2], [1, 28120, 905, 17, 33, 5]]
    ours = paged.run(loaded.model, sequences, paged.prefill_then_decode([12, 6], [5, 2]), block_size=16)
    for seq, logits in zip(sequences, ours):
        with torch.no_grad():
            expected = torch.log_softmax(hf_model(torch.tensor([seq])).logits[0].float(), -1)
        diff = (torch.log_softmax(logits, -1) - expected).abs().max().item()
        assert diff < 1e-3, f"max |logprob diff| {diff}"
