import pytest

from tokenmill.engine.request import Request
from tokenmill.kv.manager import ComputedBlocks, KVCacheManager
from tokenmill.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams())


def admit(kv: KVCacheManager, r: Request, num_new: int | None = None) -> bool:
    computed = kv.get_computed_blocks(r)
    n = r.num_tokens - computed.num_computed_tokens if num_new is None else num_new
    if not kv.allocate_slots(r, n, computed):
        return False
    r.num_computed_tokens = computed.num_computed_tokens
    return True


def compute(kv: KVCacheManager, r: Request, n: int) -> None:
    """Pretend the runner computed n more tokens."""
    r.num_computed_tokens += n
    kv.cache_full_blocks(r)


def check_accounting(kv: KVCacheManager, live: list[Request]) -> None:
    pool, cache = kv.pool, kv.prefix_cache
    expected = [0] * pool.num_blocks
    for r in live:
        for b in r.block_ids:
            expected[b] += 1
    if cache is not None:
        for n in cache._index.values():
            expected[n.block_id] += 1
    assert [pool.refcount(b) for b in range(1, pool.num_blocks)] == expected[1:]
    assert pool.num_free_blocks == sum(c == 0 for c in expected[1:])


def test_hit_never_covers_the_whole_prompt():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", list(range(8)))
    assert admit(kv, a)
    compute(kv, a, 8)
    a_blocks = list(a.block_ids)
    kv.free(a)
    b = req("b", list(range(8)))
    # Both blocks are cached, but the last token (and so its block) is recomputed.
    assert kv.get_computed_blocks(b) == ComputedBlocks(a_blocks[:1], 4)
    c = req("c", list(range(9)))
    assert kv.get_computed_blocks(c).num_computed_tokens == 8


def test_prefix_hit_shares_blocks_and_counts_stats():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", list(range(10)))
    assert admit(kv, a)
    compute(kv, a, 10)
    b = req("b", list(range(8)) + [99, 98, 97])
    assert admit(kv, b)
    assert b.num_computed_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    assert len(b.block_ids) == 3
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (21, 8)
    check_accounting(kv, [a, b])
    kv.free(a)
    kv.free(b)
    check_accounting(kv, [])
    assert kv.usage == 0.0 and kv.num_evictable_blocks == 2


def test_allocation_failure_has_no_side_effects():
    kv = KVCacheManager(num_blocks=6, block_size=BS)  # 5 usable blocks
    a = req("a", list(range(12)))
    assert admit(kv, a)
    compute(kv, a, 12)
    kv.free(a)  # 3 cached, evictable blocks
    hog = req("hog", [7] * 8)
    assert admit(kv, hog)  # takes the 2 free blocks
    b = req("b", list(range(12)) + list(range(100, 116)))  # 7 blocks: 3 cached + 4 new > 3 evictable
    computed = kv.get_computed_blocks(b)
    assert len(computed.block_ids) == 3
    before = ([kv.pool.refcount(i) for i in range(1, 6)], kv.num_free_blocks, kv.num_evictable_blocks)
    assert not kv.allocate_slots(b, b.num_tokens - 12, computed)
    assert b.block_ids == [] and b.num_computed_tokens == 0
    assert ([kv.pool.refcount(i) for i in range(1, 6)], kv.num_free_blocks, kv.num_evictable_blocks) == before
    check_accounting(kv, [hog])


def test_allocation_evicts_unreferenced_cached_blocks_but_not_the_hit():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = req("a", list(range(12)))
    assert admit(kv, a)
    compute(kv, a, 12)
    a_blocks = list(a.block_ids)
    kv.free(a)
    hog = req("hog", [7] * 8)
    assert admit(kv, hog)
    b = req("b", list(range(8)) + [50, 51, 52])  # hits 2 blocks, needs 1 more: evicts a's third block
    assert admit(kv, b)
    assert b.block_ids[:2] == a_blocks[:2] and b.num_computed_tokens == 8
    assert b.block_ids[2] == a_blocks[2]  # the evicted block, reused
    assert kv.num_free_blocks == 0 and len(kv.prefix_cache) == 2
    check_accounting(kv, [hog, b])


def test_decode_allocates_a_block_only_when_the_last_one_is_full():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    r = req("r", [1, 2, 3])
    assert admit(kv, r)
    assert len(r.block_ids) == 1
    compute(kv, r, 3)
    r.append_output_token(4)
    assert kv.allocate_slots(r, 1) and len(r.block_ids) == 1
    compute(kv, r, 1)
    r.append_output_token(5)
    assert kv.allocate_slots(r, 1) and len(r.block_ids) == 2
    with pytest.raises(ValueError):
        kv.allocate_slots(r, 2)  # more tokens than the request has, though its blocks would hold them
    with pytest.raises(ValueError):
        kv.allocate_slots(r, -1)
    assert len(r.block_ids) == 2 and kv.num_free_blocks == 7


def test_disabled_cache_never_hits_and_frees_everything():
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    a = req("a", list(range(10)))
    assert admit(kv, a)
    compute(kv, a, 10)
    assert len(a.block_hashes) == 2  # hashes are still kept for routers and traces
    kv.free(a)
    assert kv.num_free_blocks == 9 and kv.usage == 0.0
    b = req("b", list(range(10)))
    assert kv.get_computed_blocks(b) == ComputedBlocks([], 0)
    assert kv.prefix_cache_queries == 0


def test_same_prefix_computed_twice_concurrently_is_accounted():
    kv = KVCacheManager(num_blocks=12, block_size=BS)
    a, b = req("a", list(range(9))), req("b", list(range(9)))
    assert admit(kv, a) and admit(kv, b)  # neither is cached yet
    assert set(a.block_ids).isdisjoint(b.block_ids)
    compute(kv, a, 9)
    b_own = list(b.block_ids)
    compute(kv, b, 9)  # b's full blocks duplicate a's: b switches to the cached ones and frees its copies
    assert len(kv.prefix_cache) == 2
    assert b.block_ids == a.block_ids[:2] + b_own[2:]
    assert all(kv.pool.refcount(x) == 0 for x in b_own[:2])
    check_accounting(kv, [a, b])
    kv.free(a)
    check_accounting(kv, [b])
    assert kv.evict(10) == 0  # b holds both cached blocks
    kv.free(b)
    check_accounting(kv, [])
    assert kv.evict(10) == 2 and kv.num_free_blocks == 11


def test_stale_computed_blocks_are_rejected():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", list(range(9)))
    assert admit(kv, a)
    compute(kv, a, 9)
    kv.free(a)
    b = req("b", list(range(9)))
    computed = kv.get_computed_blocks(b)
    kv.evict(10)
    with pytest.raises(ValueError):
        kv.allocate_slots(b, 1, computed)


def test_reset_prefix_cache_only_when_nothing_holds_cached_blocks():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", list(range(9)))
    assert admit(kv, a)
    compute(kv, a, 9)
    assert not kv.reset_prefix_cache()
    kv.free(a)
    assert kv.reset_prefix_cache()
    assert kv.num_free_blocks == 9 and len(kv.prefix_cache) == 0


def test_view_is_read_only_window():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a = req("a", list(range(9)))
    assert admit(kv, a)
    view = kv.view()
    assert view.num_free_blocks == 6 and view.usage == pytest.approx(3 / 9)
    compute(kv, a, 9)
    queries = kv.prefix_cache.stats().queries
    assert view.num_cached_tokens(req("b", list(range(9)) + [1])) == 8
    assert kv.prefix_cache.stats().queries == queries
    assert view.capacity_tokens == 36 and view.num_blocks_needed(5) == 2
