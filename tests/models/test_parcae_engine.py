"""Parcae served by the engine: per-loop paged KV cache, seeded initial state, prefix cache, loading.

The reference everywhere is the training model's forward at fixed T, `ParcaeModel(ids, T=T, state_seed=seed)`.
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from tokenmill.engine.engine import LLMEngine
from tokenmill.engine.request import Request
from tokenmill.engine.runner import ModelRunner
from tokenmill.kv.block_hash import cache_salt, compute_block_hashes
from tokenmill.layers.attention_metadata import AttentionMetadata
from tokenmill.llm import make_engine_config
from tokenmill.models.loader import load_model, load_model_config
from tokenmill.models.parcae import ParcaeModel, get_config
from tokenmill.models.parcae_checkpoint import parcae_format, read_parcae_checkpoint, save_parcae_folder
from tokenmill.models.parcae_engine import ParcaeForEngine, parcae_model_config
from tokenmill.models.random_weights import write_wordlevel_tokenizer
from tokenmill.sampling_params import SamplingParams

T = 3
VOCAB = 512
ATOL = 2e-5  # fp32: the paged path and the dense forward differ only in summation order


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_parcae(seed: int = 0, **overrides) -> ParcaeModel:
    """get_config("tiny") with two core blocks, GQA and value embeddings, every weight perturbed (the zero-initialised
    output projections would otherwise hide mistakes in the attention path)."""
    config = get_config("tiny", n_core=2, n_kv_heads=1, value_embeddings=True, mean_recurrence=T, **overrides)
    torch.manual_seed(seed)
    model = ParcaeModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.08 * torch.randn_like(p))
    return model.requires_grad_(False)


def reference_logits(model: ParcaeModel, tokens: list[int], seed: int, loops: int = T) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]), T=loops, state_seed=seed)[0]


@pytest.fixture(scope="module")
def model() -> ParcaeModel:
    return tiny_parcae()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, model):
    """The export format (config.json + model.safetensors) plus a word-level tokenizer ("<i>" is token i)."""
    folder = tmp_path_factory.mktemp("parcae-export")
    save_parcae_folder(model, folder)
    write_wordlevel_tokenizer(folder, VOCAB, bos_id=None, eos_id=None)
    return folder


def make_engine(folder, **kw) -> LLMEngine:
    kw = {"dtype": "float32", "device": "cpu", "block_size": 4, "max_model_len": 64, "max_num_seqs": 8} | kw
    return LLMEngine(make_engine_config(str(folder), **kw))


# ---- the model over the paged cache --------------------------------------------------------------------------------


def run_steps(engine_model, sequences, seeds, steps, block_size=4, seed=0):
    """Feeds `steps` (lists of (sequence, new tokens)) through the paged model with shuffled, non-contiguous
    blocks whose unused slots hold NaN; returns each sequence's logits at every position."""
    blocks = [math.ceil(len(s) / block_size) for s in sequences]
    num_blocks = sum(blocks) + 5
    perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, at = [], 0
    for n in blocks:
        tables.append(perm[at : at + n])
        at += n
    c = engine_model.config
    shape = (engine_model.num_kv_layers, 2, num_blocks, block_size, c.num_key_value_heads, c.head_dim)
    kv = torch.full(shape, math.nan)
    done = [0] * len(sequences)
    out = [[] for _ in sequences]
    for step in steps:
        ids, pos, qlens, slens, tabs, step_seeds = [], [], [], [], [], []
        for i, n in step:
            a, b = done[i], done[i] + n
            ids += sequences[i][a:b]
            pos += range(a, b)
            qlens.append(n)
            slens.append(b)
            tabs.append(tables[i][: math.ceil(b / block_size)])
            step_seeds.append(seeds[i])
            done[i] = b
        meta = AttentionMetadata.build(qlens, slens, tabs, block_size, state_seeds=step_seeds)
        with torch.inference_mode():
            logits = engine_model.compute_logits(engine_model(torch.tensor(ids), torch.tensor(pos), kv, meta))
        for (i, _), chunk in zip(step, logits.split(qlens)):
            out[i].append(chunk)
    assert done == [len(s) for s in sequences]
    return [torch.cat(chunks) for chunks in out]


