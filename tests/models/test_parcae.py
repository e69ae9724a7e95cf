from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.models.parcae import (
    PAPER_CONFIGS,
    CheckpointMappingError,
    DiagonalInjection,
    LoopDepths,
    ParcaeConfig,
    ParcaeModel,
    config_from_parcae_lm,
    expected_training_flops_per_token,
    get_config,
    load_parcae_lm,
    load_parcae_lm_state_dict,
    seeded_truncated_normal,
    training_flops_per_token,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**kw) -> ParcaeConfig:
    base = {
        "vocab_size": 97,
        "d_model": 32,
        "n_heads": 4,
        "n_kv_heads": 2,
        "n_prelude": 1,
        "n_core": 2,
        "n_coda": 1,
        "max_seq_len": 32,
        "mean_recurrence": 3,
        "backprop_depth": 2,
    }
    return ParcaeConfig(**(base | kw))


def expected_params(c: ParcaeConfig) -> int:
    d, f, kv = c.d_model, c.ffn_size, c.num_kv_heads * c.head_dim
    block = 2 * d * d + 2 * d * kv + 2 * d * f + 2 * d
    ve_layers = [i for i in range(c.n_layers) if c.value_embeddings and i % 2 == (c.n_layers - 1) % 2]
    total = c.vocab_size * d + c.n_layers * block + d  # embedding (tied head), blocks, final norm
    total += len(ve_layers) * (c.vocab_size * kv + 32 * c.num_kv_heads)
    if c.is_looped:
        total += d + d * d + {"parcae": d * d + 2 * d, "linear": 2 * d * d, "additive": 0}[c.injection]
    return total


@pytest.mark.parametrize(
    "name,nominal", [("parcae-140m", 140e6), ("parcae-370m", 370e6), ("parcae-770m", 770e6), ("parcae-1.3b", 1.3e9)]
)
def test_paper_family_parameter_counts(name, nominal):
    config = PAPER_CONFIGS[name]
    with torch.device("meta"):
        parcae = ParcaeModel(config)
        transformer = ParcaeModel(config.fixed_depth_baseline())
    assert parcae.num_parameters() == expected_params(config)
    assert transformer.num_parameters() == expected_params(config.fixed_depth_baseline())
    assert abs(parcae.num_parameters() / nominal - 1) < 0.06
    # the baseline has the same blocks; Parcae adds only B, C, A, Δ and one norm (~2 d²)
    extra = parcae.num_parameters() - transformer.num_parameters()
    assert extra == 2 * config.d_model**2 + 3 * config.d_model
    assert config.effective_depth() == 3 * config.n_prelude + (config.mean_recurrence - 1) * config.n_core


def test_named_configs():
    assert get_config("parcae-140m").d_model == 768
    baseline = get_config("transformer-parcae-1.3b")
    assert (baseline.n_prelude, baseline.n_core, baseline.n_coda) == (24, 0, 0) and not baseline.is_looped
    assert get_config("sweep", injection="linear", n_heads=8).num_kv_heads == 8
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("parcae-7b")
    with pytest.raises(ValueError, match="injection"):
        tiny(injection="gated")
    with pytest.raises(ValueError, match="multiple of n_heads"):
        tiny(d_model=30)


@pytest.mark.parametrize("injection", ["parcae", "linear", "additive"])
def test_shapes_and_virtual_layers(injection):
    torch.manual_seed(0)
    config = tiny(injection=injection, value_embeddings=True)
    model = ParcaeModel(config)
    ids = torch.randint(0, 97, (3, 11))
    logits = model(ids, T=4, state_seed=[1, 2, 3])
    assert logits.shape == (3, 11, 97) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.last_stats.state_norms.shape == (4,)
    layers = model.virtual_layers(4)
    assert len(layers) == config.effective_depth(4) == 1 + 2 * 4 + 1
    assert [vl.index for vl in layers] == list(range(len(layers)))
    core = [vl for vl in layers if vl.stage == "core"]
    assert [vl.loop for vl in core] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [vl.starts_loop for vl in core] == [True, False] * 4
    assert {vl.layer_id for vl in core} == {1, 2} and layers[-1].layer_id == 3


