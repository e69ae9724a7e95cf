"""Parcae: a stable looped language model (Prairie, Novack, Berg-Kirkpatrick, Fu; arXiv 2604.12946).

A prelude of transformer blocks embeds the tokens; its RMS-normalised output e is injected into a loop state h that
one core block stack refines T times; a linear readout C and a coda of blocks turn the final state into logits:

    e   = RMSNorm(prelude(embed(tokens)))
    h_0 ~ TruncNormal(0, σ²)                         (seeded per sequence and position, see `initial_state`)
    h_t = core(Ā h_{t-1} + B̄ e)                      t = 1..T   (core = residual blocks, so h_t = u + R(u))
    y   = lm_head(RMSNorm(coda(C h_T)))

Ā, B̄ depend on the injection variant:
    parcae    Ā = exp(Δ·A), A = -exp(log_A) diagonal, Δ = softplus(dt_bias), B̄ = Δ·B   →  ρ(Ā) < 1 by construction
    linear    [Ā B̄] = W of a learned Linear(2d → d) over concat(h, e)  (recurrent-depth models)  →  ρ unconstrained
    additive  Ā = I, B̄ = I                                                              →  ρ = 1, marginally stable

Training samples the number of loops per sequence, total ~ max(1, Poisson(μ)), and backpropagates through the last
k = min(total, backprop_depth) loops only (earlier loops run under no_grad). Inference uses a fixed T.

With n_core == 0 the same class is the fixed-depth transformer baseline (same blocks, no loop).

Block details follow the reference implementation (parcae-lm): pre-norm blocks, q/k with interleaved-pair RoPE then
a weightless RMS norm, ReLU² MLP (0.5·relu(x)²), optional value embeddings (nanochat style) on alternating layers,
tied embeddings. `load_parcae_lm_state_dict` maps their checkpoint key names onto ours.

For serving, `virtual_layers(T)` lists the unrolled layer sequence (prelude, T copies of the core, coda) with one KV
slot per entry, and `loop_update` is the step that happens before the first core block of every loop.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.norm import RMSNorm

INJECTIONS = ("parcae", "linear", "additive")
DEPTH_SAMPLING = ("per-sequence", "per-batch")
VALUE_EMBED_GATE_CHANNELS = 32

# attend(q, k, v) -> out: q [..., L, H, D], k/v [..., S, Hkv, D] -> [..., L, H, D]. The engine passes one that
# reads/writes its paged KV cache for a given virtual layer; the default is causal attention over the given tokens.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class ParcaeConfig:
    vocab_size: int = 32768
    d_model: int = 768
    n_heads: int = 6
    n_kv_heads: int | None = None  # None: same as n_heads (see num_kv_heads)
    n_prelude: int = 2
    n_core: int = 2  # 0: fixed-depth transformer (the baseline)
    n_coda: int = 2
    mlp_ratio: float = 4.0
    intermediate_size: int | None = None  # overrides mlp_ratio when given
    max_seq_len: int = 2048
    injection: str = "parcae"
    mean_recurrence: int = 8  # μ: mean loop count in training, default T at inference
    backprop_depth: int = 4  # k: loops with gradient (the last ones)
    depth_sampling: str = "per-sequence"
    state_init_std: float | None = None  # None: sqrt(2 / (5 d)), the reference's embedding std (≈0.023 at d=768)
    init_decay: float = math.sqrt(1.0 / 5.0)  # Ā at initialisation (parcae injection)
    rope_theta: float = 50000.0
    tie_embeddings: bool = True
    value_embeddings: bool = False
    qk_norm: bool = True
    norm_eps: float = 1e-5
    orthogonal_init: bool = True
    name: str = "custom"

    def __post_init__(self) -> None:
        for attr in ("vocab_size", "d_model", "n_heads", "num_kv_heads", "max_seq_len", "mean_recurrence"):
            if getattr(self, attr) < 1:
                raise ValueError(f"{attr} must be >= 1, got {getattr(self, attr)}")
        for attr in ("n_prelude", "n_core", "n_coda"):
            if getattr(self, attr) < 0:
                raise ValueError(f"{attr} must be >= 0, got {getattr(self, attr)}")
        if self.n_layers == 0:
            raise ValueError("the model needs at least one layer")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.num_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {self.head_dim}")
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {self.injection!r}")
        if self.depth_sampling not in DEPTH_SAMPLING:
            raise ValueError(f"depth_sampling must be one of {DEPTH_SAMPLING}, got {self.depth_sampling!r}")
        if not 1 <= self.backprop_depth:
            raise ValueError(f"backprop_depth must be >= 1, got {self.backprop_depth}")
        if not 0.0 < self.init_decay < 1.0:
            raise ValueError(f"init_decay must be in (0, 1), got {self.init_decay}")
        if self.value_embeddings and self.d_model < VALUE_EMBED_GATE_CHANNELS:
            raise ValueError(f"value embeddings need d_model >= {VALUE_EMBED_GATE_CHANNELS}")

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or round(self.mlp_ratio * self.d_model)

    @property
    def n_layers(self) -> int:
        """Distinct blocks (parameters), not the unrolled depth."""
        return self.n_prelude + self.n_core + self.n_coda

    @property
    def is_looped(self) -> bool:
        return self.n_core > 0

    @property
    def resolved_state_std(self) -> float:
        return self.state_init_std if self.state_init_std is not None else math.sqrt(2.0 / (5.0 * self.d_model))

    def effective_depth(self, T: int | None = None) -> int:
        """Blocks run per token at T loops; also the number of KV cache layers a server needs."""
        T = self.mean_recurrence if T is None else T
        return self.n_prelude + self.n_core * T + self.n_coda if self.is_looped else self.n_layers

    def fixed_depth_baseline(self) -> ParcaeConfig:
        """A transformer with the same blocks and width and no loop: parameters match up to the injection/readout."""
        return replace(self, n_prelude=self.n_layers, n_core=0, n_coda=0, name=f"{self.name}-transformer")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ParcaeConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown ParcaeConfig fields: {sorted(unknown)}")
        return cls(**values)


def _family(name: str, d: int, heads: int, layers: int) -> ParcaeConfig:
    return ParcaeConfig(
        name=name,
        vocab_size=32768,
        d_model=d,
        n_heads=heads,
        n_prelude=layers,
        n_core=layers,
        n_coda=layers,
        mlp_ratio=4.0,
        max_seq_len=2048,
        mean_recurrence=8,
        backprop_depth=4,
        value_embeddings=True,
    )


# The paper's family (prelude/core/coda layers, width, heads as in the parcae-lm launch configs; T = 8).
# Parameter counts include the value embeddings, which is how the nominal sizes come out (see tests).
PAPER_CONFIGS: dict[str, ParcaeConfig] = {
    "parcae-140m": _family("parcae-140m", 768, 6, 2),
    "parcae-370m": _family("parcae-370m", 1024, 8, 4),
    "parcae-770m": _family("parcae-770m", 1280, 10, 6),
    "parcae-1.3b": _family("parcae-1.3b", 1536, 12, 8),
}

# Small configurations for the studies: `sweep` trains in well under a minute per run on one H100; `tiny` on a CPU.
STUDY_CONFIGS: dict[str, ParcaeConfig] = {
    "sweep": ParcaeConfig(
        name="sweep",
        vocab_size=8192,
        d_model=256,
        n_heads=4,
        n_prelude=2,
        n_core=2,
        n_coda=2,
        max_seq_len=256,
        mean_recurrence=8,
        backprop_depth=4,
    ),
    "tiny": ParcaeConfig(
        name="tiny",
        vocab_size=512,
        d_model=64,
        n_heads=2,
        n_prelude=1,
        n_core=1,
        n_coda=1,
        max_seq_len=64,
        mean_recurrence=4,
        backprop_depth=2,
    ),
}


def get_config(name: str, **overrides: Any) -> ParcaeConfig:
    """A named configuration; `transformer-<name>` gives the matching fixed-depth baseline."""
    baseline = name.startswith("transformer-")
    key = name.removeprefix("transformer-")
    table = PAPER_CONFIGS | STUDY_CONFIGS
    if key not in table:
        names = sorted(table) + [f"transformer-{n}" for n in sorted(table)]
        raise ValueError(f"unknown model config {name!r}; choose one of {', '.join(names)}")
    config = replace(table[key], **overrides)
    return config.fixed_depth_baseline() if baseline else config


# ----------------------------------------------------------------------------------------------------------------
# Blocks


def _rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates consecutive pairs (x[2i], x[2i+1]) as complex numbers, in fp32 (the parcae-lm convention; Llama's
    tokenmill.layers.rotary pairs the two halves instead). x [..., L, H, D]; cos/sin [..., L, 1, D/2]."""
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((real * cos - imag * sin, imag * cos + real * sin), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full causal attention over the given tokens: q [B, L, H, D], k/v [B, L, Hkv, D] -> [B, L, H, D]."""
    groups = q.shape[-2] // k.shape[-2]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=-2)
        v = v.repeat_interleave(groups, dim=-2)
    out = F.scaled_dot_product_attention(q.transpose(-3, -2), k.transpose(-3, -2), v.transpose(-3, -2), is_causal=True)
    return out.transpose(-3, -2)


class Attention(nn.Module):
    def __init__(self, config: ParcaeConfig, value_embedding: bool) -> None:
        super().__init__()
        hd = config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.num_kv_heads, hd
        self.qk_norm = config.qk_norm
        self.wq = nn.Linear(config.d_model, config.n_heads * hd, bias=False)
        self.wk = nn.Linear(config.d_model, config.num_kv_heads * hd, bias=False)
        self.wv = nn.Linear(config.d_model, config.num_kv_heads * hd, bias=False)
        self.wo = nn.Linear(config.n_heads * hd, config.d_model, bias=False)
        # Gate of the value embedding: 2·sigmoid(W x[:32]) per KV head, so it starts at 1 with W = 0.
        self.ve_gate = (
            nn.Linear(VALUE_EMBED_GATE_CHANNELS, config.num_kv_heads, bias=False) if value_embedding else None
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = self.wq(x).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.wk(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.wv(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        if self.ve_gate is not None:
            if value_embed is None:
                raise ValueError("this layer has a value embedding; pass it")
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VALUE_EMBED_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * value_embed.unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k = apply_rope_interleaved(q, cos, sin), apply_rope_interleaved(k, cos, sin)
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        return self.wo(attend(q, k, v).flatten(-2))


class ReluSquaredMLP(nn.Module):
    def __init__(self, config: ParcaeConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.d_model, config.ffn_size, bias=False)
        self.down = nn.Linear(config.ffn_size, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(0.5 * F.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, config: ParcaeConfig, value_embedding: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.attn = Attention(config, value_embedding)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = ReluSquaredMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend = causal_attention,
        value_embed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, attend, value_embed)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------------------------------------------
# Injection: h <- Ā h + B̄ e


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class DiagonalInjection(nn.Module):
    """Parcae: Ā = exp(Δ·A) with A = -exp(log_A) and Δ = softplus(dt_bias), B̄ = Δ·B. Ā is diagonal with entries in
    (0, 1) for any real log_A, dt_bias (exactly: in floating point an entry can round up to 1.0, never above)."""

    def __init__(self, d: int, init_decay: float) -> None:
        super().__init__()
        self.init_decay = init_decay
        self.log_A = nn.Parameter(torch.zeros(d))
        self.dt_bias = nn.Parameter(torch.zeros(d))
        self.B = nn.Parameter(torch.eye(d))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.log_A.is_meta:
            return
        # A = -1 and Δ = -log(decay), so Ā starts at `init_decay` in every channel; B starts at the identity.
        self.log_A.zero_()
        dt = torch.full_like(self.dt_bias, -math.log(self.init_decay))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.B.copy_(torch.eye(self.B.shape[0], dtype=self.B.dtype, device=self.B.device))

    def step_size(self) -> torch.Tensor:
        return F.softplus(_at_least_fp32(self.dt_bias))

    def decay(self) -> torch.Tensor:
        """Ā's diagonal."""
        return torch.exp(-self.step_size() * torch.exp(_at_least_fp32(self.log_A)))

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h * self.decay().to(h.dtype) + self.step_size().to(e.dtype) * F.linear(e, self.B)

    def transition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ā, B̄) as dense matrices."""
        return torch.diag(self.decay()), self.step_size()[:, None] * _at_least_fp32(self.B)


class LinearInjection(nn.Module):
    """Recurrent-depth models (Huginn): h <- W [h; e]; Ā = W[:, :d] and B̄ = W[:, d:] are unconstrained."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d
        self.proj = nn.Linear(2 * d, d, bias=False)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.cat((h.to(e.dtype), e), dim=-1))

    def transition(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.proj.weight.float()
        return w[:, : self.d], w[:, self.d :]


class AdditiveInjection(nn.Module):
    """h <- h + e: Ā = B̄ = I, marginally stable (ρ = 1)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.d = d

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + e

    def transition(self) -> tuple[torch.Tensor, torch.Tensor]:
        eye = torch.eye(self.d)
        return eye, eye


def _make_injection(config: ParcaeConfig) -> nn.Module:
    if config.injection == "parcae":
        return DiagonalInjection(config.d_model, config.init_decay)
    if config.injection == "linear":
        return LinearInjection(config.d_model)
    return AdditiveInjection(config.d_model)


# ----------------------------------------------------------------------------------------------------------------
# Initial state: a deterministic function of (sequence seed, position, channel)

_MASK16, _MASK32 = 0xFFFF, 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, without ever overflowing int64."""
    lo = (x & _MASK16) * c
    hi = (((x >> 16) * c) & _MASK16) << 16
    return (lo + hi) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # "lowbias32" integer hash (C. Wellons): a bijection on uint32 with good avalanche.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_TRUNC = 3.0
_PHI_LO = 0.5 * math.erfc(_TRUNC / math.sqrt(2.0))  # Φ(-3)


def seeded_truncated_normal(
    seeds: torch.Tensor, positions: torch.Tensor, dim: int, std: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """N(0, std²) truncated to ±3 std, as a pure function of (seed, position, channel): [B, L, dim].

    seeds [B] int64; positions [L] or [B, L]. A token's initial state does not depend on how the sequence is split
    into chunks or steps, so a server decoding one token at a time reproduces the full-sequence forward exactly.
    """
    seeds = seeds.to(torch.int64)
    positions = positions.to(device=seeds.device, dtype=torch.int64)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    key = _mix32(_mix32(seeds & _MASK32) ^ _mix32((seeds >> 32) & _MASK32) ^ 0x5BD1E995)
    key = _mix32(key[:, None] ^ (positions & _MASK32))  # [B, L]
    channels = torch.arange(dim, device=seeds.device, dtype=torch.int64)
    bits = _mix32(_mix32(key[..., None] ^ channels) + 0x9E3779B9 & _MASK32)  # [B, L, dim]
    uniform = ((bits >> 8).to(torch.float64) + 0.5) / float(1 << 24)  # (0, 1), 24 bits
    p = _PHI_LO + (1.0 - 2.0 * _PHI_LO) * uniform  # inverse-CDF sampling restricted to [Φ(-3), Φ(3)]
    normal = math.sqrt(2.0) * torch.erfinv(2.0 * p - 1.0)
    return (std * normal).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The model


class LoopDepths(NamedTuple):
    """Loops per sequence in training: the first `no_grad` run without gradient, the last `with_grad` with it."""

    no_grad: torch.Tensor  # [B] int64
    with_grad: torch.Tensor  # [B] int64

    @property
    def total(self) -> torch.Tensor:
        return self.no_grad + self.with_grad


@dataclass(frozen=True)
class VirtualLayer:
    """One entry of the unrolled layer sequence at a fixed T; `index` is its KV cache layer."""

    index: int
    stage: str  # "prelude" | "core" | "coda"
    block: int  # index into that stage's ModuleList
    layer_id: int  # compact layer id (value embedding key): prelude i -> i, core i -> p+i, coda i -> p+c+i
    loop: int | None = None  # 0..T-1 for core layers
    starts_loop: bool = False  # apply `loop_update(h, e)` before this block (first core block of a loop)


@dataclass
class LoopStats:
    """Recorded by every forward of a looped model (detached)."""

    state_norms: torch.Tensor  # [loops] mean over tokens of ||h_t||₂ after loop t
    depths: LoopDepths | None = None


class ParcaeModel(nn.Module):
    def __init__(self, config: ParcaeConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.prelude = nn.ModuleList(Block(c, self._has_value_embed(i)) for i in range(c.n_prelude))
        if c.is_looped:
            self.prelude_norm = RMSNorm(c.d_model, eps=c.norm_eps)
            self.injection = _make_injection(c)
            self.core = nn.ModuleList(Block(c, self._has_value_embed(c.n_prelude + i)) for i in range(c.n_core))
            self.readout = nn.Linear(c.d_model, c.d_model, bias=False)  # C
        self.coda = nn.ModuleList(Block(c, self._has_value_embed(c.n_prelude + c.n_core + i)) for i in range(c.n_coda))
        self.final_norm = RMSNorm(c.d_model, eps=c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        kv_dim = c.num_kv_heads * c.head_dim
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(c.vocab_size, kv_dim) for i in range(c.n_layers) if self._has_value_embed(i)}
        )
        cos, sin = _rope_tables(c.head_dim, c.max_seq_len, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.last_stats: LoopStats | None = None
        self.reset_parameters()

    def _has_value_embed(self, layer_id: int) -> bool:
        # Alternating layers, always including the last one (parcae-lm / nanochat convention).
        return self.config.value_embeddings and layer_id % 2 == (self.config.n_layers - 1) % 2

    # -- initialisation ("scaled-zero" in parcae-lm: std sqrt(2/5d), output projections zero) --------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.embed.weight.is_meta:
            return
        c = self.config
        std = math.sqrt(2.0 / (5.0 * c.d_model))

        def matrix(w: torch.Tensor) -> None:
            if c.orthogonal_init:
                # singular values all std·sqrt(max(rows, cols)): same scale as a Gaussian of entry std `std`
                nn.init.orthogonal_(w, gain=std * math.sqrt(max(w.shape)))
            else:
                nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)

        matrix(self.embed.weight)
        for blocks in self._stages().values():
            for block in blocks:
                for w in (block.attn.wq.weight, block.attn.wk.weight, block.attn.wv.weight, block.mlp.up.weight):
                    matrix(w)
                block.attn.wo.weight.zero_()
                block.mlp.down.weight.zero_()
                if block.attn.ve_gate is not None:
                    block.attn.ve_gate.weight.zero_()
                block.attn_norm.weight.fill_(1.0)
                block.mlp_norm.weight.fill_(1.0)
        for table in self.value_embeds.values():
            nn.init.trunc_normal_(table.weight, std=std, a=-3 * std, b=3 * std)
        if c.is_looped:
            matrix(self.readout.weight)
            self.prelude_norm.weight.fill_(1.0)
            if isinstance(self.injection, LinearInjection):
                w = self.injection.proj.weight
                nn.init.trunc_normal_(w, std=std, a=-3 * std, b=3 * std)
            elif isinstance(self.injection, DiagonalInjection):
                self.injection.reset_parameters()
        self.final_norm.weight.fill_(1.0)
        if not c.tie_embeddings:
            matrix(self.lm_head.weight)

    def _stages(self) -> dict[str, nn.ModuleList]:
        stages = {"prelude": self.prelude}
        if self.config.is_looped:
            stages["core"] = self.core
        stages["coda"] = self.coda
        return stages

    def no_weight_decay_parameters(self) -> set[str]:
        """Names of parameters the optimizer should not decay (the loop's dynamical-system parameters and C)."""
        names = {n for n, p in self.named_parameters() if p.dim() < 2}
        if self.config.is_looped:
            names |= {n for n, _ in self.injection.named_parameters(prefix="injection")}
            names.add("readout.weight")
        return names

    # -- pieces (shared by forward and the serving engine) ----------------------------------------------------

    def rope(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [*positions.shape, 1, head_dim/2] for any positions tensor (flattened or batched)."""
        # (checked on CPU only: on a GPU the check would cost a device sync per step)
        if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds max_seq_len {self.config.max_seq_len}")
        return self.rope_cos[positions].unsqueeze(-2).to(dtype), self.rope_sin[positions].unsqueeze(-2).to(dtype)

    def reset_rope_tables(self) -> None:
        """Recomputes the RoPE tables in fp32 on the embedding's device: after to_empty() (loading) or a cast of the
        whole model to bf16/fp16, which would otherwise round the angles of late positions."""
        cos, sin = _rope_tables(self.config.head_dim, self.config.max_seq_len, self.config.rope_theta)
        device = self.embed.weight.device
        self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)

    def value_embed(self, layer_id: int, input_ids: torch.Tensor) -> torch.Tensor | None:
        key = str(layer_id)
        return self.value_embeds[key](input_ids) if key in self.value_embeds else None

    def block_of(self, layer: VirtualLayer) -> Block:
        return self._stages()[layer.stage][layer.block]

    def virtual_layers(self, T: int | None = None) -> list[VirtualLayer]:
        """The unrolled layer sequence at T loops: prelude, T copies of the core, coda; one KV layer each."""
        c = self.config
        T = c.mean_recurrence if T is None else T
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        layers = [VirtualLayer(i, "prelude", i, i) for i in range(c.n_prelude)]
        for t in range(T if c.is_looped else 0):
            for i in range(c.n_core):
                layers.append(VirtualLayer(len(layers), "core", i, c.n_prelude + i, loop=t, starts_loop=i == 0))
        base = c.n_prelude + c.n_core
        layers += [VirtualLayer(len(layers), "coda", i, base + i) for i in range(c.n_coda)]
        return layers

    def begin_recurrence(
        self, x: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prelude output [..., L, d] -> (h_0, e). seeds [B] for x [B, L, d] (or [N] with x [N, d], one per token)."""
        e = self.prelude_norm(x)
        std = self.config.resolved_state_std
        seeds, positions = seeds.to(x.device), positions.to(x.device)
        if x.dim() == 2:  # flattened tokens: one seed and one position per token
            h0 = seeded_truncated_normal(seeds, positions.reshape(-1, 1), self.config.d_model, std).squeeze(1)
        else:
            h0 = seeded_truncated_normal(seeds, positions, self.config.d_model, std)
        return h0.to(dtype=e.dtype), e

    def loop_update(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """The injection applied before the first core block of every loop: Ā h + B̄ e."""
        return self.injection(h, e)

    def end_recurrence(self, h: torch.Tensor) -> torch.Tensor:
        return self.readout(h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(x)).float()

    def seeds_for(self, state_seed: int | Sequence[int] | torch.Tensor | None, batch: int) -> torch.Tensor:
        if state_seed is None:
            state_seed = 0
        if isinstance(state_seed, int):
            return torch.full((batch,), state_seed, dtype=torch.int64)
        seeds = torch.as_tensor(state_seed, dtype=torch.int64).reshape(-1).cpu()
        if seeds.numel() != batch:
            raise ValueError(f"state_seed has {seeds.numel()} entries for a batch of {batch}")
        return seeds

    # -- forward ----------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        T: int | None = None,
        state_seed: int | Sequence[int] | torch.Tensor | None = None,
        depths: LoopDepths | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, L, vocab] (fp32) for input_ids [B, L].

        Inference: T loops (default μ) for every sequence, initial state from `state_seed` (an int for all sequences
        or one per sequence; default 0), so the output is deterministic. Training: pass `depths` (sample_depths).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        c = self.config
        if positions is None:
            positions = torch.arange(L, device=input_ids.device)
        cos, sin = self.rope(positions)
        x = self.embed(input_ids)
        for i, block in enumerate(self.prelude):
            x = block(x, cos, sin, causal_attention, self.value_embed(i, input_ids))
        if c.is_looped:
            if T is not None and depths is not None:
                raise ValueError("pass either T (inference) or depths (training), not both")
            h, e = self.begin_recurrence(x, self.seeds_for(state_seed, B), positions)
            core_ves = [self.value_embed(c.n_prelude + i, input_ids) for i in range(c.n_core)]
            if depths is None:
                T = c.mean_recurrence if T is None else T
                if T < 1:
                    raise ValueError(f"T must be >= 1, got {T}")
                h = self._recur_fixed(h, e, T, cos, sin, core_ves)
            else:
                h = self._recur_sampled(h, e, depths, cos, sin, core_ves)
            x = self.end_recurrence(h)
        base = c.n_prelude + c.n_core
        for i, block in enumerate(self.coda):
            x = block(x, cos, sin, causal_attention, self.value_embed(base + i, input_ids))
        return self.logits(x)

    def _core_pass(self, h, e, cos, sin, core_ves) -> torch.Tensor:
        h = self.loop_update(h, e)
        for block, ve in zip(self.core, core_ves, strict=True):
            h = block(h, cos, sin, causal_attention, ve)
        return h

    def _recur_fixed(self, h, e, T, cos, sin, core_ves) -> torch.Tensor:
        norms = []
        for _ in range(T):
            h = self._core_pass(h, e, cos, sin, core_ves)
            norms.append(h.detach().float().norm(dim=-1).mean())
        self.last_stats = LoopStats(torch.stack(norms))
        return h

    def _recur_sampled(self, h, e, depths: LoopDepths, cos, sin, core_ves) -> torch.Tensor:
        """Per-sequence depths: a sequence's state stops changing once its own loop count is reached (the batch runs
        max(no_grad) then max(with_grad) loops), so each sequence sees exactly its sampled depth."""
        n_cpu, k_cpu = depths.no_grad.cpu(), depths.with_grad.cpu()
        uniform = bool((n_cpu == n_cpu[0]).all() and (k_cpu == k_cpu[0]).all())
        no_grad, with_grad = n_cpu.to(h.device, non_blocking=True), k_cpu.to(h.device, non_blocking=True)
        norms = []

        def step(h: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            new = self._core_pass(h, e, cos, sin, core_ves)
            out = new if uniform else torch.where(active[:, None, None], new, h.to(new.dtype))
            norms.append(out.detach().float().norm(dim=-1).mean())
            return out

        with torch.no_grad():
            for t in range(int(n_cpu.max())):
                h = step(h, no_grad > t)
        for t in range(int(k_cpu.max())):
            h = step(h, with_grad > t)
        self.last_stats = LoopStats(torch.stack(norms) if norms else torch.zeros(0), depths)
        return h

    # -- training helpers -------------------------------------------------------------------------------------

    def sample_depths(self, batch: int, generator: torch.Generator | None = None) -> LoopDepths:
        """total ~ max(1, Poisson(μ)) per sequence (or one draw for the batch), with_grad = min(total, k)."""
        c = self.config
        n = batch if c.depth_sampling == "per-sequence" else 1
        total = torch.poisson(torch.full((n,), float(c.mean_recurrence)), generator=generator).long().clamp_(min=1)
        with_grad = total.clamp(max=c.backprop_depth)
        no_grad = total - with_grad
        if n == 1:
            no_grad, with_grad = no_grad.expand(batch).clone(), with_grad.expand(batch).clone()
        return LoopDepths(no_grad, with_grad)

    @torch.no_grad()
    def injection_transition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ā, B̄) of the linearised loop h <- Ā h + B̄ e, as dense fp32 matrices on the CPU."""
        if not self.config.is_looped:
            raise ValueError("a fixed-depth model has no loop")
        a, b = self.injection.transition()
        return a.detach().float().cpu(), b.detach().float().cpu()

    @torch.no_grad()
    def spectral_radius(self) -> float:
        """ρ(Ā) = max |eigenvalue| of the loop's state transition."""
        if not self.config.is_looped:
            raise ValueError("a fixed-depth model has no loop")
        if isinstance(self.injection, DiagonalInjection):
            return float(self.injection.decay().abs().max())
        if isinstance(self.injection, AdditiveInjection):
            return 1.0
        a, _ = self.injection_transition()
        if not torch.isfinite(a).all():
            return float("nan")
        return float(torch.linalg.eigvals(a.double()).abs().max())

    @torch.no_grad()
    def linearised_state_norms(self, e: torch.Tensor, h0: torch.Tensor, steps: int) -> torch.Tensor:
        """||h_t|| for t = 1..steps of h_t = Ā h_{t-1} + B̄ e, i.e. the loop with the core dropped."""
        norms, h = [], h0
        for _ in range(steps):
            h = self.loop_update(h, e)
            norms.append(h.float().norm(dim=-1).max())
        return torch.stack(norms)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are one Parameter, counted once


def training_flops_per_token(config: ParcaeConfig, seq_len: int, no_grad: float, with_grad: float) -> float:
    """Matmul FLOPs per training token (forward + backward), the reference implementation's accounting:
    6·P for blocks outside the loop and the head; per loop 2·P_loop forward, plus 4·P_loop backward for the loops
    with gradient; causal attention scores add 2·L·d forward per layer pass (L = seq_len)."""
    c = config
    d, f, hd = c.d_model, c.ffn_size, c.head_dim
    block = d * (c.n_heads * hd) * 2 + d * (c.num_kv_heads * hd) * 2 + 2 * d * f
    attn_fwd = 2.0 * seq_len * c.n_heads * hd  # QKᵀ and AV, causal: half of 2·2·L·d
    outside = (c.n_prelude + c.n_coda) * block + c.vocab_size * d + (d * d if c.is_looped else 0)
    flops = 6.0 * outside + 3.0 * attn_fwd * (c.n_prelude + c.n_coda)
    if c.is_looped:
        injection = {"parcae": d * d, "linear": 2 * d * d, "additive": 0}[c.injection]
        per_loop = c.n_core * block + injection
        per_loop_attn = c.n_core * attn_fwd
        flops += (no_grad + with_grad) * (2.0 * per_loop + per_loop_attn)
        flops += with_grad * (4.0 * per_loop + 2.0 * per_loop_attn)
    return flops


def expected_training_flops_per_token(config: ParcaeConfig, seq_len: int) -> float:
    """`training_flops_per_token` at the expected depths of max(1, Poisson(μ)) with k = min(total, backprop_depth)."""
    if not config.is_looped:
        return training_flops_per_token(config, seq_len, 0.0, 0.0)
    mu, k = config.mean_recurrence, config.backprop_depth
    # E[min(N, k)] and E[max(N, 1)] for N ~ Poisson(μ)
    pmf = [math.exp(-mu)]
    for n in range(1, 20 * mu + 50):
        pmf.append(pmf[-1] * mu / n)
    e_total = sum(max(n, 1) * p for n, p in enumerate(pmf))
    e_grad = sum(min(max(n, 1), k) * p for n, p in enumerate(pmf))
    return training_flops_per_token(config, seq_len, e_total - e_grad, e_grad)


# ----------------------------------------------------------------------------------------------------------------
# parcae-lm checkpoints

_BLOCK_RENAMES = {
    "norm_1.weight": "attn_norm.weight",
    "attn.c_q.weight": "attn.wq.weight",
    "attn.c_k.weight": "attn.wk.weight",
    "attn.c_v.weight": "attn.wv.weight",
    "attn.c_proj.weight": "attn.wo.weight",
    "attn.ve_gate.weight": "attn.ve_gate.weight",
    "norm_2.weight": "mlp_norm.weight",
    "mlp.fc.weight": "mlp.up.weight",
    "mlp.proj.weight": "mlp.down.weight",
}
_STAGE_RENAMES = {"prelude": "prelude", "core_block": "core", "coda": "coda", "h": "prelude"}  # h: their GPT
_TOP_RENAMES = {
    "transformer.wte.weight": "embed.weight",
    "transformer.ln_prelude.weight": "prelude_norm.weight",
    "transformer.ln_f.weight": "final_norm.weight",
    "transformer.adapter.A_log": "injection.log_A",
    "transformer.adapter.dt_bias": "injection.dt_bias",
    "transformer.adapter.B": "injection.B",
    "transformer.adapter.adapter.weight": "injection.proj.weight",
    "transformer.C.weight": "readout.weight",
    "lm_head.weight": "lm_head.weight",
}
_IGNORED = {"freqs_cis"}
_BLOCK_KEY = re.compile(r"^transformer\.(prelude|core_block|coda|h)\.(\d+)\.(.+)$")
_VALUE_EMBED_KEY = re.compile(r"^value_embeds\.(\d+)\.weight$")


class CheckpointMappingError(ValueError):
    pass


def map_parcae_lm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a parcae-lm state dict (their Parcae or GPT) to ParcaeModel's names; raises on unknown keys."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for raw_key, tensor in state_dict.items():
        key = raw_key.removeprefix("_orig_mod.").removeprefix("module.").removeprefix("model.")
        if key in _IGNORED:
            continue
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = tensor
        elif m := _BLOCK_KEY.match(key):
            stage, index, rest = m.groups()
            if rest not in _BLOCK_RENAMES:
                unknown.append(raw_key)
                continue
            out[f"{_STAGE_RENAMES[stage]}.{index}.{_BLOCK_RENAMES[rest]}"] = tensor
        elif _VALUE_EMBED_KEY.match(key):
            out[key] = tensor
        else:
            unknown.append(raw_key)
    if unknown:
        raise CheckpointMappingError(f"parcae-lm checkpoint has keys tokenmill cannot map: {sorted(unknown)[:8]}")
    return out


_UNSUPPORTED_PARCAE_LM = {
    "block_class_name": "TransformerPreNormBlock",
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "BaseMLP",
    "nonlin_name": "ReLU2",
    "logit_softcap": None,
    "bias": False,
    "qk_bias": False,
    "clip_qkv": None,
}


def config_from_parcae_lm(values: Mapping[str, Any], **overrides: Any) -> ParcaeConfig:
    """ParcaeConfig from a parcae-lm config dict (their config.json / model_config.json)."""
    for key, expected in _UNSUPPORTED_PARCAE_LM.items():
        if key in values and values[key] != expected:
            raise ValueError(f"parcae-lm {key}={values[key]!r} is not supported (tokenmill implements {expected!r})")
    rope = values.get("rope_settings") or {}
    if rope and (not rope.get("use_rope", True) or rope.get("rope_condense_ratio", 1) != 1):
        raise ValueError("only uncondensed RoPE is supported")
    d = int(values["n_embd"])
    looped = "n_layers_in_recurrent_block" in values
    injection = {"diagonal": "parcae", "linear": "linear", "add": "additive"}
    kwargs: dict[str, Any] = {
        "vocab_size": int(values.get("padded_vocab_size") or values["vocab_size"]),
        "d_model": d,
        "n_heads": int(values["num_attention_heads"]),
        "n_kv_heads": int(values.get("num_key_value_heads") or values["num_attention_heads"]),
        "intermediate_size": int(values["intermediate_size"]),
        "max_seq_len": int(values.get("block_size", 2048)),
        "rope_theta": float(rope.get("rope_base", values.get("rope_base", 50000.0))),
        "tie_embeddings": bool(values.get("tie_embeddings", True)),
        "qk_norm": bool(values.get("qk_norm", True)),
        "norm_eps": float(values.get("norm_eps", 1e-5)),
        "name": str(values.get("name", "parcae-lm")),
    }
    if looped:
        if values.get("recurrent_embedding_dimension", d) != d:
            raise ValueError("a recurrent state width different from n_embd is not supported")
        if not values.get("prelude_norm", True):
            raise ValueError("parcae-lm models without prelude_norm are not supported")
        kwargs.update(
            n_prelude=int(values["n_layers_in_prelude"]),
            n_core=int(values["n_layers_in_recurrent_block"]),
            n_coda=int(values["n_layers_in_coda"]),
            injection=injection[values.get("injection_type", "diagonal")],
            mean_recurrence=int(values.get("mean_recurrence", 8)),
            backprop_depth=int(values.get("mean_backprop_depth", 4)),
        )
    else:
        kwargs.update(n_prelude=int(values["n_layer"]), n_core=0, n_coda=0)
    kwargs.update(overrides)
    return ParcaeConfig(**kwargs)


def load_parcae_lm_state_dict(
    model: ParcaeModel, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> ParcaeModel:
    """Loads a parcae-lm state dict into `model` (whose config must match it)."""
    if isinstance(state_dict.get("model"), Mapping):  # training checkpoints wrap the weights
        state_dict = state_dict["model"]  # type: ignore[assignment]
    mapped = map_parcae_lm_state_dict(state_dict)
    has_ve = any(k.startswith("value_embeds.") for k in mapped)
    if has_ve != model.config.value_embeddings:
        raise CheckpointMappingError(
            f"checkpoint {'has' if has_ve else 'has no'} value embeddings but config.value_embeddings="
            f"{model.config.value_embeddings}"
        )
    if model.config.tie_embeddings and "lm_head.weight" in mapped:
        head = mapped.pop("lm_head.weight")
        if head.shape != mapped["embed.weight"].shape or not torch.equal(head, mapped["embed.weight"]):
            raise CheckpointMappingError("config ties embeddings but the checkpoint's lm_head differs from wte")
    expected = model.state_dict()
    if model.config.tie_embeddings:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    for key, tensor in mapped.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise CheckpointMappingError(
                f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(expected[key].shape)}"
            )
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if strict and (missing or unexpected):
        raise CheckpointMappingError(f"missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    model.load_state_dict(mapped, strict=False)
    return model


def load_parcae_lm(path: str | Path, config: ParcaeConfig | None = None, device: str = "cpu") -> ParcaeModel:
    """A ParcaeModel from a parcae-lm checkpoint: a file (.bin/.pt/.pth/.safetensors) or a folder holding one plus
    config.json (or model_config.json)."""
    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")]
        found = [p for p in candidates if p.exists()]
        if not found:
            raise FileNotFoundError(f"no checkpoint file in {path} (looked for {[p.name for p in candidates]})")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(path)
    if config is None:
        for name in ("config.json", "model_config.json"):
            if (folder / name).exists():
                config = config_from_parcae_lm(json.loads((folder / name).read_text()))
                break
        else:
            raise ValueError(f"no config.json next to {path}; pass a ParcaeConfig")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not config.value_embeddings and any("value_embeds." in k for k in state):
        config = replace(config, value_embeddings=True)
    with torch.device("meta"):
        model = ParcaeModel(config)
    model.to_empty(device=device)
    load_parcae_lm_state_dict(model, state)
    cos, sin = _rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()
