import math

import pytest
import torch

from tokenmill.engine.request import Request
from tokenmill.engine.sampler import (
    Sampler,
    greedy_argmax,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_k_top_p_sorted,
    pad_token_ids,
    token_counts,
)
from tokenmill.sampling_params import SamplingParams


def make_request(
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: frozenset[int] = frozenset(),
    request_id: str = "r",
    **params,
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt or [1, 2, 3]),
        sampling_params=SamplingParams(max_tokens=64, **params),
        eos_token_ids=eos,
        output_token_ids=list(output or []),
    )


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def test_greedy_is_argmax():
    logits = random_logits(8, 500)
    out = Sampler().sample(logits, [make_request(temperature=0.0) for _ in range(8)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.corrupted == [False] * 8
    assert out.logprobs == [None] * 8


def test_greedy_ties_pick_first_index():
    logits = torch.zeros(2, 100)
    logits[0, [7, 30, 99]] = 5.0
    logits[1, [42, 43]] = 1.0
    out = Sampler().sample(logits, [make_request(temperature=0.0), make_request(temperature=0.0)])
    assert out.token_ids == [7, 42]


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_equals_greedy(temperature):
    logits = random_logits(16, 300, seed=1)
    out = Sampler(seed=3).sample(logits, [make_request(temperature=temperature, top_k=1) for _ in range(16)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_equals_greedy():
    logits = random_logits(16, 300, seed=2)
    out = Sampler(seed=4).sample(logits, [make_request(temperature=2.0, top_p=1e-6) for _ in range(16)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_mixed_greedy_and_sampled_rows():
    logits = random_logits(6, 200, seed=5)
    requests = [make_request(temperature=0.0 if i % 2 == 0 else 1.0, top_k=1 if i == 3 else 0) for i in range(6)]
    out = Sampler().sample(logits, requests)
    argmax = logits.argmax(-1).tolist()
    for i in (0, 2, 3, 4):
        assert out.token_ids[i] == argmax[i]


def test_min_p_masks_unlikely_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    masked = apply_min_p(logits, torch.tensor([0.15]))  # threshold 0.075: keeps 0.5, 0.3, 0.1
    assert torch.isinf(masked[0, 3:]).all() and torch.isfinite(masked[0, :3]).all()
    assert torch.equal(masked[0, :3], logits[0, :3])
    untouched = apply_min_p(logits, torch.tensor([0.0]))
    assert torch.equal(untouched, logits)
    # Through the sampler: every draw lands in the kept set.
    batch = logits.expand(2000, -1).contiguous()
    out = Sampler(seed=1).sample(batch, [make_request(min_p=0.15)] * 2000)
    assert set(out.token_ids) == {0, 1, 2}


def test_top_k_and_top_p_masks():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    logits = probs.log()
    top2 = apply_top_k(logits, torch.tensor([2]))
    assert torch.isfinite(top2).tolist() == [[False, True, False, True, False]]
    assert torch.equal(apply_top_k(logits, torch.tensor([0])), logits)

    sorted_logits = torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]).log()
    # Nucleus 0.75: 0.4 + 0.3 = 0.7 < 0.75, so 0.15 joins; 0.1 and 0.05 go.
    nucleus = apply_top_k_top_p_sorted(sorted_logits, torch.tensor([0]), torch.tensor([0.75]))
    assert torch.isfinite(nucleus).tolist() == [[True, True, True, False, False]]
    # top_k first, then top_p on the renormalised survivors: 0.4/0.7 = 0.57 >= 0.5, so only the first stays.
    both = apply_top_k_top_p_sorted(sorted_logits, torch.tensor([2]), torch.tensor([0.5]))
    assert torch.isfinite(both).tolist() == [[True, False, False, False, False]]
    assert torch.equal(apply_top_k_top_p_sorted(sorted_logits, torch.tensor([0]), torch.tensor([1.0])), sorted_logits)
    assert torch.equal(apply_top_k_top_p_sorted(sorted_logits, torch.tensor([0]), None), sorted_logits)
    # Ties straddling the nucleus boundary stay together: 0.4 < 0.5, and both 0.2s follow.
    tied = torch.tensor([[0.4, 0.2, 0.2, 0.1, 0.1]]).log()
    assert torch.isfinite(apply_top_k_top_p_sorted(tied, torch.tensor([0]), torch.tensor([0.5]))).tolist() == [
        [True, True, True, False, False]
    ]


def test_top_k_keeps_ties_whatever_the_candidate_width():
    logits = torch.zeros(1, 64)
    logits[0, :3] = 5.0
    logits[0, 10:20] = 2.0  # the 4th..13th largest are tied
    draws = 3000
    batch = logits.expand(draws, -1).contiguous()
    out = Sampler(seed=3).sample(batch, [make_request(temperature=1.0, top_k=4)] * draws)
    assert set(out.token_ids) <= set(range(3)) | set(range(10, 20))
    assert len(set(out.token_ids) & set(range(10, 20))) > 5  # ties past the 4th position are candidates too


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# 99.99% quantile of chi-square with 29 degrees of freedom (the tests below use 30 bins).
CHI2_29_THRESHOLD = 64.0


# The GPU draws its noise with another kernel (exponential_) than the CPU (-log of uniform_): both are checked.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_empirical_distribution_matches_softmax(temperature, device):
    vocab, draws = 30, 30000
    logits = random_logits(1, vocab, seed=7, scale=1.0)
    batch = logits.expand(draws, -1).contiguous().to(device)
    out = Sampler(seed=11).sample(batch, [make_request(temperature=temperature)] * draws)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=vocab).float()
    expected = torch.softmax(logits[0] / temperature, -1)
    assert chi_square(counts, expected) < CHI2_29_THRESHOLD


def kept_by_reference(probs: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Token ids a filter keeps, computed the slow obvious way (no ties in these logits)."""
    order = probs.argsort(descending=True).tolist()
    kept = [t for t in order if probs[t] >= min_p * probs[order[0]]]
    kept = kept[:top_k] if top_k else kept
    mass, nucleus = float(probs[kept].sum()), []
    for t in kept:
        if sum(float(probs[u]) for u in nucleus) / mass >= top_p:
            break
        nucleus.append(t)
    return torch.tensor(nucleus)


@pytest.mark.parametrize(
    "params",
    [
        dict(top_p=0.8),
        dict(top_k=12),  # topk candidates, unseeded noise
        dict(top_k=12, top_p=0.9, temperature=1.3),
        dict(min_p=0.05),
        dict(seed=None, top_k=12, min_p=0.02),  # seeded per row below: per-token-id noise gathered at candidates
        dict(seed=None),  # seeded per row below, full vocabulary
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_empirical_distribution_after_filters_is_renormalised(params, device):
    params = dict(params)
    seeded = "seed" in params and params.pop("seed") is None
    vocab, draws = 30, 8000 if seeded else 20000
    temperature = params.setdefault("temperature", 1.0)
    logits = random_logits(1, vocab, seed=8, scale=1.5)
    batch = logits.expand(draws, -1).contiguous().to(device)
    if seeded:
        requests = [make_request(seed=i, **params) for i in range(draws)]
    else:
        requests = [make_request(**params)] * draws
    out = Sampler(seed=12).sample(batch, requests)
    probs = torch.softmax(logits[0] / temperature, -1)
    keep = kept_by_reference(probs, params.get("top_k", 0), params.get("top_p", 1.0), params.get("min_p", 0.0))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=vocab).float()
    assert set(out.token_ids) <= set(keep.tolist())
    dof = len(keep) - 1
    assert dof >= 5
    kept_probs = probs[keep] / probs[keep].sum()
    assert chi_square(counts[keep], kept_probs) < dof + 6.0 * math.sqrt(2.0 * dof)  # ~mean + 6 sd: fails only on bias


def test_apply_penalties_matches_formulas():
    vocab = 10
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0, 4.0, -0.5, 1.5, -2.0]])
    prompt = [0, 1, 1]
    output = [1, 2, 2, 2, 6]
    rep, presence, frequency = 1.3, 0.4, 0.25
    got = apply_penalties(
        logits,
        pad_token_ids([prompt], vocab),
        pad_token_ids([output], vocab),
        torch.tensor([rep]),
        torch.tensor([presence]),
        torch.tensor([frequency]),
    )
    expected = logits.clone()
    for token in set(prompt) | set(output):
        value = expected[0, token]
        expected[0, token] = value / rep if value > 0 else value * rep
    for token in set(output):
        expected[0, token] -= frequency * output.count(token) + presence
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-6), (got, expected)
    assert got[0, 3] == logits[0, 3]  # unseen token untouched


def test_penalties_are_per_row_and_identity_by_default():
    vocab = 20
    logits = random_logits(2, vocab, seed=3)
    got = apply_penalties(
        logits,
        pad_token_ids([[1, 2, 3], []], vocab),
        pad_token_ids([[4], [5, 5]], vocab),
        torch.tensor([1.0, 2.0]),
        torch.tensor([0.0, 0.0]),
        torch.tensor([0.0, 1.0]),
    )
    assert torch.equal(got[0], logits[0])
    assert got[1, 5] == (logits[1, 5] / 2 if logits[1, 5] > 0 else logits[1, 5] * 2) - 2.0


def test_token_counts_ignores_padding():
    ids = pad_token_ids([[1, 1, 3], [0]], pad_id=5)
    assert ids.tolist() == [[1, 1, 3], [0, 5, 5]]
    assert token_counts(ids, 5).tolist() == [[0, 2, 0, 1, 0], [1, 0, 0, 0, 0]]


def test_sampler_applies_penalties_before_greedy():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0]])
    out = Sampler().sample(logits, [make_request(prompt=[9], output=[0], temperature=0.0, frequency_penalty=2.0)])
    assert out.token_ids == [1]
    out = Sampler().sample(logits, [make_request(prompt=[0], temperature=0.0, repetition_penalty=2.0)])
    assert out.token_ids == [1]
    assert torch.equal(logits, torch.tensor([[5.0, 4.0, 1.0, 0.0]]))  # caller's tensor not modified


def test_min_tokens_blocks_eos_and_stop_tokens():
    logits = torch.zeros(3, 50)
    logits[:, 7] = 10.0  # eos
    logits[:, 8] = 9.0  # stop token
    eos = frozenset({7})
    requests = [
        make_request(eos=eos, output=[1], temperature=0.0, min_tokens=3, stop_token_ids=[8]),
        make_request(eos=eos, output=[1, 2, 3], temperature=0.0, min_tokens=3, stop_token_ids=[8]),
        make_request(eos=eos, output=[1], temperature=0.0, min_tokens=3, ignore_eos=True, stop_token_ids=[8]),
    ]
    out = Sampler().sample(logits, requests)
    assert out.token_ids[0] not in (7, 8)
    assert out.token_ids[1] == 7  # min_tokens reached
    assert out.token_ids[2] == 7  # ignore_eos: EOS is an ordinary token, only stop_token_ids are blocked
    hot = make_request(eos=eos, output=[1], temperature=1.0, min_tokens=3, stop_token_ids=[8])
    sampled = Sampler(seed=2).sample(logits[:1].expand(200, -1).contiguous(), [hot] * 200)
    assert not {7, 8} & set(sampled.token_ids)


def test_seeded_request_is_independent_of_batch():
    vocab, steps = 1000, 6
    seeded_params = dict(temperature=1.0, top_p=0.95, top_k=200, seed=1234)

    def run(with_others: bool, sampler_seed: int) -> list[int]:
        sampler = Sampler(seed=sampler_seed)
        me = make_request(request_id="me", **seeded_params)
        others = [
            make_request(request_id="a", temperature=1.0),
            make_request(request_id="b", temperature=0.0),
            make_request(request_id="c", temperature=0.8, seed=99),
            make_request(request_id="d", temperature=1.2, min_p=0.05),
        ]
        for step in range(steps):
            my_logits = random_logits(1, vocab, seed=100 + step, scale=1.0)
            if with_others:
                batch = [others[0], others[1], me, others[2], others[3]]
                before, after = random_logits(2, vocab, seed=step), random_logits(2, vocab, seed=50 + step)
                logits = torch.cat([before, my_logits, after])
                out = sampler.sample(logits, batch)
                for request, token in zip(batch, out.token_ids):
                    request.append_output_token(token)
            else:
                me.append_output_token(sampler.sample(my_logits, [me]).token_ids[0])
        return me.output_token_ids

    alone = run(with_others=False, sampler_seed=0)
    assert len(set(alone)) > 1
    assert run(with_others=True, sampler_seed=0) == alone
    assert run(with_others=True, sampler_seed=77) == alone  # the engine seed does not touch seeded requests

    def tokens_for(seed: int) -> list[int]:
        logits = random_logits(1, vocab, seed=5, scale=0.5)
        request = make_request(temperature=1.0, seed=seed)
        tokens = []
        for _ in range(8):
            token = Sampler().sample(logits, [request]).token_ids[0]
            request.append_output_token(token)
            tokens.append(token)
        return tokens

    assert tokens_for(1) == tokens_for(1)
    assert tokens_for(1) != tokens_for(2)


@pytest.mark.parametrize("seeded_params", [dict(top_k=40), dict(top_k=40, top_p=0.9), dict(min_p=0.02), dict()])
def test_seeded_tokens_do_not_depend_on_how_neighbours_filter(seeded_params):
    """Neighbours switch the batch between topk candidates, a full sort and plain vocabulary sampling."""
    vocab = 500
    logits = random_logits(1, vocab, seed=41, scale=1.0)
    neighbours = [dict(), dict(top_k=400), dict(top_p=0.5), dict(top_k=3, min_p=0.2), dict(top_k=40)]

    def tokens(neighbour: dict | None) -> list[int]:
        request = make_request(temperature=0.9, seed=5, **seeded_params)
        for _ in range(10):
            if neighbour is None:
                token = Sampler().sample(logits, [request]).token_ids[0]
            else:
                batch = torch.cat([random_logits(1, vocab, seed=request.num_output_tokens), logits])
                token = Sampler().sample(batch, [make_request(temperature=1.0, **neighbour), request]).token_ids[1]
            request.append_output_token(token)
        return request.output_token_ids

    alone = tokens(None)
    assert len(set(alone)) > 3
    for neighbour in neighbours:
        assert tokens(neighbour) == alone, neighbour


def test_unseeded_requests_follow_engine_seed():
    logits = random_logits(32, 400, seed=9, scale=0.5)
    requests = [make_request(temperature=1.0) for _ in range(32)]
    assert Sampler(seed=5).sample(logits, requests).token_ids == Sampler(seed=5).sample(logits, requests).token_ids
    assert Sampler(seed=5).sample(logits, requests).token_ids != Sampler(seed=6).sample(logits, requests).token_ids


def test_logprobs_sampled_topk_and_rank():
    vocab = 200
    logits = random_logits(3, vocab, seed=13)
    requests = [
        make_request(temperature=1.0, logprobs=5),
        make_request(temperature=0.0, logprobs=0),
        make_request(temperature=1.0),
    ]
    out = Sampler(seed=3).sample(logits, requests)
    reference = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None

    entry = out.logprobs[0]
    token = out.token_ids[0]
    assert math.isclose(entry[token].logprob, reference[0, token].item(), rel_tol=1e-5, abs_tol=1e-6)
    assert entry[token].rank == int((reference[0] > reference[0, token]).sum()) + 1
    top_entries = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items() if lp.rank <= 5)
    assert [t for _, t, _ in top_entries] == reference[0].topk(5).indices.tolist()
    assert [rank for rank, _, _ in top_entries] == [1, 2, 3, 4, 5]
    values = [value for _, _, value in top_entries]
    assert values == sorted(values, reverse=True)
    assert torch.allclose(torch.tensor(values), reference[0].topk(5).values, rtol=1e-5)
    assert len(entry) in (5, 6)

    greedy_entry = out.logprobs[1]
    assert list(greedy_entry) == [out.token_ids[1]]
    assert greedy_entry[out.token_ids[1]].rank == 1
    assert math.isclose(greedy_entry[out.token_ids[1]].logprob, reference[1].max().item(), rel_tol=1e-5)


def test_logprobs_are_after_penalties_before_temperature():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    request = make_request(output=[0], temperature=0.5, top_k=2, frequency_penalty=1.0, logprobs=4)
    out = Sampler().sample(logits, [request])
    penalised = torch.tensor([[2.0, 2.0, 1.0, 0.0]])
    reference = torch.log_softmax(penalised, -1)[0]
    entry = out.logprobs[0]
    for token in range(4):
        assert math.isclose(entry[token].logprob, reference[token].item(), rel_tol=1e-5)
    assert entry[0].rank == 1 and entry[1].rank == 1  # tied tokens share the best rank
    assert entry[2].rank == 3 and entry[3].rank == 4


def test_logprobs_above_limit_rejected():
    sampler = Sampler(max_logprobs=3)
    with pytest.raises(ValueError, match="max_logprobs"):
        sampler.validate(SamplingParams(logprobs=4))
    with pytest.raises(ValueError, match="max_logprobs"):
        sampler.sample(torch.zeros(1, 10), [make_request(logprobs=4)])


def test_nan_row_is_flagged_without_affecting_others():
    logits = random_logits(4, 300, seed=21)
    clean = logits.clone()
    logits[1, 17] = float("nan")
    logits[3, 5] = float("inf")
    requests = [make_request(temperature=0.0, logprobs=2), make_request(temperature=1.0, logprobs=2)]
    requests += [make_request(temperature=1.0, seed=3, logprobs=2), make_request(temperature=0.0)]
    out = Sampler(seed=1).sample(logits, requests)
    assert out.corrupted == [False, True, False, True]
    assert out.logprobs[1] is None and out.logprobs[3] is None
    assert all(0 <= t < 300 for t in out.token_ids)
    assert out.token_ids[0] == clean[0].argmax().item()
    assert out.token_ids[2] == Sampler(seed=1).sample(clean[2:3], [requests[2]]).token_ids[0]
    assert out.logprobs[0] == Sampler().sample(clean[0:1], [requests[0]]).logprobs[0]


@pytest.mark.parametrize("rows, vocab", [(32, 49152), (1, 49152), (3, 32000), (2, 50257), (4, 1000)])
def test_greedy_argmax_equals_torch_argmax(rows, vocab):
    logits = random_logits(rows, vocab, seed=vocab)
    assert torch.equal(greedy_argmax(logits), logits.argmax(-1))
    # ties (first index wins, across and within blocks), -inf rows and NaN (counted as the maximum, like torch)
    logits[0, [vocab - 1, 300, 7]] = 1e4
    if rows > 1:
        logits[1] = float("-inf")
    if rows > 2:
        logits[2, vocab // 2] = float("nan")
    assert torch.equal(greedy_argmax(logits), logits.argmax(-1))
    assert greedy_argmax(logits)[0] == 7


def test_bad_input_raises():
    with pytest.raises(ValueError, match="num_requests"):
        Sampler().sample(torch.zeros(2, 10), [make_request()])
    with pytest.raises(ValueError, match="floating"):
        Sampler().sample(torch.zeros(1, 10, dtype=torch.int64), [make_request()])
    assert Sampler().sample(torch.zeros(0, 10), []).token_ids == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_where_deterministic():
    logits = random_logits(6, 1000, seed=31)
    requests = [
        make_request(temperature=0.0, logprobs=3),
        make_request(temperature=0.7, top_k=1),
        make_request(temperature=1.0, top_p=1e-6, repetition_penalty=1.2, output=[5]),
        make_request(temperature=1.0, seed=7),
        make_request(temperature=1.0, min_p=0.1, top_k=50, top_p=0.9),
        make_request(temperature=0.0, min_tokens=2, eos=frozenset({int(logits[5].argmax())})),
    ]
    cpu = Sampler().sample(logits, requests)
    cuda = Sampler().sample(logits.cuda(), requests)
    for i in (0, 1, 2, 5):
        assert cuda.token_ids[i] == cpu.token_ids[i]
    assert all(0 <= t < 1000 for t in cuda.token_ids)
    assert cuda.corrupted == [False] * 6
    assert cuda.logprobs[0].keys() == cpu.logprobs[0].keys()


def test_to_device_gives_the_values():
    from tokenmill.device_copy import to_device

    t = to_device([[1, 2], [3, 4]], torch.int32, "cpu")
    assert t.dtype == torch.int32 and t.tolist() == [[1, 2], [3, 4]]


def launch_without_sync(sampler: Sampler, logits: torch.Tensor, requests: list[Request]):
    """The sampler's output for a second launch on these rows, which must not synchronise the host with the GPU
    (torch's sync debug mode raises on any synchronising call); the first may (lazy initialisation, compiles)."""
    sampler.launch(logits, requests).result()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = sampler.launch(logits, requests)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return pending.result()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_launch_never_waits_for_the_device():
    """Every sampling feature queues its work without synchronising the host with the GPU (the step after it is
    planned while this one runs: async scheduling). torch's sync debug mode raises on any synchronising call."""
    requests = [
        make_request(temperature=0.0, request_id="greedy"),
        make_request(temperature=0.8, top_p=0.9, request_id="top_p"),
        make_request(temperature=0.7, top_k=5, request_id="top_k"),
        make_request(temperature=1.0, min_p=0.1, seed=7, request_id="min_p_seeded"),
        make_request(temperature=1.0, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3,
                     output=[4, 5, 4], request_id="penalties"),
        make_request(temperature=1.0, min_tokens=3, eos=frozenset({2}), request_id="min_tokens"),
        make_request(temperature=1.0, logprobs=3, request_id="logprobs"),
    ]
    logits = random_logits(len(requests), 500).cuda()
    out = launch_without_sync(Sampler(max_logprobs=5, seed=0), logits, requests)
    assert out.token_ids[0] == int(logits[0].argmax()) and out.corrupted == [False] * len(requests)
    assert out.token_ids[5] != 2 and out.logprobs[6] is not None


def test_min_tokens_with_nothing_to_forbid_keeps_the_greedy_fast_path():
    """min_tokens masks its stop ids and EOS (unless ignore_eos); with nothing to mask (how benchmarks force an
    output length: ignore_eos and no stop ids) the row is plain greedy, so a CUDA graph's own argmax serves it."""
    from tokenmill.engine.sampler import is_plain_greedy, min_tokens_blocked

    forced = make_request(temperature=0.0, min_tokens=5, eos=frozenset({1}), ignore_eos=True)
    assert not min_tokens_blocked(forced) and is_plain_greedy(forced)
    for request, blocked in ((make_request(temperature=0.0, min_tokens=5, eos=frozenset({1})), {1}),
                             (make_request(temperature=0.0, min_tokens=5, stop_token_ids=[4], ignore_eos=True), {4})):
        assert min_tokens_blocked(request) == blocked and not is_plain_greedy(request)
    done = make_request(temperature=0.0, min_tokens=2, eos=frozenset({1}), output=[5, 6])
    assert not min_tokens_blocked(done) and is_plain_greedy(done)
    logits = random_logits(2, 50)
    greedy = torch.tensor([[9, 0], [8, 0]])  # stands in for the graph's argmax: used as is
    assert Sampler().launch(logits, [forced, forced], greedy=greedy).result().token_ids == [9, 8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused path is for GPUs")
def test_fused_path_draws_greedy_and_temperature_rows_and_leaves_the_rest():
    logits = random_logits(32, 5000, seed=3).cuda()
    eos = int(logits[1].argmax())
    plain = [make_request(temperature=0.0), make_request(temperature=1e-3, min_tokens=3, eos=frozenset({eos})),
             make_request(temperature=1.0), make_request(temperature=0.7, top_k=0, top_p=1.0)]
    sampler = Sampler(seed=1)
    out = sampler.sample(logits[:4], plain)
    assert sampler._race_launches == 1 and out.corrupted == [False] * 4
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] == int(logits[1].topk(2).indices[1])  # near-greedy with its argmax forbidden
    for extra in (dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1), dict(seed=3), dict(logprobs=1),
                  dict(repetition_penalty=1.1)):
        sampler.sample(logits[:4], plain[:3] + [make_request(temperature=1.0, **extra)])
        assert sampler._race_launches == 1, f"{extra} must take the general path"
    rows = [make_request(temperature=1.0) for _ in range(32)]
    assert Sampler(seed=5).sample(logits, rows).token_ids == Sampler(seed=5).sample(logits, rows).token_ids
    assert Sampler(seed=5).sample(logits, rows).token_ids != Sampler(seed=6).sample(logits, rows).token_ids
    general = Sampler(seed=5, fused_race=False)
    general.sample(logits, rows)
    assert general._race_launches == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a CUDA matter")
def test_fused_path_never_waits_for_the_device():
    requests = [make_request(temperature=1.0, request_id="t"), make_request(temperature=0.0, request_id="g"),
                make_request(temperature=0.8, min_tokens=3, eos=frozenset({2}), request_id="min_tokens")]
    logits = random_logits(len(requests), 500).cuda()
    sampler = Sampler(seed=0)
    out = launch_without_sync(sampler, logits, requests)
    assert sampler._race_launches == 2 and out.token_ids[1] == int(logits[1].argmax()) and out.token_ids[2] != 2


def test_without_triton_every_row_takes_the_general_path(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert Sampler(fused_race=True).fused_race is False
    monkeypatch.undo()
    assert Sampler(fused_race=True).fused_race is (importlib.util.find_spec("triton") is not None)
    assert Sampler(fused_race=False).fused_race is False
