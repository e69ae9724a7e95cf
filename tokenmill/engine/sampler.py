"""Sampler: one step's logits [S, V] plus the requests they belong to -> one token id per row.

Pipeline, every stage batched over rows (Python loops only build small per-row parameter tensors):
  1. corruption check (a row holding NaN/inf is flagged; the engine fails that request, its token is meaningless)
  2. penalties (repetition over prompt+output, presence/frequency over output) and min_tokens masking
  3. logprobs, if any row asks for them, of the distribution after step 2 (see below)
  4. greedy rows: argmax (first index on ties)
  5. sampled rows: temperature -> min_p -> top_k -> top_p, then an exponential race argmax(probs / Exp(1)), done in
     log space: an exact draw that needs no cumulative sum or sync (see `gumbel_race`). When every row has a top_k,
     only its torch.topk candidates are filtered and raced; the full vocabulary is sorted only when top_p needs it.

Logprobs choice: they describe the model's distribution *after* penalties and min_tokens masking but *before*
temperature, min_p, top_k and top_p, so they do not depend on how a client tunes sampling, and a token the sampler
could never emit (an EOS blocked by min_tokens) reports -inf. Rank is 1-based among the whole vocabulary; tied
logprobs share the best rank.

On a GPU, a batch whose every row is greedy or plain temperature sampling (no penalties, logprobs, top-k / top-p /
min-p or seed; min_tokens allowed) takes one fused path instead (kernels/triton/sample.py): the same race, its
noise drawn inside the kernel, two launches in all.

Seeds: a seeded request's noise for output position k comes from a generator seeded with mix(seed, k), so its tokens
depend only on its own logits, never on which other requests share the batch, and a preempted request that is
recomputed draws the same tokens again. Unseeded requests share one generator per device seeded from `Sampler(seed=)`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from tokenmill.device_copy import to_device
from tokenmill.engine.outputs import Logprob, TokenLogprobs
from tokenmill.engine.request import PLACEHOLDER_TOKEN, Request
from tokenmill.sampling_params import SamplingParams

# Temperatures below this are treated as greedy: dividing by them would overflow the logits.
GREEDY_TEMPERATURE = 1e-5

_MASK64 = (1 << 64) - 1


class SamplerOutput(NamedTuple):
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where the request did not ask for logprobs, or the row is corrupted
    corrupted: list[bool]  # the row's logits held NaN/inf: fail the request, ignore its token


@dataclass(frozen=True)
class EarlierTokens:
    """The previous step's sampled ids, still on the device, for a step planned before they reached the host (async
    scheduling): a request whose last token is PLACEHOLDER_TOKEN takes token_ids[source_row[its id]] instead."""

    # [sampling rows of the earlier step], on the device; may view a CUDA graph's output (StepLogits.greedy), so
    # it is read only by work queued before that graph's next replay: the runner's fill of the input ids, and the
    # penalties of rows whose earlier step was not plain greedy (the same requests, so their ids came from here)
    token_ids: torch.Tensor
    source_row: dict[str, int]


def _to_host_async(tensor: Tensor) -> Tensor:
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


class PendingSample:
    """A step's tokens on their way to the host (Sampler.launch). `token_ids` stays on the device, where the next
    step may read its input ids from it before the host has them."""

    def __init__(self, requests: list[Request], picked: Tensor | None, logprobs: "_DeviceLogprobs | None") -> None:
        """picked: [rows, 2] int64, each row's token and 1 where its logits were corrupted."""
        self.requests, self._logprobs = requests, logprobs
        self.token_ids = picked[:, 0] if picked is not None else None
        self._output: SamplerOutput | None = None
        self._copied: torch.cuda.Event | None = None
        self._host: Tensor | None = None
        if picked is None:
            self._output = SamplerOutput([], [], [])
            return
        # One device-to-host copy for tokens and flags (on a GPU each .tolist() is a synchronisation); started now,
        # waited for in result(), so the host can plan the next step meanwhile.
        if picked.device.type == "cuda":
            self._host = _to_host_async(picked)
            if logprobs is not None:
                self._logprobs = logprobs._replace(
                    sampled=_to_host_async(logprobs.sampled),
                    sampled_logprob=_to_host_async(logprobs.sampled_logprob),
                    sampled_rank=_to_host_async(logprobs.sampled_rank),
                    top=logprobs.top and tuple(_to_host_async(t) for t in logprobs.top),
                )
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = picked

    def result(self) -> SamplerOutput:
        if self._output is None:
            if self._copied is not None:
                self._copied.synchronize()
            rows = self._host.tolist()
            token_list = [token for token, _ in rows]
            corrupted_list = [bool(bad) for _, bad in rows]
            logprobs = logprob_entries(self._logprobs, len(self.requests), corrupted_list)
            self._output = SamplerOutput(token_list, logprobs, corrupted_list)
        return self._output


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE


