"""KV block accounting for the scheduler: a BlockPool plus (optionally) a PrefixCache.

Ownership, which every test checks: each block in a live request's `block_ids` carries one pool reference for that
request, and each cached block carries one more for the prefix cache. A request locks the root path of cache nodes
covering its full computed blocks, and uses exactly those nodes' blocks there, so a cached block's refcount is
1 + its lock count, a block held only by the cache is exactly an unlocked node, and evicting it frees it.

Block tables are append-only except for one case: when cache_full_blocks() finds that another request already
cached the same block (both computed the same prefix concurrently), the request switches to the cached block and
frees its duplicate (the KV is the same tokens at the same positions). The runner must therefore rebuild block
tables from request.block_ids every step rather than only appending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from tokenmill.kv.block_hash import extend_block_hashes
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.prefix_cache import CacheNode, PrefixCache, PrefixCacheStats

if TYPE_CHECKING:
    from tokenmill.engine.request import Request


class ComputedBlocks(NamedTuple):
    """Cached blocks a waiting request can start from: pass to allocate_slots(new_computed_blocks=...)."""

    block_ids: list[int]
    num_computed_tokens: int


_NO_BLOCKS = ComputedBlocks([], 0)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.prefix_cache: PrefixCache | None = PrefixCache(block_size) if enable_prefix_caching else None
        self._paths: dict[str, list[CacheNode]] = {}  # request id -> locked root path of cache nodes
        # Counted once per admission (allocate_slots with new_computed_blocks), in tokens.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- capacity ------------------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one request could ever hold (the whole pool)."""
        return self.pool.num_usable_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_evictable_blocks(self) -> int:
        return self.prefix_cache.num_evictable_blocks if self.prefix_cache else 0

    @property
    def num_available_blocks(self) -> int:
        """Free now, or free after evicting unreferenced cached blocks."""
        return self.num_free_blocks + self.num_evictable_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by live requests (cached-but-unreferenced blocks count as free)."""
        return 1.0 - self.num_available_blocks / self.num_usable_blocks

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_cached_tokens(self, request: Request) -> int:
        """Tokens of `request` a new admission would find cached (read-only: no stats, no recency change)."""
        if self.prefix_cache is None:
            return 0
        extend_block_hashes(request, self.block_size)
        return self.prefix_cache.peek(request.block_hashes[: self._max_hit_blocks(request)]) * self.block_size

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return self.prefix_cache.stats() if self.prefix_cache else None

    def view(self) -> KVView:
        return KVView(self)

    # ---- the scheduler's calls ----------------------------------------------------------------------------------

    def get_computed_blocks(self, request: Request, now: float | None = None) -> ComputedBlocks:
        """Longest cached prefix of a request that holds no blocks yet. Never the whole sequence: the last token is
        always left to compute so the step has logits to sample from."""
        if request.block_ids:
            raise ValueError(f"request {request.request_id} already holds blocks; only admission looks up the cache")
        extend_block_hashes(request, self.block_size)
        if self.prefix_cache is None:
            return _NO_BLOCKS
        match = self.prefix_cache.match(request.block_hashes[: self._max_hit_blocks(request)], now)
        return ComputedBlocks(match.block_ids, match.num_cached_tokens)

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: ComputedBlocks | None = None,
        now: float | None = None,
    ) -> bool:
        """Makes room for request.num_computed_tokens (+ the cached hit) + num_new_tokens tokens, evicting
        unreferenced cached blocks if the free list is short. Returns False, changing nothing, if that is
        impossible. Passing new_computed_blocks (even empty) marks an admission: it is counted in the prefix stats
        and its cached blocks join request.block_ids; the caller then sets request.num_computed_tokens."""
        if new_computed_blocks is None and 0 <= num_new_tokens:
            total = request.num_computed_tokens + num_new_tokens
            if total <= request.num_tokens and total <= len(request.block_ids) * self.block_size:
                return True  # its blocks already hold them (most decode steps): nothing to allocate or check
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        hit = new_computed_blocks or _NO_BLOCKS
        if hit.block_ids and request.block_ids:
            raise ValueError(f"request {request.request_id} already holds blocks; cannot add cached ones")
        if hit.num_computed_tokens != len(hit.block_ids) * self.block_size:
            raise ValueError("new_computed_blocks.num_computed_tokens must cover exactly its blocks")
        total = request.num_computed_tokens + hit.num_computed_tokens + num_new_tokens
        if total > request.num_tokens:
            raise ValueError(
                f"request {request.request_id}: cannot compute {total} tokens, it has only {request.num_tokens}"
            )
        num_held = len(request.block_ids) + len(hit.block_ids)
        num_needed = max(0, self.num_blocks_needed(total) - num_held)

        hit_nodes = self._resolve_hit(request, hit)
        if hit_nodes:
            self.prefix_cache.lock(hit_nodes)  # before evicting, so eviction cannot take them
        shortfall = num_needed - self.pool.num_free_blocks
        if shortfall > 0:
            if shortfall > self.num_evictable_blocks:
                if hit_nodes:
                    self.prefix_cache.unlock(hit_nodes, now)
                return False
            self._evict(shortfall)
        new_blocks = self.pool.allocate(num_needed)

        if hit_nodes:
            self.pool.incref(hit.block_ids)
            self._paths[request.request_id] = hit_nodes
        if new_computed_blocks is not None and self.prefix_cache is not None:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += hit.num_computed_tokens
        if hit.block_ids:
            request.block_ids = hit.block_ids + new_blocks
        else:
            request.block_ids.extend(new_blocks)
        return True

    def cache_full_blocks(self, request: Request, now: float | None = None) -> None:
        """After a step: hashes newly full blocks and caches those whose tokens are all computed."""
        extend_block_hashes(request, self.block_size)
        if self.prefix_cache is None:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        if num_full > len(request.block_ids):
            raise ValueError(f"request {request.request_id} computed more tokens than its blocks hold")
        path = self._paths.setdefault(request.request_id, [])
        if num_full <= len(path):
            return
        start = len(path)
        result = self.prefix_cache.insert(
            request.block_hashes[:num_full], request.block_ids[:num_full], start=start, now=now
        )
        self.pool.incref(result.new_block_ids)  # the cache's own reference
        self.prefix_cache.lock(result.nodes)
        path.extend(result.nodes)
        # Another request cached the same prefix first: switch to its block and free our duplicate, so a request
        # never pins a cached block it does not use.
        for pos, node in enumerate(result.nodes, start):
            duplicate = request.block_ids[pos]
            if node.block_id != duplicate:
                self.pool.incref([node.block_id])
                request.block_ids[pos] = node.block_id
                if self.pool.decref([duplicate]) != [duplicate]:
                    raise RuntimeError(f"duplicate block {duplicate} of {request.request_id} is shared")

    def free(self, request: Request, now: float | None = None) -> None:
        """Releases a request's blocks (finished or preempted). Its cached blocks stay in the tree, evictable."""
        path = self._paths.pop(request.request_id, None)
        if path:
            self.prefix_cache.unlock(path, now)
        self.pool.decref(request.block_ids)
        request.block_ids = []

    def evict(self, num_blocks: int) -> int:
        """Evicts up to num_blocks unreferenced cached blocks back to the free list; returns how many."""
        return self._evict(num_blocks) if self.prefix_cache else 0

    def reset_prefix_cache(self) -> bool:
        """Drops every cached block; False (and nothing changes) while running requests hold cached blocks."""
        if self.prefix_cache is None:
            return True
        if self.prefix_cache.num_evictable_blocks != len(self.prefix_cache):
            return False
        self._release_cached(self.prefix_cache.reset())
        return True

    # ---- internals -----------------------------------------------------------------------------------------------

    def _max_hit_blocks(self, request: Request) -> int:
        return max(0, request.num_tokens - 1) // self.block_size

    def _resolve_hit(self, request: Request, hit: ComputedBlocks) -> list[CacheNode]:
        if not hit.block_ids:
            return []
        if self.prefix_cache is None:
            raise ValueError("new_computed_blocks given but prefix caching is disabled")
        nodes = [self.prefix_cache.get(h) for h in request.block_hashes[: len(hit.block_ids)]]
        if len(nodes) != len(hit.block_ids) or any(
            n is None or n.block_id != b for n, b in zip(nodes, hit.block_ids, strict=True)
        ):
            raise ValueError("new_computed_blocks is stale (evicted or from another request); look it up again")
        return nodes

    def _evict(self, num_blocks: int) -> int:
        freed = self.prefix_cache.evict(num_blocks)
        self._release_cached(freed)
        return len(freed)

    def _release_cached(self, block_ids: list[int]) -> None:
        released = self.pool.decref(block_ids)
        if len(released) != len(block_ids):
            raise RuntimeError("evicted a cached block that a request still holds (lock accounting is broken)")


class KVView:
    """Read-only window on a KVCacheManager for policies (scheduler, router, simulator)."""

    __slots__ = ("_kv",)

    def __init__(self, kv: KVCacheManager) -> None:
        self._kv = kv

    @property
    def block_size(self) -> int:
        return self._kv.block_size

    @property
    def num_usable_blocks(self) -> int:
        return self._kv.num_usable_blocks

    @property
    def capacity_tokens(self) -> int:
        return self._kv.capacity_tokens

    @property
    def num_free_blocks(self) -> int:
        return self._kv.num_free_blocks

    @property
    def num_available_blocks(self) -> int:
        return self._kv.num_available_blocks

    @property
    def usage(self) -> float:
        return self._kv.usage

    def num_blocks_needed(self, num_tokens: int) -> int:
        return self._kv.num_blocks_needed(num_tokens)

    def num_cached_tokens(self, request: Request) -> int:
        return self._kv.num_cached_tokens(request)
