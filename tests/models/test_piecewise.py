"""engine/piecewise.py: a step's forward as captured pieces around eager attention equals model.forward.

On the CPU the pieces run eagerly on the same padded buffers (the decomposition and the padding); on a GPU they are
CUDA graphs, replayed for steps of every kind (the capture itself, and replays with new inputs)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import ModelConfig
from tokenmill.engine.piecewise import (
    PIECEWISE_MAX_TOKENS,
    PiecewiseForward,
    supports_piecewise,
    token_buckets,
)
from tokenmill.models.llama import LlamaForCausalLM

LENGTHS = [11, 18, 5, 9, 40]
PROMPT_LENS = [3, 12, 1, 6, 33]


def _model(device: str = "cpu", dtype: torch.dtype = torch.float32, attn_backend=None) -> LlamaForCausalLM:
    config = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config, dtype=dtype, device=device, attn_backend=attn_backend)
    model.init_random_weights(seed=0, std=0.2)
    return model


class _AsModel:
    """PiecewiseForward where the mini runner expects a model: built (captured) for the run's KV cache on first use.
    Padded rows write block 0, which the mini runner, like the engine's pool, never hands out."""

    def __init__(self, model: LlamaForCausalLM, max_tokens: int, capture: bool, max_seqs: int = 0,
                 whole_max_tokens: int = 0) -> None:
        self.model, self.max_tokens, self.capture, self.max_seqs = model, max_tokens, capture, max_seqs
        self.whole_max_tokens = whole_max_tokens
        self.config, self.dtype = model.config, model.dtype
        self.piecewise: PiecewiseForward | None = None

    def __call__(self, input_ids, positions, kv_cache, meta):
        if self.piecewise is None or self.piecewise.kv_cache is not kv_cache:
            self.piecewise = PiecewiseForward(self.model, self.max_tokens, kv_cache.device, kv_cache,
                                              pad_slot=0, capture=self.capture, max_seqs=self.max_seqs,
                                              max_blocks_per_seq=kv_cache.shape[2],
                                              whole_max_tokens=self.whole_max_tokens)
        return self.piecewise(input_ids, positions, kv_cache, meta)

    def compute_logits(self, hidden):
        return self.model.compute_logits(hidden)


def test_token_buckets():
    assert token_buckets(2048)[0] == 16 and token_buckets(2048)[-1] == 2048
    assert token_buckets(100) == [16, 32, 48, 64, 96, 100]
    assert token_buckets(8) == [8]
    sizes = token_buckets(4096)
    assert sizes == sorted(set(sizes)) and all(b <= 1.5 * a for a, b in zip(sizes[1:], sizes[2:]))


def test_steps_past_the_cap_are_left_to_the_eager_model():
    model = _model()
    cfg = model.config
    cache = torch.zeros(cfg.num_hidden_layers, 2, 4, 4, cfg.num_key_value_heads, cfg.head_dim)
    piecewise = PiecewiseForward(model, 10 * PIECEWISE_MAX_TOKENS, torch.device("cpu"), cache, capture=False)
    assert piecewise.max_tokens == PIECEWISE_MAX_TOKENS
    assert piecewise.fits(PIECEWISE_MAX_TOKENS) and not piecewise.fits(PIECEWISE_MAX_TOKENS + 1)


def test_a_step_on_another_cache_is_refused():
    """The graphs write the KV cache they were built with; a step on any other tensor is an error, not silent
    writes into the wrong cache."""
    from tokenmill.layers.attention_metadata import AttentionMetadata

    model = _model()
    cfg = model.config
    shape = (cfg.num_hidden_layers, 2, 4, 4, cfg.num_key_value_heads, cfg.head_dim)
    piecewise = PiecewiseForward(model, 32, torch.device("cpu"), torch.zeros(shape), capture=False)
    meta = AttentionMetadata.build([3], [3], [[1]], 4)
    with pytest.raises(ValueError, match="KV cache they were captured with"):
        piecewise(torch.tensor([1, 2, 3]), torch.arange(3), torch.zeros(shape), meta)


def test_supports_piecewise():
    assert supports_piecewise(_model())
    assert not supports_piecewise(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="does not split"):
        PiecewiseForward(torch.nn.Linear(2, 2), 64, torch.device("cpu"), torch.zeros(1), capture=False)


