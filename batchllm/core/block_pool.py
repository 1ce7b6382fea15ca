"""A pool of fixed-size KV blocks with reference counts. Writer: `KVCacheManager` only.

Invariants: a block is in the free queue iff its reference count is 0; allocation takes blocks from
the front of the queue and freeing appends to the back, so block reuse order is FIFO and
deterministic (tests assert exact ids). A block's generation counts the times it was handed out
(`allocate`): a block freed and never handed out again still holds the KV last written to it, which
the prefix cache (`core/prefix_cache.py`) finds again by an unchanged generation and takes back out of
the queue (`revive`).
"""

from __future__ import annotations

from collections import OrderedDict


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        """The free queue, front first (an ordered dict: `revive` takes a block out of its middle in O(1))."""
        self._ref_counts = [0] * num_blocks
        self.generations = [0] * num_blocks
        """Per block, how many times `allocate` handed it out (read by the prefix cache)."""

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def free_queue(self) -> list[int]:
        """The free blocks, front (next handed out) first."""
        return list(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks (reference count 1 each, generation one more); all or nothing."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        popitem, ref_counts, generations = self._free.popitem, self._ref_counts, self.generations
        blocks = [popitem(last=False)[0] for _ in range(n)]
        for b in blocks:
            ref_counts[b] = 1
            generations[b] += 1
        return blocks

    def share(self, block_ids: list[int]) -> None:
        """Add one reference to each (already allocated) block."""
        for b in block_ids:
            if self._ref_counts[b] == 0:
                raise ValueError(f"block {b} is free and cannot be shared")
            self._ref_counts[b] += 1

    def revive(self, block_ids: list[int]) -> None:
        """Add one reference to each block, taking a free one out of the queue with its contents (its
        generation unchanged): how the prefix cache holds KV a finished sequence left."""
        for b in block_ids:
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1

    def move_to_back(self, block_ids: list[int]) -> None:
        """Queue the free blocks among these at the back, in this order (handed out after every other)."""
        free = self._free
        for b in block_ids:
            if b in free:
                free.move_to_end(b)

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching 0 go to the back of the free queue."""
        for b in block_ids:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} freed more often than allocated")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free[b] = None
