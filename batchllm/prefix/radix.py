"""A compressed token trie (radix tree) over all prompts of a batch, built without per-token objects.

Construction: sort the prompts lexicographically (as big-endian uint32 byte strings, whose byte
order is the token order), take the longest common prefix (LCP) of each adjacent pair with numpy,
and turn the LCP array into the tree of LCP intervals with one stack pass. Each internal node is a
contiguous range [lo, hi) of the sorted prompts whose common prefix has `depth` tokens; leaves are
prompts. Memory: the sort keys (one byte copy of the tokens) plus O(prompts) small arrays.

Invariants: node 0 is the root (depth 0, range [0, n)); a child's range lies inside its parent's
and its depth is strictly greater; every internal node other than the root holds >= 2 prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class RadixTree:
    order: np.ndarray  # [num_prompts] int64: sorted position -> prompt index
    prompt_lengths: np.ndarray  # [num_prompts] int64, by prompt index
    depth: list[int]  # per node: tokens shared by every prompt in the node
    lo: list[int]  # per node: first sorted position
    hi: list[int]  # per node: one past the last sorted position
    parent: list[int]  # per node; -1 for the root
    children: list[list[int]]  # per node, in sorted order

    @property
    def num_nodes(self) -> int:
        return len(self.depth)

    def num_prompts_under(self, node: int) -> int:
        return self.hi[node] - self.lo[node]

    def direct_prompts(self, node: int) -> list[int]:
        """Prompt indices under `node` but under none of its children."""
        covered = []
        for c in self.children[node]:
            covered.append((self.lo[c], self.hi[c]))
        result = []
        pos = self.lo[node]
        for lo, hi in covered:
            result.extend(self.order[pos:lo].tolist())
            pos = hi
        result.extend(self.order[pos : self.hi[node]].tolist())
        return result

    def num_distinct_tokens(self) -> int:
        """Tokens in the trie: the prefill cost if every shared segment were computed once."""
        total = 0
        for v in range(1, self.num_nodes):
            total += self.depth[v] - self.depth[self.parent[v]]
        for v in range(self.num_nodes):
            for p in self.direct_prompts(v):
                total += int(self.prompt_lengths[p]) - self.depth[v]
        return total


def as_token_array(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """A prompt's ids as a 1-D numpy integer array (an array is kept as it is, a list converted once:
    the planner and data parallel's `pack_items` then both use it without converting again)."""
    return ids if isinstance(ids, np.ndarray) else np.array(ids, dtype=np.int64)


def build_radix_tree(prompts: Sequence[Sequence[int] | np.ndarray]) -> RadixTree:
    arrays = [as_token_array(p) for p in prompts]
    n = len(arrays)
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=n)
    if n == 0:
        return RadixTree(np.zeros(0, np.int64), lengths, [0], [0], [0], [-1], [[]])
    keys = [a.astype(">u4", copy=False).tobytes() for a in arrays]
    order = np.array(sorted(range(n), key=keys.__getitem__), dtype=np.int64)
    del keys
    lcp = _adjacent_lcp([arrays[i] for i in order.tolist()])
    return _lcp_interval_tree(order, lengths, lcp.tolist())


def _adjacent_lcp(arrays: list[np.ndarray], budget: int = 1 << 21) -> np.ndarray:
    """lcp[i] = length of the longest common prefix of arrays[i-1] and arrays[i] (lcp[0] = 0),
    for all pairs at once: rounds compare a window of positions of every pair not yet settled,
    windows doubling (8, 16, ...; at most `budget` compared ids a round), so that the work is about
    twice the common prefixes' lengths and the Python work is per round, not per pair."""
    n = len(arrays)
    lcp = np.zeros(n, dtype=np.int64)
    if n < 2 or not any(len(a) for a in arrays):
        return lcp
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=n)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    flat = np.concatenate(arrays)
    pair = np.arange(1, n)  # pairs (pair - 1, pair) not settled yet
    limit = np.minimum(lengths[:-1], lengths[1:])  # by pair - 1: the longest the prefix can be
    offset, window = 0, 8
    while pair.size:
        window = max(1, min(window, budget // pair.size))
        cols = offset + np.arange(window)
        inside = cols < limit[pair - 1, None]  # [pairs, window]
        a = np.minimum(starts[pair - 1, None] + cols, flat.size - 1)
        b = np.minimum(starts[pair, None] + cols, flat.size - 1)
        differ = (flat[a] != flat[b]) | ~inside
        settled = differ.any(axis=1)
        lcp[pair[settled]] = offset + differ[settled].argmax(axis=1)
        pair = pair[~settled]
        offset, window = offset + window, window * 2
    return lcp


def _lcp_interval_tree(order: np.ndarray, lengths: np.ndarray, lcp: list[int]) -> RadixTree:
    n = len(order)
    depth, lo, hi, parent, children = [0], [0], [n], [-1], [[]]

    def new_node(d: int, start: int) -> int:
        depth.append(d)
        lo.append(start)
        hi.append(-1)
        parent.append(-1)
        children.append([])
        return len(depth) - 1

    stack = [0]
    for i in range(1, n):
        common = lcp[i]
        start = i - 1
        last = -1
        while common < depth[stack[-1]]:
            last = stack.pop()
            hi[last] = i
            start = lo[last]
            if common <= depth[stack[-1]]:
                _attach(parent, children, stack[-1], last)
                last = -1
        if common > depth[stack[-1]]:
            node = new_node(common, start)
            if last != -1:
                _attach(parent, children, node, last)
            stack.append(node)
    while len(stack) > 1:
        node = stack.pop()
        hi[node] = n
        _attach(parent, children, stack[-1], node)
    for c in children:
        c.sort(key=lo.__getitem__)
    return RadixTree(order, lengths, depth, lo, hi, parent, children)


def _attach(parent: list[int], children: list[list[int]], p: int, c: int) -> None:
    parent[c] = p
    children[p].append(c)