@pytest.mark.parametrize("schedule", ["one_step", "chunked", "prefill_then_decode", "token_by_token"])
def test_paged_forward_equals_training_forward(model, paged, schedule):
    """Mixed prefill chunks and decodes of several sequences, each with its own seed: every position's logits equal
    the training forward at fixed T. The query tokens' loop states are computed fresh each step; only K/V of earlier
    tokens come from the cache, which is what the causal training forward computes."""
    rng = random.Random(1)
    lengths = [13, 5, 22, 9]
    sequences = [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]
    seeds = [0, 11, -3, 2**40 + 5]
    steps = {
        "one_step": paged.one_step(lengths),
        "chunked": paged.chunked(lengths, seed=3, max_chunk=6),
        "prefill_then_decode": paged.prefill_then_decode(lengths, [4, 5, 10, 1]),
        "token_by_token": paged.token_by_token(lengths),
    }[schedule]
    engine_model = ParcaeForEngine(model)
    got = run_steps(engine_model, sequences, seeds, steps)
    for tokens, seed, logits in zip(sequences, seeds, got):
        torch.testing.assert_close(logits, reference_logits(model, tokens, seed), atol=ATOL, rtol=0)


def test_other_T_and_weights_are_shared_not_copied(model, paged):
    engine_model = ParcaeForEngine(model, recurrence=5)
    assert engine_model.num_kv_layers == 1 + 5 * 2 + 1
    assert sum(p.numel() for p in engine_model.parameters()) == model.num_parameters()
    tokens = [random.Random(2).randrange(VOCAB) for _ in range(10)]
    (got,) = run_steps(engine_model, [tokens], [4], paged.chunked([10], seed=1))
    torch.testing.assert_close(got, reference_logits(model, tokens, 4, loops=5), atol=ATOL, rtol=0)


def test_every_virtual_layer_uses_the_selected_backend_on_its_own_kv_layer(model):
    from tokenmill.layers.attention import paged_attention

    seen = []

    def backend(q, k, v, kv_cache_layer, meta, scale):
        seen.append(kv_cache_layer.data_ptr())
        return paged_attention(q, k, v, kv_cache_layer, meta, scale)

    engine_model = ParcaeForEngine(model, attn_backend=backend)
    kv = torch.zeros(engine_model.num_kv_layers, 2, 3, 4, 1, 32)
    meta = AttentionMetadata.build([5], [5], [[1, 2]], 4)
    with torch.inference_mode():
        engine_model(torch.arange(5), torch.arange(5), kv, meta)
    assert seen == [kv[i].data_ptr() for i in range(engine_model.num_kv_layers)]
    with pytest.raises(ValueError, match="needs 8"):
        engine_model(torch.arange(5), torch.arange(5), kv[:4], meta)


def test_state_seed_changes_the_logits(model):
    engine_model = ParcaeForEngine(model)
    tokens = list(range(7, 19))
    a, b = run_steps(engine_model, [tokens, tokens], [1, 2], [[(0, 12), (1, 12)]])
    assert (a - b).abs().max() > 1e-3
    # without seeds in the metadata the model uses its default, 0, like ParcaeModel.forward
    meta = AttentionMetadata.build([12], [12], [[0, 1, 2]], 4)
    kv = torch.zeros(engine_model.num_kv_layers, 2, 3, 4, 1, 32)
    with torch.inference_mode():
        default = engine_model.compute_logits(engine_model(torch.tensor(tokens), torch.arange(12), kv, meta))
    torch.testing.assert_close(default, reference_logits(model, tokens, 0), atol=ATOL, rtol=0)


