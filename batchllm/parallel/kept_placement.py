"""Where a data-parallel job's earlier calls left KV: the parent's estimate, for placing the next call's prompts.

Each engine keeps the KV of the sequences it finished for later calls (`core/prefix_cache.py`), and finds it again
only for a prompt it runs itself. The parent places prompts (`partition.py`); placed blind, a conversation's second
turn lands on the rank that ran its first only by chance (one in `num_engines`), and the rest compute their whole
prompt again. So the parent remembers, per rank, the tokens of each sequence that rank finished: what the rank
recorded, its prompt and every output but the last (whose KV was never written), for completions that ended by a
stop or by their length (an engine keeps no other). At the next call `tokens_held` estimates, for each prompt, how
many of its leading full blocks each rank holds, and the partition places prompts where their tokens are.

An estimate, never a result: a rank matches by exact tokens itself. It can be wrong two ways, both costing only
speed. A rank may have handed the blocks out again since (its pool reuses the least recently freed first; here a
rank's records are bounded by the tokens its cache holds, the oldest going first). And blocks are matched by a
64-bit hash of their tokens and of the blocks before them, where a collision misplaces one prompt.

Cost: recording copies each finished sequence's tokens (bounded, per rank, by its cache's tokens); the hashing is
paid only when a later call asks, on the records then held and on each prompt's leading blocks until the first that
no rank holds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

KEPT_ENDINGS = ("stop", "length")
"""Completions whose KV an engine keeps (`Scheduler._finish`): an aborted one leaves none."""


class KeptPlacement:
    def __init__(self, kv_tokens: Sequence[int], block_size: int) -> None:
        """kv_tokens[r]: the tokens rank r's KV cache holds (the bound on what this remembers of it); block_size:
        the engines' KV block size (they find KV again in whole blocks)."""
        if block_size < 1 or any(t < 0 for t in kv_tokens):
            raise ValueError(f"block_size {block_size} and cache sizes {list(kv_tokens)} must be positive")
        self.block_size = block_size
        self.capacity = list(kv_tokens)
        self._records: list[deque[np.ndarray]] = [deque() for _ in kv_tokens]
        self._held = [0] * len(kv_tokens)
        """Per rank, the tokens of its records (each a multiple of the block size)."""

    @property
    def num_ranks(self) -> int:
        return len(self.capacity)

    def record(self, rank: int, prompt_ids, output) -> None:
        """Rank `rank` finished `output` (a RequestOutput) of the prompt `prompt_ids`: remember the full blocks of
        each of its kept completions. Copies: the caller may change the lists it is given back."""
        prompt = np.asarray(prompt_ids, dtype=np.int32)
        for completion in output.outputs:
            if completion.finish_reason not in KEPT_ENDINGS or not completion.token_ids:
                continue
            written = np.asarray(completion.token_ids[:-1], dtype=np.int32)
            full = (len(prompt) + len(written)) // self.block_size * self.block_size
            if full:
                self._add(rank, np.concatenate([prompt, written])[:full])

    def _add(self, rank: int, tokens: np.ndarray) -> None:
        records = self._records[rank]
        records.append(tokens)
        self._held[rank] += len(tokens)
        while self._held[rank] > self.capacity[rank]:
            self._held[rank] -= len(records.popleft())

    def clear(self) -> None:
        """Forget everything (the engines forgot their KV: `reset_prefix_cache`)."""
        for records in self._records:
            records.clear()
        self._held = [0] * self.num_ranks

    def __bool__(self) -> bool:
        return any(self._held)

    def tokens_held(self, prompts: Sequence) -> list[dict[int, int]]:
        """For each prompt (token ids), {rank: tokens} for every rank that holds its first full block: the tokens of
        its longest run of leading full blocks that rank holds, at most its length - 1 (an engine computes at least
        a prompt's last token). Empty dicts where nothing is remembered."""
        if not self:
            return [{} for _ in prompts]
        index = self._index()
        return [self._held_by_rank(np.asarray(p, dtype=np.int32), index) for p in prompts]

    def _index(self) -> dict[int, int]:
        """Chain key of each remembered block -> bitmask of the ranks holding it. A block's key hashes its tokens
        and its predecessor's key, so equal keys mean equal leading blocks (up to hash collisions)."""
        index: dict[int, int] = {}
        for rank, records in enumerate(self._records):
            bit = 1 << rank
            for tokens in records:
                for key in self._chain_keys(tokens, len(tokens) // self.block_size):
                    index[key] = index.get(key, 0) | bit
        return index

    def _chain_keys(self, tokens: np.ndarray, num_blocks: int):
        data, width, key = tokens.tobytes(), 4 * self.block_size, 0
        for b in range(num_blocks):
            key = hash((key, data[b * width:(b + 1) * width]))
            yield key

    def _held_by_rank(self, prompt: np.ndarray, index: dict[int, int]) -> dict[int, int]:
        held: dict[int, int] = {}
        alive = (1 << self.num_ranks) - 1
        num_blocks = max(0, len(prompt) - 1) // self.block_size
        for b, key in enumerate(self._chain_keys(prompt, num_blocks)):
            still = alive & index.get(key, 0)
            self._note_ended(held, alive & ~still, b)
            alive = still
            if not alive:
                return held
        self._note_ended(held, alive, num_blocks)
        return held

    def _note_ended(self, held: dict[int, int], ranks: int, num_blocks: int) -> None:
        """Ranks (a bitmask) whose run of held blocks ended after `num_blocks` blocks."""
        while ranks and num_blocks:
            rank = ranks.bit_length() - 1
            held[rank] = num_blocks * self.block_size
            ranks &= ~(1 << rank)
