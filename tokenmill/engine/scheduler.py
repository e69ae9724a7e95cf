"""Continuous batching with chunked prefill: which requests run this step, and how many new tokens each.

Pure policy over Request state and a KVCacheManager: no tensors, no wall clock (pass `now` for the prefix cache's
LRU if you have a clock; the simulator drives this same class).

Every request has num_computed_tokens (tokens whose KV is in the cache). A step gives each scheduled request
num_new_tokens starting there: 1 for a decode, a chunk for a prefill. A request samples a token only in the step
that reaches the end of its known tokens; a prefill chunk that stops short samples nothing.

Order: running requests first, in arrival order (add_request order), then waiting ones, first come first served
(a head that does not fit blocks those behind it). No new request is admitted in a step that preempted.

Preemption (recompute): when a running request cannot get a block, the most recently arrived running request loses
its blocks (full ones stay in the prefix cache), goes back to the front of the queue, and will recompute. That
victim is always a request not yet scheduled this step, or the requester itself when it is the newest: an older
request is never preempted for a newer one, so the oldest running request always progresses and two requests can
never keep undoing each other's work (the property tests found that livelock when older requests could be victims).
A running request that is alone and still cannot get a block needs more than the whole cache: it fails with
FINISHED_ERROR, as does a waiting request longer than the whole cache, so the loop never stalls.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from tokenmill.engine.outputs import SchedulerStats
from tokenmill.engine.request import PLACEHOLDER_TOKEN, Request, RequestStatus
from tokenmill.kv.manager import KVCacheManager

if TYPE_CHECKING:  # config.py imports torch; the scheduler must stay importable without it
    from tokenmill.config import SchedulerConfig


class ScheduledRequest(NamedTuple):
    """One request's share of a step. The runner feeds token_ids at positions num_computed_tokens..seq_len-1,
    using request.block_ids as the block table (read it at forward time; see kv/manager.py on why tables are
    rebuilt each step), and samples one token from the last position iff `samples`."""

    request: Request
    num_new_tokens: int
    num_computed_tokens: int  # context already cached before this step: the new tokens sit at positions from here
    samples: bool  # this step reaches the end of the request's known tokens, so the runner must sample one

    @property
    def seq_len(self) -> int:
        """Context length including this step's tokens."""
        return self.num_computed_tokens + self.num_new_tokens

    @property
    def token_ids(self) -> list[int]:
        """The tokens to feed this step."""
        r, start = self.request, self.num_computed_tokens
        n = r.num_prompt_tokens
        if self.seq_len <= n:
            return r.prompt_token_ids[start : self.seq_len]
        return r.prompt_token_ids[start:] + r.output_token_ids[max(0, start - n) : self.seq_len - n]


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # in batch order: running requests first, then newly admitted ones
    num_batched_tokens: int
    preempted: list[Request] = field(default_factory=list)  # lost their blocks this step
    failed: list[Request] = field(default_factory=list)  # finished with FINISHED_ERROR this step (cannot fit)
    finished_request_ids: set[str] = field(default_factory=set)  # finished since the previous schedule()
    step: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_sampling(self) -> int:
        return sum(s.samples for s in self.scheduled)


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = scheduler_config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival
        self.requests: dict[str, Request] = {}  # every unfinished request
        self._arrival: dict[str, int] = {}
        self._arrivals = itertools.count()
        self._finished_ids: set[str] = set()
        self._step = 0
        self._stat_preemptions = self._stat_prompt_tokens = self._stat_generation_tokens = 0
        self._last_prefix_queries = self._last_prefix_hits = 0

    # ---- requests in and out -------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in the scheduler")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.block_ids:
            raise ValueError(f"request {rid!r} is not new (status {request.status.value})")
        if not request.prompt_token_ids:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if request.num_prompt_tokens > self.config.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt of {request.num_prompt_tokens} tokens exceeds max_model_len "
                f"{self.config.max_model_len}"
            )
        if request.max_tokens < 1:
            raise ValueError(f"request {rid!r}: max_tokens must be >= 1, got {request.max_tokens}")
        self.requests[rid] = request
        self._arrival[rid] = next(self._arrivals)
        self.waiting.append(request)

    def finish_requests(
        self, request_ids: str | Iterable[str], status: RequestStatus, now: float | None = None
    ) -> list[Request]:
        """Ends requests wherever they are (aborts, errors, stop strings); frees their blocks. Unknown or already
        finished ids are ignored. Returns the requests this call finished."""
        if not status.finished:
            raise ValueError(f"finish_requests needs a finished status, got {status}")
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        done: list[Request] = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status is RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            self._finish(req, status, now)
            done.append(req)
        return done

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- one step ------------------------------------------------------------------------------------------------

    def schedule(self, now: float | None = None) -> SchedulerOutput:
        return self._schedule(now, ahead=False)

    def _schedule(self, now: float | None, ahead: bool) -> SchedulerOutput:
        self._step += 1
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[Request] = []
        failed: list[Request] = []
        stalled = False  # ahead: a running request could not get its blocks

        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted or failed earlier in this step
            if budget <= 0:
                break
            if ahead and self._finishes_regardless(req):
                continue
            num_new = self._num_new_tokens(req, budget)
            if num_new == 0:
                continue
            while not self.kv.allocate_slots(req, num_new, now=now):
                if ahead:  # never preempt ahead: this request and the ones after it wait
                    stalled = True
                    break
                victim = self.running[-1]  # the most recently arrived; never one already scheduled this step
                if victim is req and len(self.running) == 1:
                    self.running.remove(req)
                    self._fail(req, req.num_computed_tokens + num_new, now)
                    failed.append(req)
                    break
                self._preempt(victim, now)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = self._scheduled(req, num_new)
                budget -= num_new
            if stalled:
                break

        while not preempted and not stalled and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            if req.num_tokens > self.kv.capacity_tokens:
                self.waiting.popleft()
                self._fail(req, req.num_tokens, now)
                failed.append(req)
                continue
            computed = self.kv.get_computed_blocks(req, now)
            num_new = req.num_tokens - computed.num_computed_tokens
            if cfg.enable_chunked_prefill:
                num_new = self._cap_chunk(num_new, budget)
            elif num_new > budget:
                break
            if not self.kv.allocate_slots(req, num_new, computed, now):
                break
            self.waiting.popleft()
            req.num_computed_tokens = computed.num_computed_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = computed.num_computed_tokens
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=lambda r: self._arrival[r.request_id])
            scheduled[req.request_id] = self._scheduled(req, num_new)
            budget -= num_new

        finished_ids, self._finished_ids = self._finished_ids, set()
        return SchedulerOutput(
            scheduled=list(scheduled.values()),
            num_batched_tokens=cfg.max_num_batched_tokens - budget,
            preempted=preempted,
            failed=failed,
            finished_request_ids=finished_ids,
            step=self._step,
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: Mapping[str, int], now: float | None = None
    ) -> list[Request]:
        """Applies a step's results: advances num_computed_tokens, appends sampled tokens, caches newly full
        blocks, and finishes requests that hit EOS / a stop token / their length limit. `sampled_token_ids` must
        hold exactly the live requests with `samples` set (requests finished since schedule() may be left out or
        included). Returns the requests finished here."""
        live = self._live_unapplied(scheduler_output)
        sampling = [s.request.request_id for s in live if s.samples]
        # Cheap test first (every step): as many ids as expected, each of them there, means exactly these.
        if len(sampling) != len(sampled_token_ids) or not all(rid in sampled_token_ids for rid in sampling):
            expected = set(sampling)
            scheduled_ids = {s.request.request_id for s in scheduler_output.scheduled}
            missing = expected - sampled_token_ids.keys()
            unexpected = sampled_token_ids.keys() - expected - (scheduled_ids - {s.request.request_id for s in live})
            if missing or unexpected:
                raise ValueError(
                    f"sampled tokens do not match the step: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
                )

        finished: list[Request] = []
        for s in live:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            token = None
            if s.samples:
                token = sampled_token_ids[req.request_id]
                req.append_output_token(token)
            if self._settle(s, token, now):
                finished.append(req)
        return finished

    @staticmethod
    def _live_unapplied(scheduler_output: SchedulerOutput) -> list[ScheduledRequest]:
        """The step's requests still running; raises if the step was already applied to them."""
        live = [s for s in scheduler_output.scheduled if s.request.status is RequestStatus.RUNNING]
        for s in live:
            if s.request.num_computed_tokens != s.num_computed_tokens:
                raise RuntimeError(f"request {s.request.request_id}: step {scheduler_output.step} already applied")
        return live

    def _settle(self, s: ScheduledRequest, token: int | None, now: float | None) -> bool:
        """The rest of a step's update once its progress and token are on the request: statistics, newly full
        blocks into the prefix cache, stop checks. Returns whether the request finished."""
        req = s.request
        self._stat_prompt_tokens += max(0, min(s.seq_len, req.num_prompt_tokens) - s.num_computed_tokens)
        status = None
        if token is not None:
            self._stat_generation_tokens += 1
            status = self._check_stop(req, token)
        self.kv.cache_full_blocks(req, now)
        if status is None:
            return False
        self.running.remove(req)
        self._finish(req, status, now)
        return True

    # ---- planning a decode step before the previous step's tokens are known (async scheduling) ----------------

    def advance_ahead(self, scheduler_output: SchedulerOutput) -> None:
        """Step N (`scheduler_output`) is on the device: count its tokens as computed and give each request that
        samples in it a placeholder output token, so that schedule_ahead can plan step N+1 before N's sampled ids
        reach the host. resolve_ahead(N) must follow before anything else reads the requests' tokens."""
        for s in self._live_unapplied(scheduler_output):
            s.request.num_computed_tokens += s.num_new_tokens
            if s.samples:
                s.request.append_output_token(PLACEHOLDER_TOKEN)

    def schedule_ahead(self, now: float | None = None) -> SchedulerOutput | None:
        """schedule() for step N+1 while step N's sampled ids are placeholders (after advance_ahead), with two
        differences: a request that finishes whatever its placeholder turns out to be (a length limit) sits out,
        and nobody is preempted (a recompute would start from a placeholder): where a running request cannot get
        its blocks, it and the requests after it wait and nobody is admitted. None where nothing would run."""
        out = self._schedule(now, ahead=True)
        if out.scheduled or out.failed:
            return out
        self._step -= 1
        self._finished_ids |= out.finished_request_ids
        return None

    def _finishes_regardless(self, req: Request) -> bool:
        """Its last output token is a placeholder and it has reached a length limit: it finishes at resolve."""
        return bool(req.output_token_ids) and req.output_token_ids[-1] == PLACEHOLDER_TOKEN and (
            req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len)

    def resolve_ahead(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: Mapping[str, int], now: float | None = None
    ) -> list[Request]:
        """Step N's sampled ids replace advance_ahead's placeholders; what update_from_output does after appending
        them follows (cached full blocks, stop checks). A request that sampled but has no id (its row was corrupted)
        loses its placeholder and the step's progress; the caller finishes it. Returns the requests finished here."""
        finished: list[Request] = []
        for s in scheduler_output.scheduled:
            req = s.request
            if req.status is not RequestStatus.RUNNING:
                continue
            if req.num_computed_tokens != s.seq_len or (s.samples and req.output_token_ids[-1] != PLACEHOLDER_TOKEN):
                raise RuntimeError(f"request {req.request_id}: step {scheduler_output.step} was not run ahead")
            token = sampled_token_ids.get(req.request_id) if s.samples else None
            if s.samples and token is None:
                req.output_token_ids.pop()
                req.num_computed_tokens = s.num_computed_tokens
                continue
            if token is not None:
                req.output_token_ids[-1] = token
            if self._settle(s, token, now):
                finished.append(req)
        return finished

    def get_stats(self) -> SchedulerStats:
        """Gauges now, counters since the previous call."""
        queries, hits = self.kv.prefix_cache_queries, self.kv.prefix_cache_hits
        stats = SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=queries - self._last_prefix_queries,
            prefix_cache_hits=hits - self._last_prefix_hits,
            num_preemptions=self._stat_preemptions,
            num_prompt_tokens=self._stat_prompt_tokens,
            num_generation_tokens=self._stat_generation_tokens,
        )
        self._last_prefix_queries, self._last_prefix_hits = queries, hits
        self._stat_preemptions = self._stat_prompt_tokens = self._stat_generation_tokens = 0
        return stats

    # ---- internals -----------------------------------------------------------------------------------------------

    def _num_new_tokens(self, req: Request, budget: int) -> int:
        n = req.num_tokens - req.num_computed_tokens
        if self.config.enable_chunked_prefill:
            return self._cap_chunk(n, budget)
        return n if n <= budget else 0

    def _cap_chunk(self, n: int, budget: int) -> int:
        threshold = self.config.long_prefill_token_threshold
        if threshold is not None and 0 < threshold < n:
            n = threshold
        return min(n, budget)

    @staticmethod
    def _scheduled(req: Request, num_new: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        return ScheduledRequest(req, num_new, start, start + num_new == req.num_tokens)

    def _preempt(self, req: Request, now: float | None) -> None:
        self.running.remove(req)
        self.kv.free(req, now)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self._stat_preemptions += 1
        self.waiting.appendleft(req)

    def _fail(self, req: Request, num_tokens: int, now: float | None) -> None:
        req.error = (
            f"{num_tokens} tokens need {self.kv.num_blocks_needed(num_tokens)} KV blocks of {self.kv.block_size} "
            f"tokens but the cache has only {self.kv.num_usable_blocks}; enlarge the KV cache or lower max_model_len"
        )
        self._finish(req, RequestStatus.FINISHED_ERROR, now)

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        sp = req.sampling_params
        if req.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and token in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in sp.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, req: Request, status: RequestStatus, now: float | None) -> None:
        self.kv.free(req, now)
        req.status = status
        del self.requests[req.request_id]
        del self._arrival[req.request_id]
        self._finished_ids.add(req.request_id)