def test_model_runner_mixed_steps_with_per_request_seeds(model):
    """The engine's ModelRunner: request A decodes while B prefills in chunks, then both decode; block ids are
    shuffled; each request carries its seed; the logits the runner returns equal the training forward."""
    engine_model = ParcaeForEngine(model)
    c = engine_model.config
    runner = ModelRunner(engine_model, engine_model.num_kv_layers, c.num_key_value_heads, c.head_dim,
                         num_blocks=16, block_size=4, max_model_len=64, dtype=torch.float32,
                         device=torch.device("cpu"))
    rng = random.Random(5)
    full_a = [rng.randrange(VOCAB) for _ in range(12)]
    full_b = [rng.randrange(VOCAB) for _ in range(15)]
    a = Request("a", full_a[:6], SamplingParams(), state_seed=21, block_ids=[9, 3, 14])
    b = Request("b", full_b[:11], SamplingParams(), state_seed=22, block_ids=[2, 11, 6, 15])
    full = {"a": full_a, "b": full_b}
    seeds = {"a": 21, "b": 22}
    checked = 0
    for step in ([(a, 6)], [(a, 1), (b, 7)], [(a, 1), (b, 4)], [(a, 1), (b, 1)], [(a, 1), (b, 1)]):
        rows, logits, _ = runner.execute(step)
        for row, lg in zip(rows, logits):
            req = step[row][0]
            pos = req.num_tokens - 1
            ref = reference_logits(model, full[req.request_id][: pos + 1], seeds[req.request_id])[pos]
            torch.testing.assert_close(lg, ref, atol=ATOL, rtol=0)
            checked += 1
        for req, n in step:
            req.num_computed_tokens += n
            if req.num_computed_tokens == req.num_tokens:  # teacher-forced "sampled" token
                req.append_output_token(full[req.request_id][req.num_tokens])
    assert checked == 8


# ---- the engine: KV sizing, greedy generation, prefix cache, state seeds -----------------------------------------


def naive_greedy(model: ParcaeModel, prompt: list[int], n: int, seed: int = 0, loops: int = T) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(reference_logits(model, tokens, seed, loops)[-1].argmax()))
    return tokens[len(prompt) :]


def test_engine_sizes_the_kv_cache_per_loop(model, model_dir):
    engine = make_engine(model_dir, num_blocks=40)
    c = model.config
    virtual = c.n_prelude + T * c.n_core + c.n_coda  # 1 + 3*2 + 1 = 8
    transformer_layers = c.fixed_depth_baseline().n_layers  # the same-size transformer: 4
    assert engine.runner.kv_cache.shape == (virtual, 2, 40, 4, c.num_kv_heads, c.head_dim)
    assert engine.model_config.num_hidden_layers == virtual
    per_token = engine.model_config.kv_bytes_per_token(torch.float32)
    assert per_token == engine.runner.kv_cache[:, :, 0, 0].numel() * 4  # what one token's slot really holds
    transformer = parcae_model_config(c.fixed_depth_baseline(), T).kv_bytes_per_token(torch.float32)
    assert per_token / transformer == virtual / transformer_layers == 2
    # the budget-sized pool holds 2x fewer tokens than the same-size transformer's would
    budget = make_engine(model_dir, kv_cache_memory_bytes=1 << 20)
    assert budget.num_blocks == (1 << 20) // (per_token * 4)
    assert make_engine(model_dir, num_blocks=40, parcae_recurrence=5).runner.kv_cache.shape[0] == 1 + 5 * 2 + 1


