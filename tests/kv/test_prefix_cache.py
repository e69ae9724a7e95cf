import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.kv.block_hash import compute_block_hashes
from tokenmill.kv.prefix_cache import PrefixCache, PrefixMatch

BS = 4


def seq(*blocks: int) -> list[int]:
    """Tokens of a sequence whose i-th block is filled with the value blocks[i]."""
    return [t for b in blocks for t in [b] * BS]


def hashes(*blocks: int) -> list[int]:
    return compute_block_hashes(seq(*blocks), BS)


def test_match_after_insert():
    cache = PrefixCache(BS)
    cache.insert(hashes(1, 2, 3), [10, 11, 12])
    m = cache.match(hashes(1, 2, 3, 4))
    assert isinstance(m, PrefixMatch)
    assert m.block_ids == [10, 11, 12] and m.num_cached_tokens == 12 and m.tiers == ["gpu"] * 3
    assert cache.match_tokens(seq(1, 2) + [7]).block_ids == [10, 11]  # partial last block is not matched
    assert cache.match(hashes(5)).block_ids == []
    assert cache.peek(hashes(1, 2, 9)) == 2


def test_a_different_earlier_block_means_no_later_match():
    cache = PrefixCache(BS)
    cache.insert(hashes(1, 2, 3), [10, 11, 12])
    assert cache.match(hashes(9, 2, 3)).block_ids == []
    assert cache.match(hashes(1, 9, 3)).block_ids == [10]


def test_insert_existing_prefix_keeps_the_cached_blocks():
    cache = PrefixCache(BS)
    cache.insert(hashes(1, 2), [10, 11])
    res = cache.insert(hashes(1, 2, 3), [20, 21, 22])
    assert res.new_block_ids == [22]
    assert [n.block_id for n in res.nodes] == [10, 11, 22]
    assert cache.match(hashes(1, 2, 3)).block_ids == [10, 11, 22]


def test_insert_with_start_extends_a_cached_prefix_only():
    cache = PrefixCache(BS)
    cache.insert(hashes(1), [10])
    res = cache.insert(hashes(1, 2), [10, 11], start=1)
    assert [n.block_id for n in res.nodes] == [11]
    with pytest.raises(ValueError):
        cache.insert(hashes(5, 6), [1, 2], start=1)
    with pytest.raises(ValueError):
        cache.insert(hashes(5, 6), [1])


def test_evicts_leaves_first_then_their_parents():
    cache = PrefixCache(BS)
    cache.insert(hashes(1, 2, 3), [10, 11, 12])
    assert cache.evict(1) == [12]
    assert cache.evict(5) == [11, 10]
    assert len(cache) == 0


def test_lru_order_uses_the_last_access():
    cache = PrefixCache(BS)
    cache.insert(hashes(1), [10], now=1)
    cache.insert(hashes(2), [20], now=2)
    cache.insert(hashes(3), [30], now=3)
    cache.match(hashes(1), now=4)
    assert cache.evict(1) == [20]
    assert cache.evict(1) == [30]
    assert cache.evict(1) == [10]


def test_lru_without_a_clock_follows_access_order():
    cache = PrefixCache(BS)
    cache.insert(hashes(1), [10])
    cache.insert(hashes(2), [20])
    cache.match(hashes(1))
    assert cache.evict(1) == [20]


def test_locked_nodes_are_never_evicted():
    cache = PrefixCache(BS)
    cache.insert(hashes(1, 2), [10, 11])
    cache.insert(hashes(1, 3), [10, 12])
    m = cache.match(hashes(1, 2))
    cache.lock(m)
    assert cache.stats().num_evictable_blocks == 1
    assert cache.evict(10) == [12]
    assert len(cache) == 2
    cache.unlock(m)
    assert sorted(cache.evict(10)) == [10, 11]


def test_lock_needs_a_root_path_and_unlock_a_lock():
    cache = PrefixCache(BS)
    res = cache.insert(hashes(1, 2), [10, 11])
    with pytest.raises(ValueError):
        cache.lock(res.nodes[1:])
    with pytest.raises(ValueError):
        cache.unlock(res.nodes)
    cache.lock(res.nodes[:1])
    cache.lock(res.nodes[1:])  # continues a locked path
    cache.unlock(res.nodes)
    evicted = cache.evict(2)
    with pytest.raises(ValueError):
        cache.lock(res.nodes)  # evicted nodes cannot be locked
    assert evicted == [11, 10]


def test_stats_and_reset():
    cache = PrefixCache(BS)
    cache.insert(hashes(1, 2), [10, 11])
    cache.match(hashes(1, 2, 3))
    cache.match(hashes(4))
    s = cache.stats()
    assert (s.queries, s.query_tokens, s.hit_tokens, s.num_cached_blocks) == (2, 16, 8, 2)
    assert s.hit_rate == 0.5
    m = cache.match(hashes(1))
    cache.lock(m)
    with pytest.raises(RuntimeError):
        cache.reset()
    cache.unlock(m)
    assert sorted(cache.reset()) == [10, 11]
    assert len(cache) == 0 and cache.stats().queries == 0
    assert cache.match(hashes(1)).block_ids == []


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_operations_evict_only_unlocked_leaves(data):
    cache = PrefixCache(BS)
    next_block = iter(range(1, 10_000))
    locks: list[list] = []
    for _ in range(data.draw(st.integers(1, 40))):
        op = data.draw(st.sampled_from(["insert", "lock", "unlock", "evict"]))
        if op == "insert":
            path = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=5))
            cache.insert(hashes(*path), [next(next_block) for _ in path], now=data.draw(st.integers(0, 5)))
        elif op == "lock":
            path = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=5))
            m = cache.match(hashes(*path))
            if m.nodes:
                cache.lock(m)
                locks.append(m.nodes)
        elif op == "unlock" and locks:
            cache.unlock(locks.pop(data.draw(st.integers(0, len(locks) - 1))))
        elif op == "evict":
            nodes = {n.block_id: n for n in cache._index.values()}
            freed = cache.evict(data.draw(st.integers(0, 4)))
            for b in freed:
                n = nodes[b]
                assert n.lock_ref == 0 and not n.children and not n.alive
        locked = {id(n) for path in locks for n in path}
        for n in cache._index.values():
            assert n.lock_ref == sum(m is n for path in locks for m in path)
            assert n.alive and (n.parent is cache.root or n.parent.alive)
            if id(n) in locked:
                assert n.parent is cache.root or id(n.parent) in locked
        assert cache.num_evictable_blocks == sum(n.lock_ref == 0 for n in cache._index.values())
    # Every unlocked block is reclaimable, and nothing else is.
    evictable = cache.num_evictable_blocks
    assert len(cache.evict(10_000)) == evictable
    assert all(n.lock_ref > 0 for n in cache._index.values())
