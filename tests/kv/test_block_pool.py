import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenmill.kv.block_pool import NULL_BLOCK_ID, BlockPool, NoFreeBlocksError


def test_null_block_is_never_handed_out():
    pool = BlockPool(5)
    blocks = pool.allocate(4)
    assert sorted(blocks) == [1, 2, 3, 4] and NULL_BLOCK_ID not in blocks
    assert pool.num_free_blocks == 0 and pool.num_usable_blocks == 4


def test_allocate_too_many_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_refcounts_and_release():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.incref([a])
    assert pool.refcount(a) == 2
    assert pool.decref([a, b]) == [b]
    assert pool.decref([a]) == [a]
    assert pool.num_free_blocks == 3


def test_double_free_raises_without_side_effects():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.decref([a])
    with pytest.raises(ValueError):
        pool.decref([b, a])
    assert pool.refcount(b) == 1 and pool.num_free_blocks == 2
    with pytest.raises(ValueError):
        pool.decref([b, b])
    assert pool.refcount(b) == 1


def test_misuse_raises():
    pool = BlockPool(4)
    (a,) = pool.allocate(1)
    with pytest.raises(ValueError):
        pool.incref([2])  # free block
    with pytest.raises(ValueError):
        pool.incref([NULL_BLOCK_ID])
    with pytest.raises(ValueError):
        pool.decref([99])
    pool.incref([a])
    with pytest.raises(ValueError):
        pool.free([a])  # shared
    pool.decref([a])
    pool.free([a])
    assert pool.num_free_blocks == 3
    with pytest.raises(ValueError):
        BlockPool(1)
    with pytest.raises(ValueError):
        pool.allocate(-1)


@given(st.lists(st.tuples(st.sampled_from(["alloc", "incref", "decref"]), st.integers(0, 7)), max_size=80))
def test_random_operations_keep_refcounts_consistent(ops):
    pool = BlockPool(8)
    model: dict[int, int] = {}
    for op, arg in ops:
        held = sorted(model)
        if op == "alloc":
            n = arg % 4
            if n > pool.num_free_blocks:
                with pytest.raises(NoFreeBlocksError):
                    pool.allocate(n)
                continue
            for b in pool.allocate(n):
                assert b not in model
                model[b] = 1
        elif op == "incref" and held:
            b = held[arg % len(held)]
            pool.incref([b])
            model[b] += 1
        elif op == "decref":
            b = arg % 8
            if b not in model:
                with pytest.raises(ValueError):
                    pool.decref([b])
                continue
            freed = pool.decref([b])
            model[b] -= 1
            assert freed == ([b] if model[b] == 0 else [])
            if model[b] == 0:
                del model[b]
        for b in range(1, 8):
            assert pool.refcount(b) == model.get(b, 0) >= 0
        assert pool.num_free_blocks == 7 - len(model)
