"""Chained block hashes: the name of a full KV block, the same in every process, replica, tier, index and trace.

hash(block i) = blake2b-128(parent = hash(block i-1), token ids of block i). Because the parent is folded in, equal
hashes mean equal *prefixes*, not just equal blocks: a different earlier block changes every hash after it.
Python's hash() is salted per process, so it is never used here. 128 bits keep accidental (and cheap deliberate)
collisions out of reach; a collision would serve one request another prompt's KV.

A request whose KV depends on more than its tokens (a Parcae request with its own loop-state seed) carries a cache
salt: `cache_salt(...)` names it, and it stands as the parent of the request's first block, so its chain of hashes
shares nothing with unsalted chains or chains of another salt. Requests without a salt hash exactly as before.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenmill.engine.request import Request

_DIGEST_BYTES = 16
_PERSON = b"tokenmill.kv.v1"  # domain separation: bump the version if the encoding ever changes
_SALT_PERSON = b"tokenmill.salt1"  # salts live in their own domain, apart from block hashes
_ROOT = b"\x00"  # first block of a sequence: no parent
_CHILD = b"\x01"
_INT64 = struct.Struct("<q")


def hash_block_tokens(parent: int | None, tokens: Sequence[int]) -> int:
    """Hash of one full block, given the hash of the block before it (None for the first block)."""
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=_PERSON)
    if parent is None:
        h.update(_ROOT)
    else:
        if not 0 <= parent < 1 << (8 * _DIGEST_BYTES):
            raise ValueError(f"parent block hash out of range: {parent!r}")
        h.update(_CHILD + parent.to_bytes(_DIGEST_BYTES, "little"))
    try:
        h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    except struct.error as e:
        raise ValueError(f"token ids must be 64-bit integers: {e}") from None
    return int.from_bytes(h.digest(), "little")


def cache_salt(*parts: str | int) -> int:
    """A 128-bit salt naming what besides the tokens a request's KV depends on, e.g. cache_salt("state_seed", 7).
    Pass it as the parent of the first block (`compute_block_hashes(..., parent=salt)`, `Request.cache_salt`)."""
    if not parts:
        raise ValueError("cache_salt needs at least one part")
    h = hashlib.blake2b(digest_size=_DIGEST_BYTES, person=_SALT_PERSON)
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (str, int)):
            raise ValueError(f"cache salt parts must be str or int, got {type(part).__name__}")
        encoded = part.encode() if isinstance(part, str) else str(part).encode()
        h.update(b"s" if isinstance(part, str) else b"i")
        h.update(_INT64.pack(len(encoded)) + encoded)
    return int.from_bytes(h.digest(), "little")


def compute_block_hashes(token_ids: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block gets no hash)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes


def extend_block_hashes(request: Request, block_size: int) -> list[int]:
    """Appends to `request.block_hashes` the hashes of blocks that became full since the last call; returns them."""
    num_full = request.num_tokens // block_size
    done = len(request.block_hashes)
    if done >= num_full:
        return []
    prompt, output = request.prompt_token_ids, request.output_token_ids
    parent = request.block_hashes[-1] if done else request.cache_salt
    new: list[int] = []
    for i in range(done, num_full):
        lo, hi = i * block_size, (i + 1) * block_size
        n = len(prompt)
        if hi <= n:
            tokens = prompt[lo:hi]
        elif lo >= n:
            tokens = output[lo - n : hi - n]
        else:
            tokens = prompt[lo:] + output[: hi - n]
        parent = hash_block_tokens(parent, tokens)
        new.append(parent)
    request.block_hashes.extend(new)
    return new