def test_virtual_layer_walk_reproduces_forward():
    """The serving decomposition (prelude, loop_update + core per loop, readout, coda) gives forward's logits."""
    torch.manual_seed(1)
    model = ParcaeModel(tiny(value_embeddings=True)).eval()
    for p in model.parameters():  # zero-initialised output projections would hide mistakes
        p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 9))
    positions = torch.arange(9)
    cos, sin = model.rope(positions)
    x = model.embed(ids)
    h = e = None
    for vl in model.virtual_layers(3):
        if vl.stage == "core" and h is None:
            h, e = model.begin_recurrence(x, torch.tensor([5, 6]), positions)
        if vl.starts_loop:
            h = model.loop_update(h, e)
        if vl.stage == "coda" and h is not None:
            x, h = model.end_recurrence(h), None
        if vl.stage == "core":
            h = model.block_of(vl)(h, cos, sin, value_embed=model.value_embed(vl.layer_id, ids))
        else:
            x = model.block_of(vl)(x, cos, sin, value_embed=model.value_embed(vl.layer_id, ids))
    torch.testing.assert_close(model.logits(x), model(ids, T=3, state_seed=[5, 6]))


def test_forward_is_deterministic_given_the_seed_and_independent_of_length():
    torch.manual_seed(2)
    model = ParcaeModel(tiny()).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 16))
    a = model(ids, T=3, state_seed=[11, 12])
    assert torch.equal(a, model(ids, T=3, state_seed=[11, 12]))
    assert not torch.allclose(a, model(ids, T=3, state_seed=[11, 13])[1:].expand_as(a))
    assert not torch.allclose(a[1], model(ids, T=3, state_seed=[11, 13])[1])
    # the initial state is a function of (seed, position): a prefix gives the prefix's logits
    torch.testing.assert_close(model(ids[:, :7], T=3, state_seed=[11, 12]), a[:, :7])
    # and per-token seeds of a flattened batch give the same states as per-sequence seeds
    h = seeded_truncated_normal(torch.tensor([11, 12]), torch.arange(16), 32, 0.02)
    flat = seeded_truncated_normal(torch.tensor([11] * 16 + [12] * 16), torch.arange(16).repeat(2)[:, None], 32, 0.02)
    torch.testing.assert_close(flat.squeeze(1), h.reshape(32, 32))


def test_seeded_initial_state_statistics():
    h = seeded_truncated_normal(torch.arange(64), torch.arange(128), 96, std=0.02)
    assert h.shape == (64, 128, 96)
    assert abs(float(h.mean())) < 2e-4 and abs(float(h.std()) / 0.02 - 0.986) < 0.01  # truncated at 3σ
    assert float(h.abs().max()) <= 0.06 + 1e-7
    assert not torch.equal(h[0], h[1]) and not torch.equal(h[:, 0], h[:, 1])


def test_sample_depths_poisson_truncated():
    model = ParcaeModel(tiny(mean_recurrence=8, backprop_depth=4))
    d = model.sample_depths(20_000, torch.Generator().manual_seed(0))
    total = d.total.float()
    assert int(total.min()) >= 1 and abs(float(total.mean()) - 8.0) < 0.1
    assert torch.equal(d.with_grad, d.total.clamp(max=4))
    batch = ParcaeModel(tiny(depth_sampling="per-batch")).sample_depths(5, torch.Generator().manual_seed(0))
    assert len(set(batch.total.tolist())) == 1


def test_per_sequence_depths_match_fixed_depth_forward():
    """In a batch with different loop counts, each sequence gets exactly its own depth."""
    torch.manual_seed(3)
    model = ParcaeModel(tiny())
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 97, (3, 8))
    depths = LoopDepths(torch.tensor([0, 3, 1]), torch.tensor([2, 2, 1]))
    mixed = model(ids, depths=depths, state_seed=[1, 2, 3])
    for i, T in enumerate([2, 5, 2]):
        torch.testing.assert_close(mixed[i], model(ids[i : i + 1], T=T, state_seed=[i + 1])[0])


