"""A radix tree over full KV blocks, keyed by chained block hash.

Each node is one full block; a node's children are keyed by their chained hash, and a flat index maps every
hash to its node (hashes are chained, so a hash names a whole prefix and the index is enough to find a parent).
The tree knows block ids but not the pool: the owner (kv/manager.py) keeps one pool reference per cached block
and releases it for each id that evict() returns.

Locks: a user of cached blocks locks the *whole root path* of nodes it depends on (match().nodes is such a path;
insert() returns the continuation). Locked nodes are never evicted. Because locks cover root paths, a node with
lock_ref 0 has no locked descendant, so every unlocked node can be reclaimed by evicting leaves repeatedly.

Recency is a logical clock: calls take `now` (any non-decreasing number: a step count, a virtual time); leaving it
out reuses the latest time seen, and ties break by the order of access, so plain LRU needs no clock at all.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from typing import Literal, NamedTuple

from tokenmill.kv.block_hash import compute_block_hashes

Tier = Literal["gpu", "host", "disk"]


class CacheNode:
    """One cached full block. `tier` says where its KV lives; only "gpu" nodes carry a usable block_id today."""

    __slots__ = ("block_hash", "block_id", "parent", "children", "lock_ref", "last_access", "tick", "tier", "alive")

    def __init__(self, block_hash: int | None, block_id: int, parent: CacheNode | None, tier: Tier = "gpu") -> None:
        self.block_hash = block_hash
        self.block_id = block_id
        self.parent = parent
        self.children: dict[int, CacheNode] = {}
        self.lock_ref = 0
        self.last_access = 0.0
        self.tick = 0
        self.tier: Tier = tier
        self.alive = True

    @property
    def is_root(self) -> bool:
        return self.parent is None

    def __repr__(self) -> str:
        h = "root" if self.block_hash is None else f"{self.block_hash:032x}"[:12]
        return f"CacheNode({h}, block={self.block_id}, lock={self.lock_ref}, tier={self.tier})"


class PrefixMatch(NamedTuple):
    block_ids: list[int]
    num_cached_tokens: int
    nodes: list[CacheNode]  # root path, one node per matched block
    tiers: list[Tier]  # where each matched block lives


class InsertResult(NamedTuple):
    nodes: list[CacheNode]  # one per inserted position: the continuation of the caller's root path
    new_block_ids: list[int]  # blocks the tree adopted (the caller takes a pool reference for the tree)


class PrefixCacheStats(NamedTuple):
    queries: int  # match() calls
    query_tokens: int  # tokens looked up
    hit_tokens: int  # tokens found
    num_cached_blocks: int
    num_evictable_blocks: int  # unlocked, reclaimable by evict()
    num_evicted_blocks: int

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class PrefixCache:
    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._reset_state()

    def _reset_state(self) -> None:
        self.root = CacheNode(None, -1, None)
        self._index: dict[int, CacheNode] = {}
        self._num_unlocked = 0
        self._now = 0.0
        self._ticks = itertools.count(1)
        self._pushes = itertools.count()
        self._lru: list[tuple[float, int, int, CacheNode]] = []  # lazy heap of (last_access, tick, push#, node)
        self._queries = self._query_tokens = self._hit_tokens = self._evicted = 0

    # ---- queries -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._index

    def get(self, block_hash: int) -> CacheNode | None:
        return self._index.get(block_hash)

    @property
    def num_evictable_blocks(self) -> int:
        return self._num_unlocked

    def match(self, block_hashes: Sequence[int], now: float | None = None) -> PrefixMatch:
        """Longest cached prefix of these chained block hashes; marks the matched blocks as used at `now`."""
        t = self._clock(now)
        nodes: list[CacheNode] = []
        node = self.root
        for h in block_hashes:
            node = node.children.get(h)
            if node is None:
                break
            nodes.append(node)
        for n in nodes:
            self._touch(n, t)
        num_cached = len(nodes) * self.block_size
        self._queries += 1
        self._query_tokens += len(block_hashes) * self.block_size
        self._hit_tokens += num_cached
        return PrefixMatch([n.block_id for n in nodes], num_cached, nodes, [n.tier for n in nodes])

    def match_tokens(self, token_ids: Sequence[int], now: float | None = None) -> PrefixMatch:
        return self.match(compute_block_hashes(token_ids, self.block_size), now)

    def peek(self, block_hashes: Sequence[int]) -> int:
        """Number of leading blocks cached; no stats, no recency change (for routers and read-only views)."""
        node, n = self.root, 0
        for h in block_hashes:
            node = node.children.get(h)
            if node is None:
                break
            n += 1
        return n

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            self._queries, self._query_tokens, self._hit_tokens, len(self._index), self._num_unlocked, self._evicted
        )

    # ---- updates -------------------------------------------------------------------------------------------------

    def insert(
        self, block_hashes: Sequence[int], block_ids: Sequence[int], start: int = 0, now: float | None = None
    ) -> InsertResult:
        """Caches blocks start.. of a sequence. Blocks before `start` must already be cached (the caller holds
        them locked). Where a hash is already cached (another sequence computed the same prefix), the existing node
        is kept and the caller's block stays private to it."""
        if len(block_hashes) != len(block_ids):
            raise ValueError(f"{len(block_hashes)} hashes but {len(block_ids)} block ids")
        if not 0 <= start <= len(block_hashes):
            raise ValueError(f"start {start} out of range for {len(block_hashes)} blocks")
        if start == 0:
            parent = self.root
        else:
            parent = self._index.get(block_hashes[start - 1])
            if parent is None:
                raise ValueError(f"block {start - 1} of this sequence is not cached; cannot extend it")
        t = self._clock(now)
        nodes: list[CacheNode] = []
        adopted: list[int] = []
        for h, b in zip(block_hashes[start:], block_ids[start:], strict=True):
            node = parent.children.get(h)
            if node is None:
                if h in self._index:
                    raise RuntimeError(f"block hash {h:032x} is cached under another parent (hash collision)")
                node = CacheNode(h, b, parent)
                parent.children[h] = node
                self._index[h] = node
                self._num_unlocked += 1
                adopted.append(b)
            self._touch(node, t)
            nodes.append(node)
            parent = node
        return InsertResult(nodes, adopted)

    def lock(self, match: PrefixMatch | Sequence[CacheNode]) -> None:
        """Pins a root path of nodes (a PrefixMatch, or insert()'s nodes continuing an already locked path)."""
        nodes = match.nodes if isinstance(match, PrefixMatch) else match
        for i, n in enumerate(nodes):
            if not n.alive:
                raise ValueError(f"{n} was evicted; match again")
            parent = n.parent
            if not (parent is self.root or (i > 0 and parent is nodes[i - 1]) or parent.lock_ref > 0):
                raise ValueError(f"lock() needs a root path; the parent of {n} is not locked")
        for n in nodes:
            if n.lock_ref == 0:
                self._num_unlocked -= 1
            n.lock_ref += 1

    def unlock(self, match: PrefixMatch | Sequence[CacheNode], now: float | None = None) -> None:
        """Releases a lock taken by lock(); the blocks count as used at `now` (release is the last use)."""
        nodes = match.nodes if isinstance(match, PrefixMatch) else match
        for n in nodes:
            if n.lock_ref <= 0:
                raise ValueError(f"{n} is not locked")
        t = self._clock(now)
        for n in nodes:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._num_unlocked += 1
            self._touch(n, t)

    def evict(self, num_blocks: int) -> list[int]:
        """Drops up to `num_blocks` unlocked leaves, least recently used first (a parent left childless becomes a
        candidate); returns the freed block ids. Never touches locked nodes."""
        freed: list[int] = []
        while len(freed) < num_blocks and self._lru:
            t, tick, _, node = heapq.heappop(self._lru)
            if not (node.alive and node.tick == tick and node.lock_ref == 0 and not node.children):
                continue  # stale entry
            self._remove(node)
            freed.append(node.block_id)
            parent = node.parent
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                self._push(parent)
        self._evicted += len(freed)
        return freed

    def reset(self) -> list[int]:
        """Empties the cache; returns every cached block id. Refuses (RuntimeError) while any node is locked."""
        if self._num_unlocked != len(self._index):
            raise RuntimeError("cannot reset the prefix cache while requests hold cached blocks")
        freed = [n.block_id for n in self._index.values()]
        for n in self._index.values():
            n.alive = False
        self._reset_state()
        return freed

    # ---- internals -----------------------------------------------------------------------------------------------

    def _clock(self, now: float | None) -> float:
        if now is not None and now > self._now:
            self._now = float(now)
        return self._now

    def _touch(self, node: CacheNode, t: float) -> None:
        node.last_access = t
        node.tick = next(self._ticks)
        if node.lock_ref == 0 and not node.children:
            self._push(node)

    def _push(self, node: CacheNode) -> None:
        heapq.heappush(self._lru, (node.last_access, node.tick, next(self._pushes), node))
        if len(self._lru) > 2 * len(self._index) + 64:
            self._compact()

    def _compact(self) -> None:
        self._lru = [
            (n.last_access, n.tick, next(self._pushes), n)
            for n in self._index.values()
            if n.lock_ref == 0 and not n.children
        ]
        heapq.heapify(self._lru)

    def _remove(self, node: CacheNode) -> None:
        node.alive = False
        del node.parent.children[node.block_hash]
        del self._index[node.block_hash]
        self._num_unlocked -= 1