def test_greedy_generation_equals_naive_loop(model, model_dir):
    rng = random.Random(7)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (3, 9, 17, 6)]
    expected = [naive_greedy(model, p, 8) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for kw in (dict(enable_prefix_caching=False), dict(max_num_batched_tokens=8)):  # batched; chunked + cached
        engine = make_engine(model_dir, **kw)
        outs = engine.generate_blocking(prompts, params)
        assert [o.outputs[0].token_ids for o in outs] == expected


def test_greedy_generation_at_another_T(model, model_dir):
    prompt = list(range(30, 41))
    engine = make_engine(model_dir, parcae_recurrence=2)
    (out,) = engine.generate_blocking([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert out.outputs[0].token_ids == naive_greedy(model, prompt, 6, loops=2)


def sampled_logprobs(engine: LLMEngine, prompt: list[int], state_seed: int | None = None, max_tokens: int = 3):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=4, state_seed=state_seed)
    (out,) = engine.generate_blocking([prompt], params)
    return out


def assert_logprobs_match(out, model, prompt, seed):
    """Every generated token's top-4 logprobs equal log_softmax of the training forward's logits."""
    tokens = prompt + out.outputs[0].token_ids
    ref = torch.log_softmax(reference_logits(model, tokens, seed), dim=-1)
    for i, step in enumerate(out.outputs[0].logprobs):
        pos = len(prompt) - 1 + i
        for token, lp in step.items():
            assert abs(lp.logprob - float(ref[pos, token])) < 1e-4, (i, token)


def test_prefix_cache_hits_give_the_training_forward(model, model_dir):
    engine = make_engine(model_dir)
    prefix = list(range(100, 116))  # 4 full blocks
    first = sampled_logprobs(engine, prefix + [7, 8, 9])
    second = sampled_logprobs(engine, prefix + [40, 41])
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 16
    assert_logprobs_match(first, model, prefix + [7, 8, 9], 0)
    assert_logprobs_match(second, model, prefix + [40, 41], 0)
    uncached = sampled_logprobs(make_engine(model_dir, enable_prefix_caching=False), prefix + [40, 41])
    assert uncached.outputs[0].token_ids == second.outputs[0].token_ids


def test_state_seeds_get_their_own_prefix_cache_namespace(model, model_dir):
    engine = make_engine(model_dir, seed=3)  # the engine-wide default state seed is --seed
    prompt = list(range(200, 214))  # 3 full blocks + 2 tokens
    default = sampled_logprobs(engine, prompt)
    seeded = sampled_logprobs(engine, prompt, state_seed=5)
    assert default.num_cached_tokens == 0
    assert seeded.num_cached_tokens == 0  # same tokens, other seed: nothing shared
    assert_logprobs_match(default, model, prompt, 3)
    assert_logprobs_match(seeded, model, prompt, 5)
    first = {t: lp.logprob for t, lp in default.outputs[0].logprobs[0].items()}
    other = {t: lp.logprob for t, lp in seeded.outputs[0].logprobs[0].items()}
    assert first != other
    again = sampled_logprobs(engine, prompt, state_seed=5)
    assert again.num_cached_tokens == 12  # the same seed shares its own blocks
    assert_logprobs_match(again, model, prompt, 5)
    explicit_default = sampled_logprobs(engine, prompt, state_seed=3)
    assert explicit_default.num_cached_tokens == 12  # the default seed, named, is the unsalted namespace
    # the salted chain shares no hash with the unsalted one
    salted = compute_block_hashes(prompt, 4, parent=cache_salt("state_seed", 5))
    assert not set(salted) & set(compute_block_hashes(prompt, 4))
    assert engine.kv.num_free_blocks + engine.kv.num_evictable_blocks == engine.kv.num_usable_blocks


def test_requests_carry_seed_and_salt(model_dir):
    engine = make_engine(model_dir)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=1), "plain")
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=1, state_seed=9), "seeded")
    reqs = {r.request_id: r for r in engine.scheduler.waiting}
    assert (reqs["plain"].state_seed, reqs["plain"].cache_salt) == (0, None)
    assert (reqs["seeded"].state_seed, reqs["seeded"].cache_salt) == (9, cache_salt("state_seed", 9))
    with pytest.raises(ValueError, match="state_seed"):
        SamplingParams(state_seed=2**63)