def is_plain_greedy(request: Request) -> bool:
    """Its token is the argmax of the raw logits: greedy, no penalties, no min_tokens masking, no logprobs."""
    params = request.sampling_params
    return (is_greedy(params) and not has_penalties(params) and params.logprobs is None
            and not min_tokens_blocked(request))


def min_tokens_blocked(request: Request) -> set[int]:
    """The token ids min_tokens still forbids this step: its stop ids, and EOS unless ignore_eos."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return set()
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(request.eos_token_ids))


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def pad_token_ids(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> Tensor:
    """Ragged token id lists -> one int64 tensor [len(rows), max_len], right-padded with `pad_id`."""
    width = max((len(r) for r in rows), default=0)
    padded = [list(r) + [pad_id] * (width - len(r)) for r in rows]
    return to_device(padded, torch.int64, device).reshape(len(rows), width)


def token_counts(padded_ids: Tensor, vocab_size: int) -> Tensor:
    """Occurrences of each token per row, [S, V] float32; ids equal to `vocab_size` are padding and not counted."""
    rows = padded_ids.shape[0]
    counts = torch.zeros(rows, vocab_size + 1, dtype=torch.float32, device=padded_ids.device)
    counts.scatter_add_(1, padded_ids, torch.ones_like(padded_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: Tensor,
    prompt_ids: Tensor,
    output_ids: Tensor,
    repetition_penalties: Tensor,
    presence_penalties: Tensor,
    frequency_penalties: Tensor,
) -> Tensor:
    """Return penalised logits (a new tensor).

    prompt_ids/output_ids: [S, *] padded with V (see `pad_token_ids`); penalties: [S].
    Repetition (HF/vLLM): every token seen in prompt or output has a positive logit divided by the penalty and a
    negative one multiplied by it. Then presence/frequency (OpenAI), over output tokens only:
    logit -= frequency * count + presence * (count > 0).
    """
    vocab_size = logits.shape[-1]
    output_counts = token_counts(output_ids, vocab_size)
    seen = token_counts(torch.cat([prompt_ids, output_ids], dim=1), vocab_size) > 0
    rep = repetition_penalties.to(logits.dtype).unsqueeze(1)
    out = torch.where(logits > 0, logits / rep, logits * rep)
    torch.where(seen, out, logits, out=out)
    out.addcmul_(output_counts, -frequency_penalties.to(logits.dtype).unsqueeze(1))
    return out.addcmul_(output_counts.clamp_(max=1.0), -presence_penalties.to(logits.dtype).unsqueeze(1))


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p * (top probability); done in logit space, no softmax needed.
    Works on any subset of a row's logits that contains its maximum (the full row or its sorted top candidates)."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)  # log(0) = -inf keeps everything
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_k(logits: Tensor, top_k: Tensor, k_max: int | None = None) -> Tensor:
    """Keep the k largest logits per row (0 = disabled), in vocabulary order. Tokens tied with the k-th are kept.
    k_max: the largest k if the caller knows it (reading it from `top_k` on a GPU waits for the device)."""
    vocab_size = logits.shape[-1]
    k = top_k.clamp(1, vocab_size)
    k_max = min(max(k_max, 1), vocab_size) if k_max is not None else int(k.max())
    kth_value = logits.topk(k_max, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    kth_value = kth_value.masked_fill((top_k <= 0).unsqueeze(1), float("-inf"))
    return logits.masked_fill(logits < kth_value, float("-inf"))


def apply_top_k_top_p_sorted(sorted_logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """top_k (0 or None = disabled; ties with the k-th value kept), then top_p (nucleus: the most likely tokens until
    their mass, renormalised after top_k, reaches p; tied tokens kept together) on rows sorted in descending order."""
    if top_k is not None:
        width = sorted_logits.shape[-1]
        k = torch.where(top_k > 0, top_k, width).clamp(1, width)
        kth_value = sorted_logits.gather(1, (k - 1).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
    if top_p is None:
        return sorted_logits
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # Tied logits all take the mass strictly above them, so a tie is kept or dropped as a whole, whatever order the
    # sort left it in (mass_before never decreases, so a running max carries each tie's first value along it).
    tie_with_previous = torch.zeros_like(sorted_logits, dtype=torch.bool)
    tie_with_previous[:, 1:] = sorted_logits[:, 1:] == sorted_logits[:, :-1]
    mass_before = mass_before.masked_fill(tie_with_previous, 0.0).cummax(dim=-1).values
    # top_p == 1 must keep everything even when float rounding pushes the running sum past 1.
    p = top_p.masked_fill(top_p >= 1.0, float("inf")).unsqueeze(1)
    return sorted_logits.masked_fill(mass_before >= p, float("-inf"))


def exponential(out: Tensor, generator: torch.Generator) -> Tensor:
    """Fills `out` with Exp(1) draws: one kernel on a GPU; on the CPU -log(U), U ~ U[0, 1), which is several times
    faster there than exponential_."""
    if out.device.type == "cuda":
        return out.exponential_(generator=generator)
    return out.uniform_(generator=generator).log_().neg_()


def gumbel_race(logits: Tensor, noise: Tensor) -> Tensor:
    """argmax(logits - log E) with E ~ Exp(1) i.i.d. is an exact draw from softmax(logits) (the Gumbel-max trick,
    i.e. argmax(probs / E)). Needs no normalisation, so a token's score depends only on its own logit and noise.
    `noise` is overwritten."""
    return logits.sub(noise.log_()).argmax(dim=-1)


def greedy_argmax(logits: Tensor) -> Tensor:
    """logits.argmax(-1) (first index on ties, NaN counting as the largest), computed in two stages on CPU.

    torch's CPU argmax over a long last dimension is not vectorized (about 2 ms for 32 x 49152 on one core) while amax
    is (about 0.3 ms): the maximum of each block of `width` logits picks the first block holding the row maximum, and
    an argmax inside that block alone finds the first index of it.
    """
    rows, vocab = logits.shape
    width = vocab & -vocab  # the largest power of two dividing vocab
    width = min(width, 128)
    if logits.device.type != "cpu" or width < 32 or vocab < 4 * width or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    blocks = logits.view(rows, vocab // width, width)
    best_block = blocks.amax(dim=-1).argmax(dim=-1)  # [rows]
    candidates = blocks.gather(1, best_block.view(rows, 1, 1).expand(rows, 1, width)).squeeze(1)  # [rows, width]
    return best_block * width + candidates.argmax(dim=-1)


def corrupted_rows(logits: Tensor) -> Tensor:
    """[rows] bool: the row holds NaN/inf. A finite row has a finite sum (real logits are far below float32's
    range); every later sampling stage is row-wise, so a bad row cannot leak into its neighbours."""
    return ~logits.float().sum(dim=-1).isfinite()


def greedy_pick(logits: Tensor) -> Tensor:
    """[rows, 2] int64: each row's greedy token and 1 where its logits hold NaN/inf (what Sampler.launch computes for
    plain greedy rows; a CUDA graph captures this after its LM head, saving the sampler's small kernels)."""
    logits = logits.float()
    return torch.stack([greedy_argmax(logits), corrupted_rows(logits).long()], dim=1)


