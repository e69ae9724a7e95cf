"""Cache salts: requests whose KV depends on more than their tokens (Parcae state seeds) never share blocks with
requests of another salt, and share as usual within one salt."""

import pytest

from tokenmill.engine.request import Request
from tokenmill.kv.block_hash import cache_salt, compute_block_hashes, extend_block_hashes
from tokenmill.kv.manager import KVCacheManager
from tokenmill.sampling_params import SamplingParams

BS = 4


def test_salt_is_deterministic_and_typed():
    assert cache_salt("state_seed", 5) == cache_salt("state_seed", 5)
    assert len({cache_salt("state_seed", 5), cache_salt("state_seed", 6), cache_salt("state_seed", "5")}) == 3
    assert 0 <= cache_salt("x") < 1 << 128
    with pytest.raises(ValueError):
        cache_salt()
    with pytest.raises(ValueError):
        cache_salt(1.5)


def test_salted_request_hashes_chain_from_the_salt():
    tokens = list(range(10))
    salt = cache_salt("state_seed", 3)
    plain, salted = Request("a", tokens, SamplingParams()), Request("b", tokens, SamplingParams(), cache_salt=salt)
    extend_block_hashes(plain, BS)
    extend_block_hashes(salted, BS)
    assert plain.block_hashes == compute_block_hashes(tokens, BS)
    assert salted.block_hashes == compute_block_hashes(tokens, BS, parent=salt)
    assert not set(plain.block_hashes) & set(salted.block_hashes)


def run_to_completion(kv: KVCacheManager, r: Request) -> int:
    computed = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - computed.num_computed_tokens, computed)
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)
    kv.free(r)
    return computed.num_computed_tokens


def test_prefix_cache_shares_only_within_a_salt():
    kv = KVCacheManager(num_blocks=20, block_size=BS)
    tokens = list(range(13))
    s1, s2 = cache_salt("state_seed", 1), cache_salt("state_seed", 2)
    assert run_to_completion(kv, Request("a", tokens, SamplingParams())) == 0
    assert run_to_completion(kv, Request("b", tokens, SamplingParams(), cache_salt=s1)) == 0
    assert run_to_completion(kv, Request("c", tokens, SamplingParams(), cache_salt=s2)) == 0
    assert run_to_completion(kv, Request("d", tokens, SamplingParams(), cache_salt=s1)) == 12
    assert run_to_completion(kv, Request("e", tokens, SamplingParams())) == 12
    assert kv.num_free_blocks + kv.num_evictable_blocks == kv.num_usable_blocks
