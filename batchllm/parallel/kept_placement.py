"""Where a data-parallel job's earlier calls left KV: the parent's estimate, for placing the next call's prompts.

Each engine keeps the KV of the sequences it finished for later calls (`core/prefix_cache.py`), and finds it again
only for a prompt it runs itself. The parent places prompts (`partition.py`); placed blind, a conversation's second
turn lands on the rank that ran its first only by chance (one in `num_engines`), and the rest compute their whole
prompt again. So the parent remembers, per rank, the full blocks of each sequence that rank finished: what the rank
recorded, its prompt and every output but the last (whose KV was never written), for completions that ended by a
stop or by their length (an engine keeps no other). At the next call `tokens_held` estimates, for each prompt, how
many of its leading full blocks each rank holds, and the partition places prompts where their tokens are.

Per rank the memory is a set of blocks, each named by a chained hash (its tokens and the blocks before it), least
recently recorded first out, at most the blocks that rank's cache holds: a block many sequences share (a system
prompt) is one block, as in the engine. Recording copies a sequence's tokens; they are hashed in batches (when a
rank's unhashed tokens pass its cache's size, and when a later call asks), so a one-call job pays little.

An estimate, never a result: a rank matches by exact tokens itself. It can be wrong two ways, both costing only
speed: a rank may have handed the blocks out again since, in another order than this memory's; and a hash collision
(64 bits) may misplace one prompt. Tails (a sequence's partial last block, which an engine also keeps) are not
counted: two ranks holding the same full blocks are equal here.
"""

from __future__ import annotations

from collections import OrderedDict
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
        self.capacity = [t // block_size for t in kv_tokens]
        """Per rank, the blocks its cache holds."""
        self._blocks: list[OrderedDict[int, None]] = [OrderedDict() for _ in kv_tokens]
        """Per rank, the chain keys of the blocks it holds by this estimate, least recently recorded first."""
        self._unhashed: list[list[np.ndarray]] = [[] for _ in kv_tokens]
        self._unhashed_tokens = [0] * len(kv_tokens)

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
                self._unhashed[rank].append(np.concatenate([prompt, written])[:full])
                self._unhashed_tokens[rank] += full
                if self._unhashed_tokens[rank] > self.capacity[rank] * self.block_size:
                    self._hash(rank)

    def _hash(self, rank: int) -> None:
        """The rank's sequences recorded since, into its blocks (in the order finished), the oldest past its cache's
        size out."""
        blocks = self._blocks[rank]
        for tokens in self._unhashed[rank]:
            for key in self._chain_keys(tokens, len(tokens) // self.block_size):
                blocks[key] = None
                blocks.move_to_end(key)
        while len(blocks) > self.capacity[rank]:
            blocks.popitem(last=False)
        self._unhashed[rank] = []
        self._unhashed_tokens[rank] = 0

    def clear(self) -> None:
        """Forget everything (the engines forgot their KV: `reset_prefix_cache`)."""
        for rank in range(self.num_ranks):
            self._blocks[rank].clear()
            self._unhashed[rank] = []
            self._unhashed_tokens[rank] = 0

    def __bool__(self) -> bool:
        return any(self._blocks) or any(self._unhashed_tokens)

    def tokens_held(self, prompts: Sequence) -> list[dict[int, int]]:
        """For each prompt (token ids), {rank: tokens} for every rank that holds its first full block: the tokens of
        its longest run of leading full blocks that rank holds, at most its length - 1 (an engine computes at least
        a prompt's last token). Empty dicts where nothing is remembered."""
        if not self:
            return [{} for _ in prompts]
        for rank in range(self.num_ranks):
            if self._unhashed[rank]:
                self._hash(rank)
        return [self._held_by_rank(np.asarray(p, dtype=np.int32)) for p in prompts]

    def _chain_keys(self, tokens: np.ndarray, num_blocks: int):
        data, width, key = tokens.tobytes(), 4 * self.block_size, 0
        for b in range(num_blocks):
            key = hash((key, data[b * width:(b + 1) * width]))
            yield key

    def _held_by_rank(self, prompt: np.ndarray) -> dict[int, int]:
        """{rank: tokens of the prompt's longest run of leading full blocks (its last token left out) the rank
        holds}, ranks holding none left out."""
        held: dict[int, int] = {}
        alive = [r for r in range(self.num_ranks) if self._blocks[r]]
        for b, key in enumerate(self._chain_keys(prompt, max(0, len(prompt) - 1) // self.block_size)):
            alive = [r for r in alive if key in self._blocks[r]]
            if not alive:
                break
            for r in alive:
                held[r] = (b + 1) * self.block_size
        return held
