"""Block tables of running requests over a `BlockPool`. Writer: the scheduler.

Invariant: a request's table holds exactly ceil(tokens_reserved / block_size) blocks, where
tokens_reserved is the largest total passed to `allocate_slots` since its last `free`.
"""

from __future__ import annotations

from batchllm.core.block_pool import BlockPool


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def allocate_slots(self, request_id: str, total_tokens: int) -> bool:
        """Grow the request's table to cover `total_tokens` tokens. False (and no change) if the
        pool has too few free blocks."""
        table = self._tables.setdefault(request_id, [])
        missing = self.blocks_for(total_tokens) - len(table)
        if missing <= 0:
            return True
        if missing > self.pool.num_free_blocks:
            if not table:
                del self._tables[request_id]
            return False
        table.extend(self.pool.allocate(missing))
        return True

    def free(self, request_id: str) -> None:
        """Release every block of the request (no-op if it holds none)."""
        table = self._tables.pop(request_id, None)
        if table:
            self.pool.free(table)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.num_used_blocks / self.pool.num_blocks
