"""A fixed set of KV blocks with reference counts. Knows nothing about prefixes or requests.

Block 0 is reserved as the null block: it is never handed out, so the runner can pad block tables (and the
slot mapping of padded CUDA-graph batch entries) with 0 and whatever lands there harms no sequence. A pool of
`num_blocks` therefore lends out `num_blocks - 1` blocks.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

NULL_BLOCK_ID = 0


class NoFreeBlocksError(RuntimeError):
    """allocate() asked for more blocks than are free."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self._refcounts = [0] * num_blocks
        self._free: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    def refcount(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._refcounts[block_id]

    def allocate(self, n: int) -> list[int]:
        """n free blocks, each with refcount 1. Raises NoFreeBlocksError (and changes nothing) if fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} KV blocks, only {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refcounts[b] = 1
        return blocks

    def incref(self, block_ids: Iterable[int]) -> None:
        """One more holder for each block (a block listed twice gains two). Blocks must be allocated."""
        block_ids = list(block_ids)
        for b in block_ids:
            self._check_id(b)
            if self._refcounts[b] == 0:
                raise ValueError(f"block {b} is free; allocate it before sharing it")
        for b in block_ids:
            self._refcounts[b] += 1

    def decref(self, block_ids: Iterable[int]) -> list[int]:
        """One holder fewer for each block; returns the blocks that reached 0 (now free). Validates before changing
        anything, so a double free raises without side effects."""
        counts = Counter(block_ids)
        for b, c in counts.items():
            self._check_id(b)
            if self._refcounts[b] < c:
                raise ValueError(f"block {b} has refcount {self._refcounts[b]}; cannot release it {c} time(s)")
        freed: list[int] = []
        for b, c in counts.items():
            self._refcounts[b] -= c
            if self._refcounts[b] == 0:
                freed.append(b)
                self._free.append(b)
        return freed

    def free(self, block_ids: Iterable[int]) -> None:
        """Releases blocks the caller holds alone (refcount 1); raises if any is shared or already free."""
        block_ids = list(block_ids)
        for b, c in Counter(block_ids).items():
            self._check_id(b)
            if self._refcounts[b] != 1 or c != 1:
                raise ValueError(f"block {b} is not held exactly once (refcount {self._refcounts[b]}); use decref")
        self.decref(block_ids)

    def _check_id(self, block_id: int) -> None:
        if not 0 < block_id < self.num_blocks:
            what = "the reserved null block" if block_id == NULL_BLOCK_ID else "out of range"
            raise ValueError(f"block id {block_id} is {what} (pool of {self.num_blocks})")