def test_state_seed_and_recurrence_are_rejected_for_other_models(tiny_model_dir):
    with pytest.raises(ValueError, match="Parcae"):
        load_model(str(tiny_model_dir), parcae_recurrence=4)
    engine = LLMEngine(make_engine_config(str(tiny_model_dir), dtype="float32", device="cpu", max_model_len=64,
                                          num_blocks=32))
    with pytest.raises(ValueError, match="state_seed"):
        engine.add_request([5, 6], SamplingParams(state_seed=1))


# ---- loading ---------------------------------------------------------------------------------------------------


def test_export_round_trip_and_model_config(model, model_dir):
    assert parcae_format(model_dir) == "export"
    ckpt = read_parcae_checkpoint(model_dir)
    assert ckpt.recurrence == T and ckpt.model.lm_head.weight is ckpt.model.embed.weight
    for key, value in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[key], value), key
    config, _ = load_model_config(str(model_dir))
    loaded = load_model(str(model_dir))
    assert isinstance(loaded.model, ParcaeForEngine)
    assert config == loaded.config
    assert (config.architecture, config.num_hidden_layers, config.max_position_embeddings) == ("parcae", 8, 64)


def test_bf16_load_keeps_fp32_rope_tables(model_dir):
    loaded = load_model(str(model_dir), dtype=torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16 and loaded.model.parcae.rope_cos.dtype == torch.float32


def to_parcae_lm_names(model: ParcaeModel) -> dict[str, torch.Tensor]:
    top = {
        "embed.weight": "transformer.wte.weight",
        "final_norm.weight": "transformer.ln_f.weight",
        "prelude_norm.weight": "transformer.ln_prelude.weight",
        "readout.weight": "transformer.C.weight",
        "injection.log_A": "transformer.adapter.A_log",
        "injection.dt_bias": "transformer.adapter.dt_bias",
        "injection.B": "transformer.adapter.B",
    }
    stages = {"prelude": "prelude", "core": "core_block", "coda": "coda"}
    parts = {"attn_norm": "norm_1", "attn.wq": "attn.c_q", "attn.wk": "attn.c_k", "attn.wv": "attn.c_v",
             "attn.wo": "attn.c_proj", "attn.ve_gate": "attn.ve_gate", "mlp_norm": "norm_2", "mlp.up": "mlp.fc",
             "mlp.down": "mlp.proj"}
    out = {}
    for key, value in model.state_dict().items():
        stage, _, rest = key.partition(".")
        if key == "lm_head.weight":
            continue
        if key in top:
            out[top[key]] = value.clone()
        elif key.startswith("value_embeds."):
            out[key] = value.clone()
        else:
            index, _, name = rest.partition(".")
            out[f"transformer.{stages[stage]}.{index}.{parts[name.removesuffix('.weight')]}.weight"] = value.clone()
    return out


def test_parcae_lm_checkpoint_folder_serves(model, tmp_path):
    c = model.config
    torch.save(to_parcae_lm_names(model), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({
        "name": "tiny-parcae-lm", "n_embd": c.d_model, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.num_kv_heads, "intermediate_size": c.ffn_size, "vocab_size": c.vocab_size,
        "padded_vocab_size": c.vocab_size, "block_size": c.max_seq_len, "n_layers_in_prelude": c.n_prelude,
        "n_layers_in_recurrent_block": c.n_core, "n_layers_in_coda": c.n_coda, "mean_recurrence": T,
        "mean_backprop_depth": 2, "injection_type": "diagonal", "tie_embeddings": True, "qk_norm": True,
        "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": c.rope_theta},
    }))
    write_wordlevel_tokenizer(tmp_path, VOCAB, bos_id=None, eos_id=None)
    assert parcae_format(tmp_path) == "parcae-lm"
    engine = make_engine(tmp_path)
    prompt = list(range(60, 70))
    out = engine.generate_blocking([prompt], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert out[0].outputs[0].token_ids == naive_greedy(model, prompt, 5)
