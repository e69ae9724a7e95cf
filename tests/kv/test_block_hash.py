import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenmill.engine.request import Request
from tokenmill.kv.block_hash import compute_block_hashes, extend_block_hashes, hash_block_tokens
from tokenmill.sampling_params import SamplingParams


def test_hash_is_stable_across_processes_with_different_hash_seeds():
    code = "from tokenmill.kv.block_hash import compute_block_hashes as c; print(c(list(range(40)), 8))"
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outs.add(res.stdout.strip())
    assert len(outs) == 1
    assert outs.pop() == str(compute_block_hashes(list(range(40)), 8))


def test_only_full_blocks_are_hashed():
    assert compute_block_hashes([1, 2, 3], 4) == []
    assert len(compute_block_hashes(list(range(11)), 4)) == 2
    assert len(compute_block_hashes(list(range(12)), 4)) == 3


def test_chaining_a_different_earlier_block_changes_every_later_hash():
    a = compute_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = compute_block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different parent
    assert a[1] == hash_block_tokens(a[0], [5, 6, 7, 8])
    assert hash_block_tokens(None, [5, 6, 7, 8]) != a[1]


def test_parent_argument_continues_a_chain():
    tokens = list(range(24))
    full = compute_block_hashes(tokens, 8)
    assert compute_block_hashes(tokens[8:], 8, parent=full[0]) == full[1:]


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError):
        compute_block_hashes([1, 2], 0)
    with pytest.raises(ValueError):
        hash_block_tokens(None, [2**70])
    with pytest.raises(ValueError):
        hash_block_tokens(-1, [1])


@given(
    prompt=st.lists(st.integers(0, 50_000), min_size=1, max_size=40),
    outputs=st.lists(st.integers(0, 50_000), max_size=30),
    block_size=st.sampled_from([1, 2, 4, 8]),
)
def test_incremental_hashes_match_hashing_all_tokens_at_once(prompt, outputs, block_size):
    req = Request("r", list(prompt), SamplingParams())
    extend_block_hashes(req, block_size)
    for t in outputs:
        req.append_output_token(t)
        new = extend_block_hashes(req, block_size)
        assert len(new) <= 1
    assert req.block_hashes == compute_block_hashes(prompt + outputs, block_size)
