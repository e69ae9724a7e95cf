"""LLMEngine: the step loop (schedule → run → sample → update → detokenize).

With async scheduling (on for CUDA) a step's successor is planned and launched before the step's tokens reach the
host, so the host's share of a step hides behind the GPU's (see LLMEngine.step).

For the server, AsyncEngine (async_engine.py) runs this loop in a process of its own (engine_process.py) or on a
background thread; LLM (offline API) drives it directly.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace

import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.engine.output_deltas import RequestDelta
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.outputs import EngineObserver, NullObserver, RequestOutput
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.runner import DecodeTier, ModelRunner
from tokenmill.engine.sampler import EarlierTokens, PendingSample, Sampler
from tokenmill.engine.scheduler import Scheduler, SchedulerOutput
from tokenmill.kv.block_hash import cache_salt as kv_cache_salt
from tokenmill.kv.manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_CPU_DEFAULT_KV_BYTES = 2 << 30


@dataclass(frozen=True)
class RequestLimits:
    """What a request must satisfy to ever run; small and picklable, so a server process apart from the engine's
    can refuse a bad request before it is queued."""

    max_model_len: int
    vocab_size: int
    uses_state_seed: bool

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a request that can never run."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens, which must also hold at least one generated token"
            )
        bad = next((t for t in prompt_token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is out of range for a vocabulary of {self.vocab_size}")
        if params.state_seed is not None and not self.uses_state_seed:
            raise ValueError("state_seed applies only to looped models with a seeded loop state (Parcae)")
        room = self.max_model_len - len(prompt_token_ids)
        if params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"max_tokens={params.max_tokens} plus the prompt's {len(prompt_token_ids)} tokens exceeds the "
                f"maximum context length of {self.max_model_len}"
            )


@dataclass
class _LaunchedStep:
    """A step on the device: its plan, the requests of its sampling rows (in row order), their pending tokens."""

    sched: SchedulerOutput
    requests: list[Request]
    pending: PendingSample | None
    advanced: bool = False  # the scheduler counted its tokens as placeholders (Scheduler.advance_ahead)

    @property
    def has_live_requests(self) -> bool:
        """Some request scheduled in it has not finished (a stop or an abort may end one while it is in flight)."""
        return any(s.request.status is RequestStatus.RUNNING for s in self.sched.scheduled)


class LLMEngine:
    def __init__(self, config: EngineConfig, observer: EngineObserver | None = None) -> None:
        from tokenmill.kernels.backends import get_attention_backend
        from tokenmill.models.hub import resolve_model
        from tokenmill.models.loader import load_model
        from tokenmill.models.quantization import resolve_quantization
        from tokenmill.tokenizer import Tokenizer

        self.config = config
        self.observer: EngineObserver = observer or NullObserver()
        self.device = config.resolved_device()
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {config.device!r} is not available: torch sees {torch.cuda.device_count()} "
                             "CUDA device(s)")
        self.dtype = config.resolved_dtype()
        torch.manual_seed(config.seed)

        source = resolve_model(config.model)
        self.quantization = resolve_quantization(config.quantization, source, self.device, config.dtype)
        if self.quantization != "none" and config.dtype == "auto":
            # The quantized layers compute in bf16 anyway; bf16 activations and KV also halve attention's traffic.
            self.dtype = torch.bfloat16
        # 'fused' and 'megakernel' replace the whole decode step; prefill and mixed steps keep the model with the best
        # attention. 'auto' on a GPU tries both, quietly: each applies only to bf16 Llama-family models (and the
        # megakernel to sm_90), and where neither does the model decodes as it prefills.
        auto_gpu = config.decode_backend == "auto" and self.device.type == "cuda"
        use_megakernel = config.decode_backend == "megakernel" or auto_gpu
        fused = config.decode_backend in ("fused", "megakernel") or auto_gpu
        backend = get_attention_backend("auto" if fused else config.decode_backend, self.device)
        loaded = load_model(
            source, dtype=self.dtype, device=self.device, attn_backend=backend,
            parcae_recurrence=config.parcae_recurrence,
        )
        self.model = loaded.model
        if self.quantization != "none":
            if not hasattr(self.model, "quantize_"):
                name = type(self.model).__name__
                raise ValueError(f"--quantization {self.quantization} is not implemented for {name}")
            self.model.quantize_(self.quantization)
        # Looped models (Parcae) seed each request's initial loop state: SamplingParams.state_seed, else --seed. Only
        # requests with another seed than the default get a cache salt, so default requests share prefixes as usual.
        self.uses_state_seed = bool(getattr(self.model, "uses_state_seed", False))
        self.default_state_seed = config.seed
        # Decode-only steps: the megakernel for the smallest batches, the fused kernels up to theirs, the model above.
        decode_models = []
        if use_megakernel:
            from tokenmill.kernels.megakernel.decoder import default_short_context, make_megakernel_decoder

            short_context = config.megakernel_short_context
            if short_context is None:
                short_context = default_short_context(torch.cuda.get_device_name(self.device)
                                                      if self.device.type == "cuda" else "")
            short_batch = config.megakernel_short_context_batch if short_context > 0 else 0
            # None, with a warning (asked for) or an info line (auto), where it can't run
            megakernel = make_megakernel_decoder(self.model, self.device,
                                                 max(config.megakernel_max_batch, short_batch), quiet=auto_gpu)
            if megakernel is not None:
                any_context = min(config.megakernel_max_batch, megakernel.max_batch_size)
                decode_models.append(DecodeTier(megakernel, any_context))
                logger.info("decode backend: one persistent megakernel launch per decode step (batch <= %d)",
                            any_context)
                short_batch = min(short_batch, megakernel.max_batch_size)
                if short_batch > any_context:
                    decode_models.append(DecodeTier(megakernel, short_batch, short_context))
                    logger.info("decode backend: the megakernel also up to batch %d while no sequence is longer "
                                "than %d tokens", short_batch, short_context)
        if fused:
            from tokenmill.kernels.fused_llama import make_fused_decoder

            fused_decoder = make_fused_decoder(self.model, self.device, quiet=auto_gpu)  # None where it can't run
            if fused_decoder is not None:
                decode_models.append(fused_decoder)
                logger.info("decode backend: fused Triton kernels for decode-only steps (batch <= %d)",
                            fused_decoder.max_batch_size)
        self.model_config: ModelConfig = loaded.config
        self.tokenizer_source = config.tokenizer or loaded.source
        self.tokenizer = Tokenizer.from_source(self.tokenizer_source)
        if config.served_model_name is None:
            config.served_model_name = source.display_name

        sched_cfg = config.scheduler
        self.max_model_len = min(sched_cfg.max_model_len, self.model_config.max_position_embeddings)
        sched_cfg.max_model_len = self.max_model_len
        sched_cfg.max_num_batched_tokens = max(sched_cfg.max_num_batched_tokens, 1)

        cache_cfg = config.cache
        num_blocks = self._num_kv_blocks()
        self.num_blocks = num_blocks
        self.kv = KVCacheManager(num_blocks, cache_cfg.block_size, cache_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.kv)
        mc = self.model_config
        self.runner = ModelRunner(
            self.model,
            num_layers=getattr(self.model, "num_kv_layers", mc.num_hidden_layers),
            num_kv_heads=mc.num_key_value_heads,
            head_dim=mc.head_dim,
            num_blocks=num_blocks,
            block_size=cache_cfg.block_size,
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            device=self.device,
            use_cuda_graphs=not config.enforce_eager and config.cudagraph_mode != "none"
            and getattr(backend, "supports_cuda_graphs", False)
            and getattr(self.model, "supports_cuda_graphs", True),
            max_graph_batch_size=sched_cfg.max_num_seqs,
            decode_models=decode_models,
            piecewise_max_tokens=sched_cfg.max_num_batched_tokens if config.cudagraph_mode == "full_and_piecewise"
            else 0,
        )
        self.sampler = Sampler(max_logprobs=config.max_logprobs, seed=config.seed, fused_race=config.fused_sampling)
        self.sampler.warm_up(self.model_config.vocab_size, self.device)
        # On by default where the device runs asynchronously to the host; on the CPU there is nothing to overlap.
        self.async_scheduling = config.async_scheduling == "on" or (
            config.async_scheduling == "auto" and self.device.type == "cuda")
        self._ahead: _LaunchedStep | None = None  # a step launched before its predecessor's tokens were known
        self.limits = RequestLimits(self.max_model_len, self.model_config.vocab_size, self.uses_state_seed)
        self.outputs = OutputProcessor(self.tokenizer, self.observer)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(mc.eos_token_ids)
        logger.info(
            "engine ready: %s on %s/%s, %d KV blocks of %d tokens (%.1f tokens/seq at max_num_seqs)",
            config.served_model_name, self.device, self.dtype, num_blocks, cache_cfg.block_size,
            num_blocks * cache_cfg.block_size / sched_cfg.max_num_seqs,
        )

    # ---- sizing ------------------------------------------------------------------------------------------------

    def _num_kv_blocks(self) -> int:
        cache_cfg = self.config.cache
        if cache_cfg.num_blocks is not None:
            return cache_cfg.num_blocks
        layers = getattr(self.model, "num_kv_layers", self.model_config.num_hidden_layers)
        per_token = 2 * layers * self.model_config.num_key_value_heads * self.model_config.head_dim
        per_block = per_token * cache_cfg.block_size * self.dtype.itemsize
        if cache_cfg.kv_cache_memory_bytes is not None:
            budget = cache_cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave room for activations and CUDA graphs: a fixed reserve plus the logits of a full token budget.
            reserve = (1 << 30) + 4 * self.config.scheduler.max_num_batched_tokens * self.model_config.vocab_size
            budget = int(total * cache_cfg.gpu_memory_utilization) - (total - free) - reserve
        else:
            # Enough for every sequence at full length, capped so a laptop keeps its memory.
            need = self.config.scheduler.max_num_seqs * self.max_model_len * per_token * 4
            budget = min(_CPU_DEFAULT_KV_BYTES, need)
        blocks = budget // per_block
        min_blocks = -(-self.max_model_len // cache_cfg.block_size)
        if blocks < min_blocks:
            raise ValueError(
                f"KV cache budget of {budget / 2**20:.0f} MiB holds {blocks} blocks, fewer than one sequence of "
                f"max_model_len={self.max_model_len} needs ({min_blocks}); lower --max-model-len or raise the KV memory"
            )
        return int(blocks)

    # ---- requests ----------------------------------------------------------------------------------------------

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a request that can never run; cheap, so callers on other threads may use it."""
        self.limits.check(prompt_token_ids, params)

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
        report_progress: bool = True,
    ) -> str:
        """Queues a request; returns its id. Raises ValueError for a request that can never run. report_progress
        False: step() reports it only once it has finished (a caller that does not stream), which saves building
        and handing over a whole output per step."""
        self.validate_request(prompt_token_ids, params)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.outputs.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        room = self.max_model_len - len(prompt_token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        arrival = time.monotonic()
        state_seed = cache_salt = None
        if self.uses_state_seed:
            state_seed = self.default_state_seed if params.state_seed is None else params.state_seed
            if state_seed != self.default_state_seed:
                cache_salt = kv_cache_salt("state_seed", state_seed)
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = replace(params, seed=params.seed + i)
            child_id = request_id if params.n == 1 else f"{request_id}-{i}"
            children.append(
                Request(
                    request_id=child_id,
                    prompt_token_ids=list(prompt_token_ids),
                    sampling_params=child_params,
                    eos_token_ids=self.eos_token_ids,
                    max_tokens=max_tokens,
                    arrival_time=arrival,
                    cache_salt=cache_salt,
                    state_seed=state_seed,
                )
            )
        self.outputs.add(request_id, list(prompt_token_ids), children, report_progress)
        for child in children:
            self.scheduler.add_request(child)
        return request_id

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        return self.outputs.collect(self._abort(request_id))

    def abort_request_deltas(self, request_id: str) -> list[RequestDelta]:
        """abort_request's output as a delta (step_deltas)."""
        return self.outputs.collect_deltas(self._abort(request_id))

    def _abort(self, request_id: str) -> set[str]:
        child_ids = self.outputs.child_ids(request_id)
        if not child_ids:
            return set()
        self.scheduler.finish_requests(child_ids, RequestStatus.FINISHED_ABORTED)
        self._forget_finished_ahead()
        # An abort that leaves the engine idle is followed by no step, so the gauges must hear of it here.
        self.observer.on_step(self.scheduler.get_stats())
        return {request_id}

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step loop -----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduler step. Returns a RequestOutput for every request with news (for a request added with
        report_progress False, only once it has finished), each with its whole output so far.

        With async scheduling, while a step's tokens are still on the device the next step is planned and launched
        (its placeholder input ids are filled on the device), so the host's work for one step (scheduling, sampling
        set-up, detokenizing, stop checks) runs while the GPU computes the next."""
        return self.outputs.collect(self._step())

    def step_deltas(self) -> list[RequestDelta]:
        """step() reporting only what is new for each request (output_deltas.RequestDelta; DeltaDecoder rebuilds
        step()'s outputs from them). Its cost per request is the step's news, where step() copies each request's
        whole output so far (the engine's process serves this way). A request is read one way only."""
        return self.outputs.collect_deltas(self._step())

    def _step(self) -> set[str]:
        """One scheduler step; the API request ids with news."""
        touched: set[str] = set()
        launched, self._ahead = self._ahead, None
        if launched is None:
            sched = self.scheduler.schedule()
            touched.update(self._parent_id(req) for req in sched.failed)  # they can never fit
            launched = self._launch(sched)
        if self.async_scheduling:
            self._ahead = self._launch_ahead(launched)
            if self._ahead is not None:
                touched.update(self._parent_id(req) for req in self._ahead.sched.failed)
        self._complete(launched, touched)
        self._forget_finished_ahead()
        return touched

    def _parent_id(self, req: Request) -> str:
        """The API request a sequence belongs to (itself where the output processor no longer knows it)."""
        return self.outputs.parent_of(req.request_id) or req.request_id

    def _forget_finished_ahead(self) -> None:
        """A step launched ahead whose requests all finished meanwhile has nothing left to deliver."""
        if self._ahead is not None and not self._ahead.has_live_requests:
            self._ahead = None

    def _launch(self, sched: SchedulerOutput, earlier_tokens: EarlierTokens | None = None) -> _LaunchedStep:
        scheduled = [(s.request, s.num_new_tokens) for s in sched.scheduled]
        if not scheduled:
            return _LaunchedStep(sched, [], None)
        step = self.runner.execute(scheduled, earlier_tokens)
        if not step.rows:
            return _LaunchedStep(sched, [], None)
        requests = [scheduled[r][0] for r in step.rows]
        return _LaunchedStep(sched, requests, self.sampler.launch(step.logits, requests, earlier_tokens, step.greedy))

    def _launch_ahead(self, launched: _LaunchedStep) -> _LaunchedStep | None:
        """Plans and launches the step after `launched` while its tokens are still on the device
        (Scheduler.schedule_ahead); None where nothing can run yet."""
        if not launched.has_live_requests:
            return None
        self.scheduler.advance_ahead(launched.sched)
        launched.advanced = True
        ahead = self.scheduler.schedule_ahead()
        if ahead is None:
            return None
        earlier = None
        if launched.pending is not None:
            earlier = EarlierTokens(launched.pending.token_ids,
                                    {req.request_id: row for row, req in enumerate(launched.requests)})
        return self._launch(ahead, earlier)

    def _complete(self, launched: _LaunchedStep, touched: set[str]) -> None:
        """Waits for a launched step's tokens and applies them: scheduler state, outputs, stop strings; adds the
        API requests with news to `touched`."""
        sched = launched.sched
        sampled: dict[str, int] = {}
        corrupted_reqs: list[Request] = []
        logprobs_of: dict[str, object] = {}
        if launched.pending is not None:
            out = launched.pending.result()
            for req, tok, lp, bad in zip(launched.requests, out.token_ids, out.logprobs, out.corrupted):
                if req.status is not RequestStatus.RUNNING:
                    continue  # finished (a stop, an abort) after this step was launched ahead
                if bad:
                    corrupted_reqs.append(req)
                else:
                    sampled[req.request_id] = tok
                    logprobs_of[req.request_id] = lp
        now = time.monotonic()
        if launched.advanced:  # placeholders out first: a corrupted row's request gives its back
            finished = self.scheduler.resolve_ahead(sched, sampled)
        for req in corrupted_reqs:  # fail these before the update, so they never receive a token
            req.error = "the model produced NaN or infinite logits for this request; it was stopped"
            self.outputs.record_tokens(req, None, True, now)
            self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_ERROR)
            touched.add(self._parent_id(req))
        if not launched.advanced:
            finished = self.scheduler.update_from_output(sched, sampled)
        stop_hits: list[Request] = []
        for s in sched.scheduled:
            req = s.request
            parent_id = self.outputs.parent_of(req.request_id)
            if parent_id is None:
                continue
            if req.request_id in sampled:
                touched.add(parent_id)
                hit = self.outputs.record_tokens(req, logprobs_of.get(req.request_id), False, now)
                if hit is not None and not req.is_finished:
                    req.stop_reason = hit
                    stop_hits.append(req)
        for req in stop_hits:
            self.scheduler.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
        touched.update(self._parent_id(req) for req in finished)
        self.observer.on_step(self.scheduler.get_stats())

    def generate_blocking(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], progress=None
    ) -> list[RequestOutput]:
        """Runs prompts to completion and returns their final outputs in order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(p, sp, report_progress=False) for p, sp in zip(prompts, params_list)]
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
                    if progress is not None:
                        progress()
        return [final[i] for i in ids]