def test_gradient_flows_only_through_the_last_k_loops():
    torch.manual_seed(4)
    model = ParcaeModel(tiny())
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 97, (2, 8))

    def grads(depths):
        model.zero_grad()
        logits = model(ids, depths=depths, state_seed=[1, 2])
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        return logits.detach(), model.injection.dt_bias.grad.clone()

    full_logits, full = grads(LoopDepths(torch.tensor([0, 0]), torch.tensor([4, 4])))
    trunc_logits, trunc = grads(LoopDepths(torch.tensor([3, 3]), torch.tensor([1, 1])))
    torch.testing.assert_close(full_logits, trunc_logits)  # same 4 loops forward
    assert not torch.allclose(full, trunc)  # different backward
    # with k=1 the gradient equals that of one loop started from the (detached) state after 3 loops
    model.zero_grad()
    with torch.no_grad():
        model(ids, T=3, state_seed=[1, 2])
    assert model.injection.dt_bias.grad is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=4, max_size=4), st.lists(st.floats(-10, 10), min_size=4, max_size=4))
def test_parcae_spectral_radius_below_one_for_any_parameters(dt, log_a):
    inj = DiagonalInjection(4, init_decay=0.5).double()
    with torch.no_grad():
        inj.dt_bias.copy_(torch.tensor(dt, dtype=torch.float64))
        inj.log_A.copy_(torch.tensor(log_a, dtype=torch.float64))
    decay = inj.decay().detach()
    assert float(decay.max()) < 1.0 and float(decay.min()) >= 0.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4, width=32), min_size=4, max_size=4),
    st.lists(st.floats(-80, 80, width=32), min_size=4, max_size=4),
)
def test_parcae_decay_never_exceeds_one_in_float32(dt, log_a):
    """In fp32 a decay can round up to exactly 1.0 for extreme (tiny Δ·A) parameters, but never above."""
    model = ParcaeModel(tiny(d_model=32))
    with torch.no_grad():
        model.injection.dt_bias[:4] = torch.tensor(dt)
        model.injection.log_A[:4] = torch.tensor(log_a)
    assert 0.0 <= model.spectral_radius() <= 1.0


def test_spectral_radius_of_each_variant():
    torch.manual_seed(5)
    assert ParcaeModel(tiny()).spectral_radius() == pytest.approx(math.sqrt(0.2), rel=1e-6)
    assert ParcaeModel(tiny(injection="additive")).spectral_radius() == 1.0
    linear = ParcaeModel(tiny(injection="linear"))
    w_x = linear.injection.proj.weight[:, :32].detach().double()
    assert linear.spectral_radius() == pytest.approx(float(torch.linalg.eigvals(w_x).abs().max()), rel=1e-6)
    with pytest.raises(ValueError, match="no loop"):
        ParcaeModel(tiny().fixed_depth_baseline()).spectral_radius()


