"""Block tables of running requests over a `BlockPool`. Writer: the scheduler.

Invariant: a request's table holds exactly ceil(tokens_reserved / block_size) blocks, where
tokens_reserved is the largest total passed to `allocate_slots` (or `fork`) since its last `free`.

Sharing: `fork` gives a child the parent's full blocks (one more reference each) and, when the
shared length ends inside a block, a fresh block plus a (src, dst) copy order for that partial
block (copy-on-write), so the child's own tokens never land in a block others read. Nothing is
recomputed for a prefix that is not a block multiple.

Kept KV (`keep_finished`): `free` given a finished sequence's tokens records its blocks in a `PrefixCache`
before they go back to the pool, and `adopt` starts a table with blocks `match_tail` found there (see
`core/prefix_cache.py`): full blocks shared, never written again; a tail block copied on write into a block of the
request's own (it stays findable for the next request that wants it, as a parent's partial block for its members).
"""

from __future__ import annotations

from batchllm.core.block_pool import BlockPool
from batchllm.core.prefix_cache import PrefixCache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, keep_finished: bool = False) -> None:
        """keep_finished: keep what finished sequences leave findable by their tokens (`cache`); off, `free`
        records nothing and `match` finds nothing."""
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self.cache = (PrefixCache(block_size, self.pool.generations, num_blocks, keep_tails=True) if keep_finished
                      else None)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def allocate_slots(self, request_id: str, total_tokens: int) -> bool:
        """Grow the request's table to cover `total_tokens` tokens. False (and no change) if the
        pool has too few free blocks."""
        table = self._tables.get(request_id)
        if table is None:
            table = self._tables[request_id] = []
        missing = -(-total_tokens // self.block_size) - len(table)  # (every running request, every step)
        if missing <= 0:
            return True
        if missing > self.pool.num_free_blocks:
            if not table:
                del self._tables[request_id]
            return False
        table.extend(self.pool.allocate(missing))
        return True

    def fork(self, child_id: str, parent_id: str, num_tokens: int) -> tuple[bool, tuple[int, int] | None]:
        """Start the child's table with the parent's first `num_tokens` tokens.

        Returns (ok, copy): ok is False (and nothing changes) if the copy-on-write block cannot be
        had; copy is the (src, dst) block pair the runner must copy before the child writes KV."""
        if child_id in self._tables:
            raise ValueError(f"{child_id!r} already holds blocks")
        parent = self._tables[parent_id]
        full, partial = divmod(num_tokens, self.block_size)
        if len(parent) < full + (1 if partial else 0):
            raise ValueError(f"{parent_id!r} holds {len(parent)} blocks, fewer than {num_tokens} tokens need")
        if partial and self.pool.num_free_blocks < 1:
            return False, None
        table = parent[:full]
        self.pool.share(table)
        copy = None
        if partial:
            [dst] = self.pool.allocate(1)
            copy = (parent[full], dst)
            table = table + [dst]
        self._tables[child_id] = list(table)
        return True, copy

    def free(self, request_id: str, tokens=None, outputs: list[int] = (), num_kept: int = 0) -> None:
        """Release every block of the request (no-op if it holds none). With `tokens` (its prompt) and the cache
        on, first record its first `num_kept` tokens of tokens + outputs, whose KV its table holds, for `match`."""
        table = self._tables.pop(request_id, None)
        if table:
            if tokens is not None and self.cache is not None:
                self.cache.record(tokens, outputs, num_kept, table)
            self.pool.free(table)

    def match(self, tokens, max_tokens: int, index_new: bool = True) -> list[int]:
        """The blocks of the longest run of `tokens`' full blocks, at most `max_tokens` tokens, whose KV the cache
        holds (`PrefixCache.match`; none when the cache is off)."""
        if self.cache is None:
            return []
        return self.cache.match(tokens, max_tokens // self.block_size, index_new)

    def match_tail(self, tokens, max_tokens: int, index_new: bool = True) -> tuple[list[int], tuple[int, int] | None]:
        """`match`'s blocks and then a tail block holding the next tokens' KV, (block, tokens) or None
        (`PrefixCache.match_tail`)."""
        if self.cache is None:
            return [], None
        return self.cache.match_tail(tokens, max_tokens, index_new)

    def fork_onto_kept(self, child_id: str, parent_id: str, num_tokens: int, kept: list[int],
                       tail: bool = False) -> None:
        """Start the child's table with the parent's full blocks among its first `num_tokens` tokens (one more
        reference each), then the blocks `match` found for the child's tokens past them (`adopt`). `kept` holds at
        least the parent's full blocks' tokens and, with a kept tail after it (`tail_copy`), reaches past
        `num_tokens`: its block over the parent's partial last block (if any), or the tail's copy, holds the same
        tokens, so the parent's partial block is not copied."""
        if child_id in self._tables:
            raise ValueError(f"{child_id!r} already holds blocks")
        full = num_tokens // self.block_size
        if len(kept) < full or (len(kept) * self.block_size <= num_tokens and not tail):
            raise ValueError(f"{len(kept)} kept blocks and no tail do not reach past the fork point {num_tokens}")
        table = self._tables[parent_id][:full]
        self.pool.share(table)
        self.pool.revive(kept[full:])
        self._tables[child_id] = table + kept[full:]

    def adopt(self, request_id: str, blocks: list[int]) -> None:
        """Start a table with blocks `match` found: one more reference each (free ones taken out of the queue
        with their contents). A tail `match_tail` found past them is copied into the table's next block
        (`tail_copy`)."""
        if request_id in self._tables:
            raise ValueError(f"{request_id!r} already holds blocks")
        self.pool.revive(blocks)
        self._tables[request_id] = list(blocks)

    def tail_copy(self, request_id: str, tail: int, index: int) -> tuple[int, int] | None:
        """The (tail, destination) block copy that gives the request the kept tail's KV at table `index` (the block
        after its kept full blocks, allocated by `allocate_slots`), made before its step writes past it; the tail
        stays findable (copy-on-write). None where the pool handed the request the tail itself there (the last
        free block): it holds the KV already, and its generation moved on (nothing finds it again). A tail handed
        to the request further on is still copied first: copies run before the step."""
        destination = self._tables[request_id][index]
        return None if destination == tail else (tail, destination)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

