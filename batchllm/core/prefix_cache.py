"""KV blocks that finished sequences left in the pool, found again by their tokens: what vLLM's automatic prefix
caching keeps from one `generate` call to the next. Torch-free; owned by `KVCacheManager`.

A sequence that finishes leaves a record (`record`): its tokens, the full blocks of its table and each block's
generation at that moment (`BlockPool.generations`). Its blocks go back to the free queue as before and keep their
contents until the pool hands them out again, which counts the generation up: a recorded block is still what it
was iff its generation is unchanged. So reusing a block costs the cache nothing, and recording one is a few list
operations (every finished request pays it, whether or not a later call ever asks).

Each block is owned by the last record that holds it: a record whose every block a later record took over (the same
block, so the same tokens, or one handed out again since) adds nothing, and is dropped when the records are compacted,
which keeps them at most twice the pool's blocks in number, whatever the calls (one `run` job of a million lines
never asks: its records stay bounded).

Records become an index lazily, when `match` is asked: a trie of full blocks, each node keyed by its parent node
and its block's tokens (exact: the tokens are compared, not a hash of them), holding one block that has them.
`match` walks a prompt's full blocks down it while the node's block is unchanged.

A record also holds its partial last block, its tail (the tokens past its last full block), indexed under the
node of its full blocks and its first token (a few per node and token, the latest). `match_tail` finds, past the
full blocks `match` finds, a tail whose first tokens are the prompt's next ones: a second turn continues its first
turn's sequence, which ended inside a block. A sequence shorter than a block leaves no tail (as vLLM keeps only
full blocks): every prompt without a full block found would be compared with them. A tail is not written while it
can be found: each request that takes it writes into a copy of its own (`KVCacheManager.tail_copy`), so it stays
findable by the next (the beams of one parent, conversations branching from one turn), unless the pool hands that
request the tail block itself, which moves its generation on. A tail is a recorded sequence's own partial block
(partial blocks are copied on write, never shared), so while its generation is unchanged no request holds it.

Invariant: a block on a node's path, while its generation is the one recorded, holds the KV of exactly the tokens
on that path. Full blocks are never written again: a member writes past its fork point and a partial block is
copied on write (`KVCacheManager.fork`); a finished sequence's KV is recorded only up to tokens whose values are
known and whose step was scheduled (`KVCacheManager.free`), and steps run on the device in order, so any step that
reads a found block runs after the one that wrote it.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

import numpy as np

ROOT = 0


MAX_TAILS_PER_NODE = 16
"""Tails indexed under one node with one first token, the latest kept (the beams of a parent, a group's members and
their prefix: a beam search's step records every beam of a prompt under one): they are compared with the prompt at
once at each match (`_NodeTails`). Tails with another first token could not be taken (none of their tokens agree),
so the ring is per first token: the tails of one prompt's beams are not pushed out by those of another prompt
that shares its full blocks."""


class _NodeTails:
    """The latest MAX_TAILS_PER_NODE tails under one node with one first token, in a ring: row i of `tokens` holds
    tail i's tokens, padded with -1 (no token id) to block_size - 1 columns. Rows grow as tails come (most rings
    hold one)."""

    def __init__(self, block_size: int) -> None:
        self.tokens = np.full((1, block_size - 1), -1, dtype=np.int32)
        self.blocks: list[int] = []
        self.generations: list[int] = []
        self._next = 0  # the ring's oldest row once full

    def add(self, tokens: np.ndarray, block: int, generation: int) -> None:
        row = self._next
        if row == len(self.tokens):  # (full below MAX_TAILS_PER_NODE rows: twice the rows)
            grown = np.full((min(2 * row, MAX_TAILS_PER_NODE), self.tokens.shape[1]), -1, dtype=np.int32)
            grown[:row] = self.tokens
            self.tokens = grown
        self.tokens[row] = -1
        self.tokens[row, :len(tokens)] = tokens
        if row == len(self.blocks):
            self.blocks.append(block)
            self.generations.append(generation)
        else:
            self.blocks[row], self.generations[row] = block, generation
        self._next = (row + 1) % MAX_TAILS_PER_NODE

    def best(self, wanted: np.ndarray, generations: list[int]) -> tuple[int, int] | None:
        """(block, n): of the tails whose blocks are unchanged, one whose first n >= 1 tokens are `wanted`'s, n the
        most; None where none agrees on a first token."""
        rows = len(self.blocks)
        agree = self.tokens[:rows, :len(wanted)] == wanted
        n = np.where(agree.all(1), len(wanted), agree.argmin(1))  # each tail's tokens in a row that agree
        for row in np.argsort(-n, kind="stable"):
            if not n[row]:
                return None
            if generations[self.blocks[row]] == self.generations[row]:
                return self.blocks[row], int(n[row])
        return None


@dataclass(eq=False)
class _Record:
    tokens: object  # a copy of the recorded part of the sequence's prompt (list or int array), then of `outputs`
    outputs: list[int]
    num_tokens: int  # tokens of prompt + outputs whose KV the blocks hold (the full blocks' and the tail's)
    blocks: list[int]  # its full blocks, then its tail block where num_tokens is not a block multiple
    generations: list[int]
    owned: int  # of its blocks, those no later record holds
    new: bool = True  # not in the index yet


def token_bytes(tokens, num_tokens: int) -> bytes:
    """The first `num_tokens` token ids as int32 bytes (the index's key material)."""
    return np.asarray(tokens[:num_tokens], dtype=np.int32).tobytes()


class PrefixCache:
    def __init__(self, block_size: int, generations: list[int], num_blocks: int, keep_tails: bool = False) -> None:
        """generations: the pool's `BlockPool.generations` (read, never written here); keep_tails: record and
        offer tails (off: full blocks only)."""
        self.block_size = block_size
        self._generations = generations
        self._keep_tails = keep_tails
        self._max_records = 2 * num_blocks
        """Past this many records, those owning no block are dropped (at most `num_blocks` own one)."""
        self._records: deque[_Record] = deque()
        self._owner: dict[int, _Record] = {}
        self._num_new = 0
        """Records not in the index yet (the last ones)."""
        self._children: dict[tuple[int, bytes], int] = {}
        self._block_of: dict[int, tuple[int, int]] = {}
        """Node -> (block, its generation when indexed)."""
        self._tails: dict[tuple[int, int], _NodeTails] = {}
        """(node, first token) -> the tails (tokens, block, its generation when recorded) of records ending past the
        node inside a block, with that first token."""
        self._node_ids = itertools.count(ROOT + 1)

    def record(self, prompt, outputs: list[int], num_tokens: int, table: list[int]) -> None:
        """A finished sequence's KV: `num_tokens` tokens of prompt + outputs, held by `table`'s first blocks (the
        full ones, and the tail: only past a full block). The tokens are copied (only the recorded part): a caller
        may change the lists it was given back (a prompt's token list, extended for the next turn) before a later
        call indexes them, and a view into a larger array (a data-parallel shard's) would keep all of it."""
        full = num_tokens // self.block_size
        if full == 0:  # (no tail under the root: module docstring)
            return
        recorded = num_tokens if self._keep_tails else full * self.block_size
        blocks = table[:-(-recorded // self.block_size)]
        generations, owner = self._generations, self._owner
        head = prompt[:recorded]  # (a list slice copies; an array's is a view, copied)
        record = _Record(head.copy() if isinstance(head, np.ndarray) else head,
                         outputs[:recorded - len(head)], recorded, blocks, [generations[b] for b in blocks],
                         len(blocks))
        for b in blocks:
            previous = owner.get(b)
            if previous is not None:
                previous.owned -= 1
            owner[b] = record
        self._records.append(record)
        self._num_new += 1
        if len(self._records) > self._max_records:
            self._records = deque(r for r in self._records if r.owned)
            self._num_new = sum(r.new for r in self._records)

    def match(self, prompt, max_blocks: int, index_new: bool = True) -> list[int]:
        """The blocks holding the KV of the prompt's first full blocks, as many as are cached in a row and at
        most `max_blocks`. index_new: first put the records made since the last match in the index (False: look
        only at what it holds, as a request admitted after its blocks were found when it was added does)."""
        return self._walk(prompt, max_blocks, index_new)[0]

    def match_tail(self, prompt, max_tokens: int, index_new: bool = True) -> tuple[list[int], tuple[int, int] | None]:
        """`match`'s blocks within `max_tokens` tokens, then (block, n): a tail block, unchanged since recorded,
        under the last of them, whose first n >= 1 tokens are the prompt's next (the most of the node's tails, at
        most `max_tokens` in all); None where there is none."""
        blocks, node = self._walk(prompt, max_tokens // self.block_size, index_new)
        start = len(blocks) * self.block_size
        room = min(max_tokens - start, self.block_size - 1, len(prompt) - start)
        tails = self._tails.get((node, int(prompt[start]))) if blocks and room > 0 else None
        if tails is None:
            return blocks, None
        return blocks, tails.best(np.asarray(prompt[start:start + room], dtype=np.int32), self._generations)

    def _walk(self, prompt, max_blocks: int, index_new: bool) -> tuple[list[int], int]:
        """`match`'s blocks, and the trie node of the last (ROOT where none)."""
        if max_blocks <= 0 or not (self._records or self._children):
            return [], ROOT
        if index_new and self._num_new:
            self._index_new()
        size = self.block_size
        num_blocks = min(max_blocks, len(prompt) // size)
        children = self._children
        # (a miss reads one block: most prompts of a call that asks nothing of an earlier one)
        if not num_blocks or (ROOT, token_bytes(prompt, size)) not in children:
            return [], ROOT
        data, width = token_bytes(prompt, num_blocks * size), size * 4
        node, blocks, generations, block_of = ROOT, [], self._generations, self._block_of
        for i in range(num_blocks):
            child = children.get((node, data[i * width:(i + 1) * width]))
            if child is None:
                break
            block, generation = block_of[child]
            if generations[block] != generation:
                break
            blocks.append(block)
            node = child
        return blocks, node

    def clear(self) -> None:
        """Forget everything (vLLM's `reset_prefix_cache`)."""
        self._records.clear()
        self._owner.clear()
        self._num_new = 0
        self._children.clear()
        self._block_of.clear()
        self._tails.clear()

    def _index_new(self) -> None:
        """Put the new records in the trie (rebuilt from the kept records when stale nodes have piled up)."""
        if len(self._block_of) + len(self._tails) > 2 * self._max_records:
            self._children.clear()
            self._block_of.clear()
            self._tails.clear()
            self._num_new = len(self._records)
        for record in itertools.islice(self._records, len(self._records) - self._num_new, None):
            record.new = False
            self._index_record(record)
        self._num_new = 0

    def _index_record(self, record: _Record) -> None:
        """Its full blocks down the trie while unchanged, then its tail (if unchanged) under the last of them."""
        size, full = self.block_size * 4, record.num_tokens // self.block_size
        children, block_of, generations = self._children, self._block_of, self._generations
        data = None
        node = ROOT
        for i, (block, generation) in enumerate(zip(record.blocks, record.generations)):
            if generations[block] != generation:
                return
            if data is None:
                prompt_part = token_bytes(record.tokens, record.num_tokens)
                missing = record.num_tokens - len(prompt_part) // 4
                data = prompt_part + token_bytes(record.outputs, missing) if missing else prompt_part
            if i == full:  # its tail
                tail = np.frombuffer(data[i * size:], dtype=np.int32)
                tails = self._tails.get((node, int(tail[0])))
                if tails is None:
                    tails = self._tails[node, int(tail[0])] = _NodeTails(self.block_size)
                tails.add(tail, block, generation)
                return
            key = (node, data[i * size:(i + 1) * size])
            child = children.get(key)
            if child is None:
                child = children[key] = next(self._node_ids)
                block_of[child] = (block, generation)
            else:
                held, held_generation = block_of[child]
                if generations[held] != held_generation:  # the node's block was reused: this one holds it now
                    block_of[child] = (block, generation)
            node = child