@settings(max_examples=50, deadline=None)
@given(
    st.floats(1.1, 2.0),
    st.lists(st.floats(-8, 8), min_size=32, max_size=32),
    st.lists(st.floats(-8, 8), min_size=32, max_size=32),
    st.integers(0, 2**31),
)
def test_linearised_recurrence_explodes_unconstrained_and_stays_bounded_in_parcae(scale, dt, log_a, seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(4, 32, generator=g)
    h0 = 0.02 * torch.randn(4, 32, generator=g)
    steps = 200  # 1.1**200 ≈ 2e8
    # unconstrained (linear): learned W_x with spectral radius `scale` > 1
    linear = ParcaeModel(tiny(injection="linear"))
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    with torch.no_grad():
        linear.injection.proj.weight[:, :32] = scale * q
    assert linear.spectral_radius() == pytest.approx(scale, rel=1e-4)
    norms = linear.linearised_state_norms(e, h0, steps)
    assert float(norms[-1]) > 1e3 * float(norms[0]) or not math.isfinite(float(norms[-1]))
    # Parcae with arbitrary raw parameters: |h_t| <= max(|h_0|, |B̄e| / (1 - Ā)) elementwise, for every t
    parcae = ParcaeModel(tiny()).double()
    with torch.no_grad():
        parcae.injection.dt_bias.copy_(torch.tensor(dt))
        parcae.injection.log_A.copy_(torch.tensor(log_a))
        parcae.injection.B.copy_(torch.randn(32, 32, generator=g))
    with torch.no_grad():
        a, b = parcae.injection.transition()  # float64, like the module
    a = a.diagonal()
    bound = torch.maximum(h0.double().abs(), (e.double() @ b.T).abs() / (1 - a))
    h = h0.double()
    for _ in range(steps):
        h = parcae.loop_update(h, e.double())
        assert (h.abs() <= bound * (1 + 1e-9) + 1e-12).all()


def test_training_flops_accounting():
    c = get_config("sweep")
    base = c.fixed_depth_baseline()
    t = training_flops_per_token(base, 256, 0, 0)
    # a fixed-depth model: 6·(matmul params) + attention
    d = c.d_model
    matmul = 6 * 12 * d * d + c.vocab_size * d
    assert t == pytest.approx(6 * matmul + 3 * 2 * 256 * d * 6)
    ratio = expected_training_flops_per_token(c, 256) / t
    assert 1.8 < ratio < 2.5  # μ=8 loops of 2 blocks, 4 with gradient, vs 6 blocks with gradient
    assert training_flops_per_token(c, 256, 4, 4) > training_flops_per_token(c, 256, 0, 4)


# ----------------------------------------------------------------------------------------------------------------
# parcae-lm checkpoints


def their_state_dict(model: ParcaeModel) -> dict[str, torch.Tensor]:
    """The model's weights under parcae-lm's key names (written out by hand, independent of the mapping code)."""
    c, ours = model.config, model.state_dict()
    out = {
        "transformer.wte.weight": ours["embed.weight"],
        "lm_head.weight": ours["embed.weight"],
        "transformer.ln_f.weight": ours["final_norm.weight"],
        "freqs_cis": torch.zeros(1, 32, 1, 4, 2),
    }
    block_names = {
        "norm_1": "attn_norm",
        "attn.c_q": "attn.wq",
        "attn.c_k": "attn.wk",
        "attn.c_v": "attn.wv",
        "attn.c_proj": "attn.wo",
        "attn.ve_gate": "attn.ve_gate",
        "norm_2": "mlp_norm",
        "mlp.fc": "mlp.up",
        "mlp.proj": "mlp.down",
    }
    stages = [("prelude", "prelude", c.n_prelude), ("core_block", "core", c.n_core), ("coda", "coda", c.n_coda)]
    if not c.is_looped:
        stages = [("h", "prelude", c.n_prelude)]
    for theirs, mine, n in stages:
        for i in range(n):
            for t, m in block_names.items():
                if f"{mine}.{i}.{m}.weight" in ours:
                    out[f"transformer.{theirs}.{i}.{t}.weight"] = ours[f"{mine}.{i}.{m}.weight"]
    if c.is_looped:
        out["transformer.ln_prelude.weight"] = ours["prelude_norm.weight"]
        out["transformer.C.weight"] = ours["readout.weight"]
        if c.injection == "parcae":
            out["transformer.adapter.A_log"] = ours["injection.log_A"]
            out["transformer.adapter.dt_bias"] = ours["injection.dt_bias"]
            out["transformer.adapter.B"] = ours["injection.B"]
        elif c.injection == "linear":
            out["transformer.adapter.adapter.weight"] = ours["injection.proj.weight"]
    for k, v in ours.items():
        if k.startswith("value_embeds."):
            out[k] = v
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("injection", ["parcae", "linear", "additive"])
def test_loads_parcae_lm_state_dict(injection):
    torch.manual_seed(6)
    config = tiny(injection=injection, value_embeddings=True, n_core=2)
    source = ParcaeModel(config)
    for p in source.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    target = load_parcae_lm_state_dict(ParcaeModel(config), their_state_dict(source))
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(target(ids, T=3, state_seed=7), source(ids, T=3, state_seed=7))


def test_loads_parcae_lm_gpt_baseline():
    torch.manual_seed(7)
    config = tiny(value_embeddings=True).fixed_depth_baseline()
    source = ParcaeModel(config)
    for p in source.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    target = load_parcae_lm_state_dict(ParcaeModel(config), {"model": their_state_dict(source)})
    ids = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(target(ids), source(ids))


def test_parcae_lm_injection_formula():
    """Their DiagonalInjection: x * exp(-softplus(dt_bias) * exp(A_log)) + softplus(dt_bias) * (e @ B.T)."""
    torch.manual_seed(8)
    model = ParcaeModel(tiny())
    sd = their_state_dict(model)
    sd["transformer.adapter.A_log"] = torch.randn(32)
    sd["transformer.adapter.dt_bias"] = torch.randn(32)
    sd["transformer.adapter.B"] = torch.randn(32, 32)
    load_parcae_lm_state_dict(model, sd)
    x, e = torch.randn(3, 32), torch.randn(3, 32)
    dt = F.softplus(sd["transformer.adapter.dt_bias"])
    expected = x * torch.exp(-dt * sd["transformer.adapter.A_log"].exp()) + dt * (e @ sd["transformer.adapter.B"].T)
    torch.testing.assert_close(model.loop_update(x, e), expected)


def test_checkpoint_mapping_errors():
    model = ParcaeModel(tiny())
    sd = their_state_dict(model)
    with pytest.raises(CheckpointMappingError, match="cannot map"):
        load_parcae_lm_state_dict(ParcaeModel(tiny()), sd | {"transformer.mystery.weight": torch.zeros(1)})
    with pytest.raises(CheckpointMappingError, match="shape"):
        load_parcae_lm_state_dict(ParcaeModel(tiny()), sd | {"transformer.C.weight": torch.zeros(3, 3)})
    missing = dict(sd)
    del missing["transformer.coda.0.mlp.fc.weight"]
    with pytest.raises(CheckpointMappingError, match="missing"):
        load_parcae_lm_state_dict(ParcaeModel(tiny()), missing)
    with pytest.raises(CheckpointMappingError, match="value embeddings"):
        load_parcae_lm_state_dict(ParcaeModel(tiny(value_embeddings=True)), sd)


def test_config_from_parcae_lm_and_load_from_folder(tmp_path):
    their_140m = {
        "name": "parcae-small-140m",
        "block_size": 2048,
        "vocab_size": 32768,
        "padded_vocab_size": 32768,
        "n_embd": 768,
        "num_attention_heads": 6,
        "num_key_value_heads": 6,
        "intermediate_size": 3072,
        "bias": False,
        "tie_embeddings": True,
        "block_class_name": "TransformerPreNormBlock",
        "norm_class_name": "RMSNorm",
        "norm_eps": 1e-5,
        "mlp_class_name": "BaseMLP",
        "nonlin_name": "ReLU2",
        "qk_norm": True,
        "logit_softcap": None,
        "prelude_norm": True,
        "injection_type": "diagonal",
        "state_init": "like-init",
        "recurrent_embedding_dimension": 768,
        "n_layers_in_recurrent_block": 2,
        "n_layers_in_prelude": 2,
        "n_layers_in_coda": 2,
        "mean_recurrence": 8,
        "mean_backprop_depth": 4,
        "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000},
    }
    config = config_from_parcae_lm(their_140m, value_embeddings=True)
    ref = PAPER_CONFIGS["parcae-140m"]
    for field in (
        "vocab_size",
        "d_model",
        "n_heads",
        "n_prelude",
        "n_core",
        "n_coda",
        "ffn_size",
        "injection",
        "mean_recurrence",
        "backprop_depth",
        "rope_theta",
        "max_seq_len",
    ):
        assert getattr(config, field) == getattr(ref, field), field
    with pytest.raises(ValueError, match="nonlin_name"):
        config_from_parcae_lm(their_140m | {"nonlin_name": "GELU"})

    import json

    small = tiny(value_embeddings=True)
    source = ParcaeModel(small)
    torch.save(their_state_dict(source), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(
        json.dumps(
            their_140m
            | {
                "vocab_size": 97,
                "padded_vocab_size": 97,
                "n_embd": 32,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 128,
                "block_size": 32,
                "recurrent_embedding_dimension": 32,
                "n_layers_in_prelude": 1,
                "n_layers_in_coda": 1,
                "mean_recurrence": 3,
                "mean_backprop_depth": 2,
                "rope_settings": {"use_rope": True, "rope_condense_ratio": 1, "rope_base": 50000.0},
            }
        )
    )
    loaded = load_parcae_lm(tmp_path)
    assert loaded.config.value_embeddings and loaded.lm_head.weight is loaded.embed.weight
    ids = torch.randint(0, 97, (1, 12))
    torch.testing.assert_close(loaded(ids, T=2, state_seed=3), source.eval()(ids, T=2, state_seed=3))


def test_bf16_model_runs_without_autocast():
    model = ParcaeModel(replace(tiny(), injection="parcae")).to(torch.bfloat16)
    logits = model(torch.randint(0, 97, (2, 6)), T=2)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
