"""Block tables of running requests over a `BlockPool`. Writer: the scheduler.

Invariant: a request's table holds exactly ceil(tokens_reserved / block_size) blocks, where
tokens_reserved is the largest total passed to `allocate_slots` (or `fork`) since its last `free`.

Sharing: `fork` gives a child the parent's full blocks (one more reference each) and, when the
shared length ends inside a block, a fresh block plus a (src, dst) copy order for that partial
block (copy-on-write), so the child's own tokens never land in a block others read. Nothing is
recomputed for a prefix that is not a block multiple.
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

    def free(self, request_id: str) -> None:
        """Release every block of the request (no-op if it holds none)."""
        table = self._tables.pop(request_id, None)
        if table:
            self.pool.free(table)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

