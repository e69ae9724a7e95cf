"""The fused sampling kernels (kernels/triton/sample.py) against their PyTorch reference, on fresh random logits.

Runs on CUDA when present; without CUDA only under TRITON_INTERPRET=1 (test_kernels_interpreted.py), at small sizes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from tokenmill.kernels.triton.sample import (  # noqa: E402
    CHUNK, exponential_noise, pack_row_params, race_sample, race_sample_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def params_on_device(temperatures, keys, forbidden):
    flat, stride = pack_row_params(temperatures, keys, forbidden)
    return torch.tensor(flat, dtype=torch.int32, device=DEVICE), stride


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_race_sample_matches_the_reference_given_its_noise(dtype):
    seed = int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    rows, vocab = 7, CHUNK + 904  # two chunks, the second partial
    logits = (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)
    temperatures = [0.0, 1.0, 0.7, 1.6, 0.0, 1.0, 1.0]
    keys = torch.randint(0, 2**62, (rows,), generator=gen).tolist()
    # Row 0 (greedy) forbids its argmax; row 4 (greedy) has its maximum twice, in both chunks: the first wins.
    logits[4, 100] = logits[4, CHUNK + 10] = logits[4].float().max() + 1
    forbidden = [[int(logits[0].float().argmax())], [], [3, 4, vocab - 1], [], [], [], []]
    logits[5, 17] = float("nan")
    logits[6, CHUNK + 1] = float("inf")
    logits = logits.to(DEVICE)
    params, stride = params_on_device(temperatures, keys, forbidden)
    out = race_sample(logits, params, stride).cpu()
    noise = torch.stack([exponential_noise(k, vocab, DEVICE) for k in keys])
    ref = race_sample_reference(logits, temperatures, noise, forbidden).cpu()
    assert out[:, 1].tolist() == [0, 0, 0, 0, 0, 1, 1], f"seed {seed}: corruption flags"
    assert out[:5, 0].tolist() == ref[:5, 0].tolist(), f"seed {seed}"
    assert out[4, 0] == 100
    assert out[0, 0] != forbidden[0][0]
    assert noise.min() > 0 and abs(noise.mean().item() - 1.0) < 0.05, f"seed {seed}: Exp(1) noise"


def test_race_sample_draws_from_the_softmax_without_the_forbidden_ids():
    seed = int.from_bytes(os.urandom(4), "little")
    vocab, draws, temperature = 30, 2000, 0.8
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(seed))
    forbidden = [int(logits.argmax())]  # the likeliest token: its mass moves to the others
    keys = torch.randint(0, 2**62, (draws,), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    params, stride = params_on_device([temperature] * draws, keys, [forbidden] * draws)
    out = race_sample(logits.expand(draws, -1).contiguous().to(DEVICE), params, stride).cpu()
    counts = torch.bincount(out[:, 0], minlength=vocab).float()
    assert counts[forbidden[0]] == 0
    probs = torch.softmax(logits / temperature, -1)
    probs[forbidden[0]] = 0
    probs /= probs.sum()
    keep = probs > 0
    expected = probs[keep] * draws
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum().item()
    assert chi2 < 64.0, f"seed {seed}: chi-square {chi2:.1f} over 28 degrees of freedom"  # 99.99 % quantile: 63


def test_pack_row_params_pads_forbidden_ids_and_marks_greedy_rows():
    flat, stride = pack_row_params([0.0, 1.5], [2**40 + 3, 7], [[5], [1, 2]])
    assert stride == 6
    assert flat[1] == 1 and flat[stride + 1] == 0
    assert flat[2:4] == [3, 256] and flat[4:6] == [5, -1] and flat[stride + 4:] == [1, 2]