def _step_seed(seed: int, position: int) -> int:
    """splitmix64 of (seed, output position): a well-mixed, non-negative 63-bit generator seed."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


def fused_race_applies(request: Request, vocab_size: int) -> bool:
    """Whether the row can be drawn by the fused GPU path: greedy or temperature only (min_tokens allowed)."""
    params = request.sampling_params
    return (not has_penalties(params) and params.logprobs is None and params.seed is None and params.top_p >= 1.0
            and params.min_p <= 0.0 and (params.top_k <= 0 or params.top_k >= vocab_size))


class Sampler:
    def __init__(self, max_logprobs: int = 20, seed: int = 0, fused_race: bool = True) -> None:
        """fused_race: on a GPU with Triton, draw the rows fused_race_applies to in one fused path (without Triton
        the general path serves every row)."""
        if max_logprobs < 0:
            raise ValueError(f"max_logprobs must be >= 0, got {max_logprobs}")
        self.max_logprobs = max_logprobs
        self.seed = seed
        self.fused_race = fused_race and importlib.util.find_spec("triton") is not None
        self._global_generators: dict[torch.device, torch.Generator] = {}
        self._seeded_generators: dict[torch.device, torch.Generator] = {}
        self._race_launches = 0

    def validate(self, params: SamplingParams) -> None:
        """Check what only the sampler knows; the engine calls this when a request arrives."""
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} exceeds the server's max_logprobs={self.max_logprobs}")

    def sample(self, logits: Tensor, requests: list[Request]) -> SamplerOutput:
        return self.launch(logits, requests).result()

    def launch(self, logits: Tensor, requests: list[Request], earlier_tokens: EarlierTokens | None = None,
               greedy: Tensor | None = None) -> "PendingSample":
        """Queues the sampling of one token per row on the logits' device and starts their copy to the host;
        result() waits for it. Every read of `logits` is queued here, so the caller may reuse the logits' memory (a
        CUDA graph's output) for later work on the same stream. greedy: `greedy_pick(logits)`, already computed (by
        a CUDA graph), taken as the result where every row is plain greedy."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"logits must be [num_requests={len(requests)}, vocab], got {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        for request in requests:
            self.validate(request.sampling_params)
        if not requests:
            return PendingSample(requests, None, None)
        if greedy is not None and all(is_plain_greedy(r) for r in requests):
            return PendingSample(requests, greedy, None)
        if self._use_fused_race(logits, requests):
            return PendingSample(requests, self._fused_race(logits, requests), None)
        logits = logits.float()
        device = logits.device
        corrupted = corrupted_rows(logits)

        logits = self._penalise(logits, requests, earlier_tokens)

        greedy_rows = [i for i, r in enumerate(requests) if is_greedy(r.sampling_params)]
        sampled_rows = [i for i, r in enumerate(requests) if not is_greedy(r.sampling_params)]
        if not sampled_rows:
            token_ids = greedy_argmax(logits)
        elif not greedy_rows:
            token_ids = self._sample_rows(logits, requests)
        else:
            token_ids = greedy_argmax(logits)
            index = to_device(sampled_rows, torch.int64, device)
            sampled = self._sample_rows(logits.index_select(0, index), [requests[i] for i in sampled_rows])
            token_ids.index_copy_(0, index, sampled)
        logprobs = self._logprobs_on_device(logits, token_ids, requests)
        return PendingSample(requests, torch.stack([token_ids, corrupted.to(token_ids.dtype)], dim=1), logprobs)

    # -- the fused GPU path -------------------------------------------------------------------------------------------

    def _use_fused_race(self, logits: Tensor, requests: list[Request]) -> bool:
        if not self.fused_race or logits.device.type != "cuda" or logits.stride(-1) != 1:
            return False
        vocab_size = logits.shape[-1]
        return all(fused_race_applies(r, vocab_size) for r in requests)

    def _fused_race(self, logits: Tensor, requests: list[Request]) -> Tensor:
        """[rows, 2] int64 (token, corrupted) from kernels/triton/sample.py. Unseeded rows' noise is keyed by the
        sampler's seed, a count of these launches and the row."""
        from tokenmill.kernels.triton.sample import pack_row_params, race_sample

        vocab_size = logits.shape[-1]
        self._race_launches += 1
        launch_key = _step_seed(self.seed, self._race_launches)
        keys = [_step_seed(launch_key, row) for row in range(len(requests))]
        forbidden = [sorted(t for t in min_tokens_blocked(r) if t < vocab_size) for r in requests]
        flat, stride = pack_row_params([r.sampling_params.temperature for r in requests], keys, forbidden)
        return race_sample(logits, to_device(flat, torch.int32, logits.device), stride)

    def warm_up(self, vocab_size: int, device: torch.device) -> None:
        """Compiles the fused path's kernels now (on a GPU; Triton compiles on first use, with the engine stalled)."""
        if not self.fused_race or device.type != "cuda":
            return
        from tokenmill.kernels.triton.sample import pack_row_params, race_sample

        flat, stride = pack_row_params([1.0], [0], [[0]])
        race_sample(torch.zeros((1, vocab_size), device=device), to_device(flat, torch.int32, device), stride)

    # -- stage 2: penalties and min_tokens -------------------------------------------------------------------------

    def _penalise(self, logits: Tensor, requests: list[Request], earlier_tokens: EarlierTokens | None) -> Tensor:
        device, vocab_size = logits.device, logits.shape[-1]
        penalty_rows = [i for i, r in enumerate(requests) if has_penalties(r.sampling_params)]
        blocked: list[tuple[int, int]] = []  # (row, token) pairs min_tokens forbids this step
        for i, r in enumerate(requests):
            blocked.extend((i, t) for t in min_tokens_blocked(r) if t < vocab_size)
        if not penalty_rows and not blocked:
            return logits

        logits = logits.clone()  # never modify the caller's tensor
        if penalty_rows:
            rows = [requests[i] for i in penalty_rows]
            params = [r.sampling_params for r in rows]
            needs_prompt = any(p.repetition_penalty != 1.0 for p in params)
            prompt_ids = pad_token_ids([r.prompt_token_ids if needs_prompt else [] for r in rows], vocab_size, device)
            outputs = [r.output_token_ids for r in rows]
            # A placeholder's id is still on the device: pad on the host, then copy it in from there.
            holes = [(j, len(ids) - 1, earlier_tokens.source_row[r.request_id])
                     for j, (r, ids) in enumerate(zip(rows, outputs))
                     if earlier_tokens is not None and ids and ids[-1] == PLACEHOLDER_TOKEN]
            for j, column, _ in holes:
                outputs[j] = outputs[j][:column] + [vocab_size]
            output_ids = pad_token_ids(outputs, vocab_size, device)
            if holes:
                row, column, source = to_device(holes, torch.int64, device).unbind(1)
                output_ids[row, column] = earlier_tokens.token_ids.index_select(0, source).to(torch.int64)
            index = to_device(penalty_rows, torch.int64, device)
            penalised = apply_penalties(
                logits.index_select(0, index),
                prompt_ids,
                output_ids,
                to_device([p.repetition_penalty for p in params], torch.float32, device),
                to_device([p.presence_penalty for p in params], torch.float32, device),
                to_device([p.frequency_penalty for p in params], torch.float32, device),
            )
            logits.index_copy_(0, index, penalised)
        if blocked:
            row_index, token_index = to_device(blocked, torch.int64, device).unbind(1)
            logits.index_put_((row_index, token_index), torch.full((), float("-inf"), device=device))
        return logits

    # -- stage 5: random sampling ----------------------------------------------------------------------------------

    def _sample_rows(self, logits: Tensor, requests: list[Request]) -> Tensor:
        """Draw one token per row. Rows are narrowed to candidates (sorted descending, with their token ids) when
        top_k/top_p need an order: torch.topk when every row has a top_k, a full sort when top_p needs it."""
        device, vocab_size = logits.device, logits.shape[-1]
        params = [r.sampling_params for r in requests]
        top_ks = [min(p.top_k, vocab_size) for p in params]
        uses_top_k, uses_top_p = any(k > 0 for k in top_ks), any(p.top_p < 1.0 for p in params)
        # Each small tensor is a host-to-device copy and a few Python-level calls: only those a row needs.
        top_k = to_device(top_ks, torch.int64, device) if uses_top_k else None
        top_p = to_device([p.top_p for p in params], torch.float32, device) if uses_top_p else None

        candidates, candidate_ids = logits, None  # None: candidates are the whole vocabulary, in order
        # The top-k candidates' tie check reads a value back: on a GPU that would wait for the device (and stall
        # async scheduling), so there the mask or full-sort paths below draw from the same distribution instead.
        if uses_top_k and all(k > 0 for k in top_ks) and max(top_ks) < vocab_size and device.type == "cpu":
            candidates, candidate_ids = logits.topk(max(top_ks), dim=-1)
            kth_value = candidates.gather(1, (top_k - 1).unsqueeze(1))
            # Top-k keeps ties with the k-th value; if a tie runs past the candidates, sort everything instead so
            # the kept set never depends on which other rows set the candidate width.
            if bool(((logits >= kth_value).sum(dim=-1) > candidates.shape[-1]).any()):
                candidates, candidate_ids = logits.sort(dim=-1, descending=True, stable=True)
        elif uses_top_p:
            candidates, candidate_ids = logits.sort(dim=-1, descending=True, stable=True)
        elif uses_top_k:
            candidates = apply_top_k(logits, top_k, max(top_ks))

        temperatures = [p.temperature for p in params]
        if len(set(temperatures)) > 1:
            candidates = candidates / to_device(temperatures, torch.float32, device).unsqueeze(1)
        elif temperatures[0] != 1.0:
            candidates = candidates / temperatures[0]
        if any(p.min_p > 0.0 for p in params):
            candidates = apply_min_p(candidates, to_device([p.min_p for p in params], torch.float32, device))
        if candidate_ids is not None:
            candidates = apply_top_k_top_p_sorted(candidates, top_k, top_p)
        position = gumbel_race(candidates, self._noise(requests, candidates.shape, candidate_ids, vocab_size, device))
        if candidate_ids is None:
            return position
        return candidate_ids.gather(1, position.unsqueeze(1)).squeeze(1)

    def _noise(
        self,
        requests: list[Request],
        shape: torch.Size,
        candidate_ids: Tensor | None,
        vocab_size: int,
        device: torch.device,
    ) -> Tensor:
        """Exp(1) noise per candidate. A seeded row's noise is drawn per token id over the whole vocabulary from
        mix(seed, output position), so its token depends on nothing but its own logits."""
        noise = torch.empty(shape, device=device)
        if any(r.sampling_params.seed is None for r in requests):
            exponential(noise, self._generator(self._global_generators, device, self.seed))
        for row, request in enumerate(requests):
            seed = request.sampling_params.seed
            if seed is not None:
                generator = self._generator(self._seeded_generators, device, 0)
                generator.manual_seed(_step_seed(seed, request.num_output_tokens))
                per_token = torch.empty(vocab_size, device=device).uniform_(generator=generator).log_().neg_()
                noise[row] = per_token if candidate_ids is None else per_token[candidate_ids[row]]
        # The clamp keeps log(noise) finite should a draw round to 0.
        return noise.clamp_min_(torch.finfo(noise.dtype).tiny)

    @staticmethod
    def _generator(cache: dict[torch.device, torch.Generator], device: torch.device, seed: int) -> torch.Generator:
        generator = cache.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
            cache[device] = generator
        return generator

    # -- stage 3: logprobs -----------------------------------------------------------------------------------------

    def _logprobs_on_device(self, logits: Tensor, token_ids: Tensor, requests: list[Request]
                            ) -> "_DeviceLogprobs | None":
        """Queues the logprob tensors of the rows that ask for them (no host synchronisation)."""
        rows = [i for i, r in enumerate(requests) if r.sampling_params.logprobs is not None]
        if not rows:
            return None
        vocab_size = logits.shape[-1]
        index = to_device(rows, torch.int64, logits.device)
        logprobs = logits.index_select(0, index).log_softmax(dim=-1)
        sampled = token_ids.index_select(0, index)
        sampled_logprob = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
        sampled_rank = (logprobs > sampled_logprob.unsqueeze(1)).sum(dim=-1) + 1
        num_top = [min(requests[i].sampling_params.logprobs or 0, vocab_size) for i in rows]
        top = None
        if max(num_top) > 0:
            values, ids = logprobs.topk(max(num_top), dim=-1)
            # Rank = 1 + number of strictly larger logprobs; all of those are inside the top-k, so searchsorted
            # over the (ascending) negated top-k values finds it without touching the vocabulary again.
            negated = -values
            top = (values, ids, torch.searchsorted(negated, negated, side="left") + 1)
        return _DeviceLogprobs(rows, num_top, sampled, sampled_logprob, sampled_rank, top)


class _DeviceLogprobs(NamedTuple):
    """A step's logprob tensors (on the device, or their pinned host copies), queued by Sampler.launch."""

    rows: list[int]  # the rows that asked for logprobs
    num_top: list[int]  # top logprobs each of them asked for
    sampled: Tensor
    sampled_logprob: Tensor
    sampled_rank: Tensor
    top: tuple[Tensor, Tensor, Tensor] | None  # values, ids, ranks of the widest ask


def logprob_entries(device_logprobs: "_DeviceLogprobs | None", num_rows: int, corrupted: list[bool]
                    ) -> list[TokenLogprobs | None]:
    """The host side of the logprobs: one entry per row (None where not asked for or corrupted)."""
    result: list[TokenLogprobs | None] = [None] * num_rows
    if device_logprobs is None:
        return result
    d = device_logprobs
    top_values: list[list[float]] = [[] for _ in d.rows]
    top_ids: list[list[int]] = [[] for _ in d.rows]
    top_ranks: list[list[int]] = [[] for _ in d.rows]
    if d.top is not None:
        top_values, top_ids, top_ranks = (t.tolist() for t in d.top)
    for j, (row, token, value, rank) in enumerate(
        zip(d.rows, d.sampled.tolist(), d.sampled_logprob.tolist(), d.sampled_rank.tolist())
    ):
        if corrupted[row]:
            continue
        entry: TokenLogprobs = {token: Logprob(logprob=value, rank=rank)}
        for top_id, top_value, top_rank in zip(top_ids[j][: d.num_top[j]], top_values[j], top_ranks[j]):
            if top_id not in entry:
                entry[top_id] = Logprob(logprob=top_value, rank=top_rank)
        result[row] = entry
    return result