@pytest.mark.parametrize("wrapped", [False, True], ids=["function", "backend"])
@pytest.mark.parametrize("schedule", ["one_step", "chunked", "prefill_then_decode"])
def test_pieces_equal_forward_on_cpu(paged, schedule, wrapped):
    """Steps of 1..83 tokens (buckets 16 to 96, most of them padded), mixed prefill chunks and decodes; attention as
    the bare reference function and as an AttentionBackend (which writes into the pieces' buffer)."""
    from tokenmill.kernels.backends import get_attention_backend

    model = _model(attn_backend=get_attention_backend("torch", "cpu") if wrapped else None)
    steps = {"one_step": lambda: paged.one_step(LENGTHS), "chunked": lambda: paged.chunked(LENGTHS, seed=2),
             "prefill_then_decode": lambda: paged.prefill_then_decode(LENGTHS, PROMPT_LENS)}[schedule]()
    sequences = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]
    # A NaN cache: a K/V write of a padded row into a sequence's block, or a read of a slot never written, shows.
    reference = paged.run(model, sequences, steps, cache_fill=float("nan"))
    pieces = paged.run(_AsModel(model, 96, capture=False), sequences, steps, cache_fill=float("nan"))
    for a, b in zip(pieces, reference):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _triton_ready() -> bool:
    import importlib.util
    import os

    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@pytest.mark.skipif(not _triton_ready(), reason="needs the Triton kernels (CUDA, or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("schedule", ["chunked", "prefill_then_decode"])
def test_whole_steps_equal_forward(paged, schedule):
    """With the Triton backend and a sequence limit, sizes up to 48 tokens run as whole steps (attention by the
    planned launch from the staged metadata), larger ones as pieces around eager attention: both equal model.forward.
    On the CPU run eagerly under the interpreter, on a GPU as graphs."""
    from tokenmill.kernels.backends import get_attention_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _model(device, attn_backend=get_attention_backend("triton", device))
    steps = {"chunked": lambda: paged.chunked(LENGTHS, seed=2),
             "prefill_then_decode": lambda: paged.prefill_then_decode(LENGTHS, PROMPT_LENS)}[schedule]()
    sequences = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]
    # The reference is model.forward with the torch attention (same weights: _model seeds them), not the Triton
    # backend: the whole steps are then held to the ground truth, and under the interpreter the reference does not
    # cost a second interpreted run of every attention launch (a third of the test's time).
    reference_model = _model(device, attn_backend=get_attention_backend("torch", device))
    assert all(torch.equal(a, b) for a, b in zip(reference_model.parameters(), model.parameters()))
    reference = paged.run(reference_model, sequences, steps, device=device, cache_fill=float("nan"))
    runner = _AsModel(model, 96, capture=device == "cuda", max_seqs=len(LENGTHS) + 2, whole_max_tokens=48)
    whole = paged.run(runner, sequences, steps, device=device, cache_fill=float("nan"))
    assert runner.piecewise.whole_sizes == {16, 32, 48}
    # A whole-step size holds at most max_seqs sequences' metadata; the piece-by-piece sizes take any number.
    assert runner.piecewise.fits(16, len(LENGTHS) + 2) and not runner.piecewise.fits(16, len(LENGTHS) + 3)
    assert runner.piecewise.fits(64, 64) and not runner.piecewise.fits(97)
    for a, b in zip(whole, reference):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_whole_steps_only_with_a_planned_prefill():
    """The torch reference has no capturable prefill: its steps keep eager attention between the pieces."""
    from tokenmill.kernels.backends import get_attention_backend

    model = _model(attn_backend=get_attention_backend("torch", "cpu"))
    cfg = model.config
    cache = torch.zeros(cfg.num_hidden_layers, 2, 4, 4, cfg.num_key_value_heads, cfg.head_dim)
    piecewise = PiecewiseForward(model, 32, torch.device("cpu"), cache, capture=False, max_seqs=4,
                                 max_blocks_per_seq=4)
    assert not piecewise.whole_sizes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphs_equal_forward_on_gpu(paged, dtype):
    from tokenmill.kernels.backends import get_attention_backend

    model = _model("cuda", dtype, attn_backend=get_attention_backend("auto", "cuda"))
    sequences = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]
    for steps in (paged.chunked(LENGTHS, seed=5), paged.prefill_then_decode(LENGTHS, PROMPT_LENS)):
        reference = paged.run(model, sequences, steps, device="cuda", cache_fill=float("nan"))
        graphs = paged.run(_AsModel(model, 96, capture=True), sequences, steps, device="cuda",
                           cache_fill=float("nan"))
        for a, b in zip(graphs, reference):
            assert torch.isfinite(a).all()
            tol = 1e-4 if dtype == torch.float32 else 5e-2 * b.abs().max().item()
            torch.testing.assert_close(a, b, atol=tol, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_engine_with_piecewise_graphs_gives_the_eager_tokens(tmp_path):
    """An engine whose prompt chunks run piecewise gives the tokens of one that runs them eagerly (fp32: no ties from
    rounding), over staggered arrivals that mix prefill chunks with decodes; and it did run the graphs."""
    from tokenmill.engine.engine import LLMEngine
    from tokenmill.llm import make_engine_config
    from tokenmill.models.random_weights import make_random_model_dir
    from tokenmill.sampling_params import SamplingParams

    folder = make_random_model_dir(tmp_path / "m", "tiny", torch.float32, std=0.2)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[(7 * i + j) % 500 + 3 for j in range(n)] for i, n in enumerate((5, 70, 33, 130, 9, 61))]

    class Counting:
        def __init__(self, inner: PiecewiseForward) -> None:
            self.inner, self.calls = inner, 0
            self.fits, self.compute_logits = inner.fits, inner.compute_logits

        def __call__(self, *args):
            self.calls += 1
            return self.inner(*args)

    def run(mode: str) -> tuple[list[list[int]], int]:
        engine = LLMEngine(make_engine_config(str(folder), dtype="float32", device="cuda", cudagraph_mode=mode,
                                              max_num_batched_tokens=64, max_model_len=256, num_blocks=256))
        counting = engine.runner.piecewise = Counting(engine.runner.piecewise) if engine.runner.piecewise else None
        outputs: dict[str, list[int]] = {}

        def step() -> None:
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.outputs[0].token_ids

        ids = []
        for prompt in prompts:  # a new prompt every other step: chunks of 64 tokens beside running decodes
            ids.append(engine.add_request(prompt, params))
            step()
            step()
        while engine.has_unfinished_requests():
            step()
        return [outputs[i] for i in ids], counting.calls if counting else 0

    piecewise_tokens, calls = run("full_and_piecewise")
    eager_tokens, _ = run("full_decode_only")
    assert calls > 0
    assert piecewise_tokens == eager_tokens
