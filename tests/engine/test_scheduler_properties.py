"""Property tests: a fake model that really reads its context back from a fake paged KV store, driven through random
workloads. Wrong block sharing, a block reused while still held, or a leak shows up as a wrong token or a failed
accounting check."""

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from tokenmill.config import SchedulerConfig
from tokenmill.engine.request import PLACEHOLDER_TOKEN, Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler, SchedulerOutput
from tokenmill.kv.manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams

BS = 4
EOS = 0
VOCAB = 13
PREFIXES = [[(7 * i + j) % VOCAB + 1 for j in range(24)] for i in range(3)]  # shared system prompts


def next_token(context: list[int]) -> int:
    """Depends on the last three tokens and the length; hits EOS now and then."""
    a, b, c = ([0, 0, 0] + context)[-3:]
    return (a * 5 + b * 3 + c + len(context)) % VOCAB


class PagedFakeModel:
    """Writes every fed token into its KV slot and samples from the context it reads back from the slots."""

    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.slots: dict[int, tuple[int, int]] = {}  # flat slot -> (token, position)

    def forward(self, out: SchedulerOutput, earlier: dict[str, int] | None = None) -> dict[str, int]:
        """earlier: a step planned ahead feeds, where a request holds a placeholder, the id the step before sampled
        (as the engine's runner takes it from the device)."""
        sampled: dict[str, int] = {}
        for s in out.scheduled:
            r, table = s.request, s.request.block_ids
            assert len(table) * BS >= s.seq_len, "block table too short for the step"
            assert len(s.token_ids) == s.num_new_tokens
            fed = [earlier[r.request_id] if tok == PLACEHOLDER_TOKEN else tok for tok in s.token_ids]
            for pos, tok in zip(range(s.num_computed_tokens, s.seq_len), fed, strict=True):
                block = table[pos // BS]
                assert self.kv.pool.refcount(block) == 1, "writing into a block someone else holds"
                self.slots[block * BS + pos % BS] = (tok, pos)
            if s.samples:
                context = [self.slots[table[p // BS] * BS + p % BS] for p in range(s.seq_len)]
                assert [p for _, p in context] == list(range(s.seq_len)), "stale KV in the context"
                tokens = [t for t, _ in context]
                known = r.all_token_ids if earlier is None else r.all_token_ids[:-1] + fed[-1:]
                assert tokens == known, "context read from the KV cache is not the request's tokens"
                sampled[r.request_id] = next_token(tokens)
        return sampled


def reference_output(prompt: list[int], max_tokens: int, ignore_eos: bool) -> tuple[list[int], RequestStatus]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
        if tokens[-1] == EOS and not ignore_eos:
            return tokens[len(prompt) :], RequestStatus.FINISHED_STOPPED
    return tokens[len(prompt) :], RequestStatus.FINISHED_LENGTH


def check_accounting(sched: Scheduler) -> None:
    kv, pool, cache = sched.kv, sched.kv.pool, sched.kv.prefix_cache
    expected = [0] * pool.num_blocks
    for r in sched.running:
        assert r.status is RequestStatus.RUNNING and r.num_computed_tokens <= len(r.block_ids) * BS
        for b in r.block_ids:
            expected[b] += 1
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.block_ids == [] and r.num_computed_tokens == 0
    nodes = list(cache._index.values()) if cache else []
    for n in nodes:
        expected[n.block_id] += 1
        users = sum(n in sched.kv._paths.get(r.request_id, ()) for r in sched.running)
        assert n.lock_ref == users
    assert [pool.refcount(b) for b in range(1, pool.num_blocks)] == expected[1:]
    assert pool.num_free_blocks == sum(c == 0 for c in expected[1:])
    assert kv.num_evictable_blocks == sum(n.lock_ref == 0 for n in nodes)
    assert set(sched.requests) == {r.request_id for r in [*sched.running, *sched.waiting]}
    assert sched.running == sorted(sched.running, key=lambda r: sched._arrival[r.request_id])
    assert len(sched.running) <= sched.config.max_num_seqs


def drive(sched: Scheduler, model: PagedFakeModel, max_steps: int = 3000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update_from_output(out, model.forward(out))
        check_accounting(sched)
        outs.append(out)
        assert len(outs) < max_steps, "scheduler stalled"
    return outs


workloads = st.lists(
    st.tuples(
        st.integers(0, len(PREFIXES) - 1),  # which shared prefix
        st.integers(0, 24),  # how much of it
        st.lists(st.integers(1, VOCAB - 1), max_size=10),  # private suffix
        st.integers(1, 24),  # max_tokens
        st.booleans(),  # ignore_eos
        st.integers(0, 3),  # arrival step
    ),
    min_size=3,
    max_size=12,
)


def make_requests(workload) -> list[tuple[int, Request]]:
    out = []
    for i, (p, k, suffix, max_tokens, ignore_eos, arrival) in enumerate(workload):
        prompt = PREFIXES[p][:k] + suffix or [1]
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        out.append((arrival, Request(f"r{i}", prompt, sp, frozenset({EOS}), max_tokens=max_tokens)))
    return out


# a workload and the engine limits it runs under
RUNS = dict(workload=workloads, num_blocks=st.integers(8, 24), budget=st.sampled_from([4, 7, 16, 64]),
            max_num_seqs=st.integers(1, 6))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RUNS, threshold=st.sampled_from([None, 3, 8]))
def test_prefix_cache_on_and_off_generate_the_same_tokens(workload, num_blocks, budget, max_num_seqs, threshold):
    results = {}
    for prefix in (False, True):
        kv = KVCacheManager(num_blocks, BS, prefix)
        cfg = SchedulerConfig(max_num_seqs, budget, max_model_len=64, long_prefill_token_threshold=threshold)
        sched, model = Scheduler(cfg, kv), PagedFakeModel(kv)
        pending = make_requests(workload)
        everyone = [r for _, r in pending]
        step = 0
        while pending or sched.has_unfinished():
            for _, r in [x for x in pending if x[0] <= step]:
                sched.add_request(r)
            pending = [x for x in pending if x[0] > step]
            out = sched.schedule()
            assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= budget
            assert len(out.scheduled) <= max_num_seqs
            sched.update_from_output(out, model.forward(out))
            check_accounting(sched)
            step += 1
            assert step < 3000, "scheduler stalled"
        assert kv.usage == 0.0 and kv.num_free_blocks + kv.num_evictable_blocks == kv.num_usable_blocks
        results[prefix] = {r.request_id: (r.output_token_ids, r.status) for r in everyone}
        if prefix:
            event(f"prefix hits: {kv.prefix_cache_hits > 0}")
        event(f"preemptions: {sum(r.num_preemptions for r in everyone) > 0}")
    assert results[True] == results[False]
    assert_reference_outputs(everyone, workload, num_blocks)


def assert_reference_outputs(requests: list[Request], workload, num_blocks: int) -> None:
    """Every request generated the fake model's own tokens and status; one that outgrew the whole cache failed on
    the way."""
    capacity = (num_blocks - 1) * BS
    for r, (*_, max_tokens, ignore_eos, _) in zip(requests, workload, strict=True):
        tokens, status = r.output_token_ids, r.status
        ref_tokens, ref_status = reference_output(r.prompt_token_ids, max_tokens, ignore_eos)
        if status is RequestStatus.FINISHED_ERROR:
            event("outgrew the cache")
            assert tokens == ref_tokens[: len(tokens)] and r.num_prompt_tokens + len(tokens) > capacity
        else:
            assert (tokens, status) == (ref_tokens, ref_status)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**RUNS, prefix=st.booleans())
def test_planning_steps_ahead_generates_the_reference_tokens(workload, num_blocks, budget, max_num_seqs, prefix):
    """The engine's async scheduling: after every step, plan the next one before the sampled ids are known
    (advance_ahead / schedule_ahead: admissions and prefill chunks included, preemption never), feed it the ids as
    the device would, then resolve."""
    kv = KVCacheManager(num_blocks, BS, prefix)
    sched = Scheduler(SchedulerConfig(max_num_seqs, budget, max_model_len=64), kv)
    model = PagedFakeModel(kv)
    pending = make_requests(workload)
    everyone = [r for _, r in pending]
    launched: tuple[SchedulerOutput, dict[str, int]] | None = None
    step = ahead_steps = 0
    while pending or sched.has_unfinished():
        for _, r in [x for x in pending if x[0] <= step]:
            sched.add_request(r)
        pending = [x for x in pending if x[0] > step]
        if launched is None:
            out = sched.schedule()
            launched = (out, model.forward(out))
        out, sampled = launched
        launched = None
        if any(s.request.status is RequestStatus.RUNNING for s in out.scheduled):
            sched.advance_ahead(out)
            ahead = sched.schedule_ahead()
            if ahead is not None:
                assert len(ahead.scheduled) <= max_num_seqs and ahead.num_batched_tokens <= budget
                assert not ahead.preempted
                launched = (ahead, model.forward(ahead, earlier=sampled))
                ahead_steps += 1
            sched.resolve_ahead(out, sampled)
        else:
            sched.update_from_output(out, sampled)
        check_accounting(sched)
        step += 1
        assert step < 3000, "scheduler stalled"
    assert kv.usage == 0.0 and kv.num_free_blocks + kv.num_evictable_blocks == kv.num_usable_blocks
    event(f"steps planned ahead: {ahead_steps > 0}")
    assert_reference_outputs(everyone, workload, num_blocks)


def test_shared_prefixes_actually_hit_and_preempt_in_a_tight_cache():
    """The property above is only meaningful if its workloads exercise hits and preemption; pin one that does."""
    workload = [(0, 24, [1, 2], 12, True, 0), (0, 24, [3], 12, True, 0), (1, 20, [], 12, True, 1)] * 2
    kv = KVCacheManager(16, BS, True)
    sched, model = Scheduler(SchedulerConfig(4, 16, max_model_len=64), kv), PagedFakeModel(kv)
    reqs = [r for _, r in make_requests(workload)]
    for r in reqs:
        sched.add_request(r)
    drive(sched, model)
    assert kv.prefix_cache_hits > 0 and sum(r.num_preemptions for r in reqs) > 0
    for r, w in zip(reqs, workload, strict=True):
        assert (r.output_token_ids, r.status) == reference_output(r.prompt_token_ids, w[3], w[4])


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps, aborts and stop-string finishes; afterwards every block is free or cache-only."""

    @initialize(
        num_blocks=st.integers(4, 16),
        budget=st.sampled_from([3, 8, 32]),
        max_num_seqs=st.integers(1, 5),
        prefix=st.booleans(),
        threshold=st.sampled_from([None, 5]),
    )
    def setup(self, num_blocks, budget, max_num_seqs, prefix, threshold):
        self.kv = KVCacheManager(num_blocks, BS, prefix)
        cfg = SchedulerConfig(max_num_seqs, budget, max_model_len=64, long_prefill_token_threshold=threshold)
        self.sched = Scheduler(cfg, self.kv)
        self.model = PagedFakeModel(self.kv)
        self.count = 0
        self.all: list[Request] = []

    @rule(
        specs=st.lists(
            st.tuples(
                st.integers(0, len(PREFIXES) - 1),  # shared prefix
                st.integers(0, 24),  # how much of it
                st.lists(st.integers(1, VOCAB - 1), max_size=8),  # private suffix
                st.integers(1, 16),  # max_tokens
                st.booleans(),  # ignore_eos
            ),
            min_size=1,
            max_size=4,
        )
    )
    def add(self, specs):
        for p, k, suffix, max_tokens, ignore_eos in specs:
            prompt = PREFIXES[p][:k] + suffix or [5]
            sp = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
            r = Request(f"r{self.count}", prompt, sp, frozenset({EOS}), max_tokens=max_tokens)
            self.count += 1
            self.all.append(r)
            self.sched.add_request(r)

    @rule(n=st.integers(1, 4))
    def steps(self, n):
        for _ in range(n):
            self.step()

    def step(self):
        before = {r.request_id for r in self.sched.running}
        out = self.sched.schedule()
        cfg = self.sched.config
        assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= cfg.max_num_batched_tokens
        assert len(out.scheduled) <= cfg.max_num_seqs
        ids = [s.request.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
        # Requests running before the step come first in the batch (decodes before new prefills).
        flags = [i in before for i in ids]
        assert flags == sorted(flags, reverse=True)
        for r in out.failed:
            assert r.status is RequestStatus.FINISHED_ERROR and r.error
            event("failed: cannot fit")
        if out.preempted:
            event("preempted")
        self.sched.update_from_output(out, self.model.forward(out))

    @rule(data=st.data(), status=st.sampled_from([RequestStatus.FINISHED_ABORTED, RequestStatus.FINISHED_STOPPED]))
    def finish(self, data, status):
        if not self.sched.requests:
            return
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        req = self.sched.requests[rid]
        assert self.sched.finish_requests([rid], status) == [req]
        assert req.status is status and req.block_ids == []

    @rule()
    def schedule_then_abort_before_update(self):
        out = self.sched.schedule()
        sampled = self.model.forward(out)
        if out.scheduled:  # e.g. the client went away while the step ran
            victim = out.scheduled[-1].request
            self.sched.finish_requests(victim.request_id, RequestStatus.FINISHED_ABORTED)
        self.sched.update_from_output(out, sampled)

    @invariant()
    def accounting(self):
        if hasattr(self, "sched"):
            check_accounting(self.sched)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        drive(self.sched, self.model)
        kv = self.kv
        assert kv.usage == 0.0
        assert kv.num_free_blocks + kv.num_evictable_blocks == kv.num_usable_blocks
        evictable = kv.num_evictable_blocks
        assert kv.evict(kv.num_usable_blocks) == evictable
        assert kv.num_free_blocks == kv.num_usable_blocks
        for r in self.all:
            assert r.is_finished and r.block_ids == []
            assert r.num_output_tokens <= r.max_tokens


SchedulerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_scheduler_state_machine = SchedulerMachine.TestCase
