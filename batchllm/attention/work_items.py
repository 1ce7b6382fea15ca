"""The per-step work plan of the Triton attention: which query rows attend to which key range.

Pure Python and numpy (no torch, no Triton), so the plan is tested on CPU.

A *work item* is one GPU program's job (per KV head): a few query tokens, gathered from
anywhere in the step, attending to the key positions [kv_lo, kv_hi) of one block table row, causally
(a key is used by a query only if its position is <= the query's). Three kinds of item cover a step:

* **tile**: up to `block_q` consecutive query tokens of one sequence over its whole context; the
  plain paged attention of prefill chunks and decode tokens;
* **prefix**: the decode tokens of up to `group_block_q` members of one prefix group over the group's
  shared positions: the shared KV is read once per item instead of once per member (DESIGN.md
  item 6, "prefix-shared attention"). With nested groups each level gets its own items: an outer
  group's over [0, its length), a sub-group's over [the outer length, its length);
* **suffix**: one member's decode token over the positions no prefix item covered for it.

Any item whose key range is longer than `split_len` is cut into pieces (split-K), so that a few long
sequences (or a few groups' long prefixes beside many short suffixes) still fill the GPU evenly.
Prefix items come first in the arrays (`num_prefix_items` of them), so a backend may launch them
apart from the rest. A token whose keys are covered by one item gets its output written
directly; a token covered by several items gets one *partial* (output normalised by its own softmax
sum, plus the log-sum-exp) per item, merged afterwards with log-sum-exp weights in fp32.

With `align` (64-token cache blocks: the kernel then reads one block index per tile) every item's
keys start at a multiple of it: a group's prefix items stop at its shared length rounded down, the
members' suffix items start there, split-K pieces are multiples of it.

Invariant (tested): for every query token, the items that hold it cover each of its visible key
positions 0..pos exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MIN_GROUP_MEMBERS = 4
"""A prefix group is attended as a group only when at least this many members decode in the step..."""
MIN_SHARED_TOKENS = 256
"""... and share at least this many positions. Below these the partials and the merge cost more than
the saved reads (H200 sweep in docs/benchmarks.md: groups of 2 break even only at ~1,024 shared
positions; groups of 4 and 16 gain from 256 on)."""
TARGET_PROGRAMS = 512
"""Split-K spreads the step's keys over about this many programs (items x KV heads), ~4 per SM of an
H100/H200: 64 decodes of 4,000 keys stay whole (splitting them was 9% slower), 16 of 16,000 split 4 ways."""
MIN_SPLIT_LEN = 512
"""Key ranges are never cut shorter than this."""


@dataclass
class WorkItems:
    """Flat int32 arrays, one entry per item (`seq` .. `part`) or per gathered query (`q_tokens`, `q_pos`)."""

    seq: np.ndarray
    """Row of the step's block table the item reads keys through."""
    q_off: np.ndarray
    """The item's queries are q_tokens[q_off : q_off + q_len]."""
    q_len: np.ndarray
    kv_lo: np.ndarray
    kv_hi: np.ndarray
    part: np.ndarray
    """-1: write the output directly; else query j's partial goes to partial row part + j."""
    q_tokens: np.ndarray
    """Index of each gathered query in the step's token array."""
    q_pos: np.ndarray
    """Position of each gathered query in its sequence."""
    num_partials: int
    merge_tokens: np.ndarray
    """Tokens whose output is a merge of partials; their partial rows are
    merge_parts[merge_ptr[i] : merge_ptr[i + 1]]."""
    merge_ptr: np.ndarray
    merge_parts: np.ndarray
    num_group_items: int
    """Prefix items before splitting: how many times groups' shared keys are read."""
    num_prefix_items: int
    """Prefix items after splitting: items[:num_prefix_items] are the prefix items."""

    @property
    def num_items(self) -> int:
        return len(self.seq)


def _index_in_run(counts: np.ndarray) -> np.ndarray:
    """For runs of the given lengths laid end to end: each element's index within its run."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def split_length(total_keys: int, num_kv_heads: int = 8, target_programs: int = TARGET_PROGRAMS,
                 min_len: int = MIN_SPLIT_LEN) -> int:
    """Longest key range an item may take: the step's keys (summed over items) spread evenly over
    about `target_programs` programs of `num_kv_heads` each."""
    return max(min_len, -(-total_keys * num_kv_heads // target_programs))


def plan_work_items(query_start_loc: list[int], seq_lens: list[int], block_q: int,
                    share_levels: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
                    split_len: int | None = None, num_kv_heads: int = 8, group_block_q: int | None = None,
                    min_members: int = MIN_GROUP_MEMBERS, min_shared: int = MIN_SHARED_TOKENS,
                    align: int = 1, split_per_launch: bool = False) -> WorkItems:
    """Plan one step. Sequence i has query tokens query_start_loc[i] .. query_start_loc[i+1]-1 at the
    last positions of its seq_lens[i] tokens.

    share_levels lists the prefix groups, outermost level first: at each level, (group, shared)
    gives per sequence the group it belongs to (-1: none at that level) and the positions it shares
    with that group's other members (their first `shared` positions hold the same KV). Nested groups
    are inner levels: a sub-group's members share more positions than the outer group's. At each
    level, a group with at least `min_members` decoding members that share at least `min_shared`
    positions beyond what outer levels already covered gets prefix items for those positions.

    Tiles take up to `block_q` tokens, prefix items up to `group_block_q` members (default:
    block_q). `split_len` overrides the split-K length (else it follows from the step's keys and
    `num_kv_heads`); split_per_launch: the prefix items' split length follows from their own keys and
    the other items' from theirs (a backend that launches prefix items apart runs each launch alone:
    each then spreads its keys over the GPU). `align`: every item's key range starts at a multiple of
    it (a group's shared reach is rounded down to one, each member's suffix item reading the few shared
    keys past it; split-K pieces are multiples of it), so a kernel that reads one cache block per tile
    of `align` keys (triton_backend's TILE_IN_BLOCK) can take every item that way; 1: no constraint.
    The coverage invariant holds for any align."""
    loc = np.asarray(query_start_loc, dtype=np.int64)
    lens = np.asarray(seq_lens, dtype=np.int64)
    q_count = np.diff(loc)
    token_pos = np.repeat(lens - q_count - loc[:-1], q_count) + np.arange(int(loc[-1]))
    prefix, members, covered = _prefix_items(lens, q_count, share_levels or (), group_block_q or block_q,
                                             min_members, min_shared, align)
    member = np.zeros(len(lens), dtype=bool)
    member[members] = True
    tiles = _tile_and_suffix_items(loc, token_pos, block_q, member, covered, len(members))
    seq, q_off, q_len, lo, hi = np.concatenate([prefix, tiles], axis=1)
    # prefix and suffix items always write partials (their token has keys in several items)
    always_partial = np.r_[np.ones(prefix.shape[1], dtype=bool), member[tiles[0]]]
    if split_len is None and split_per_launch:
        keys, n = hi - lo, prefix.shape[1]
        split_len = np.r_[np.full(n, split_length(int(keys[:n].sum()), num_kv_heads)),
                          np.full(len(keys) - n, split_length(int(keys[n:].sum()), num_kv_heads))]
    elif split_len is None:
        split_len = split_length(int((hi - lo).sum()), num_kv_heads)
    w, item_lo, item_hi, partial = _split_k(lo, hi, always_partial, split_len, align)
    item_len = q_len[w]
    partial_rows = np.where(partial, item_len, 0)
    part = np.where(partial, np.cumsum(partial_rows) - partial_rows, -1)
    q_tokens = np.r_[loc[:-1][members], np.arange(int(loc[-1]))]
    merge_tokens, merge_ptr, merge_parts = _merge_lists(q_tokens, q_off[w], item_len, part)

    def i32(values) -> np.ndarray:
        return np.ascontiguousarray(values, dtype=np.int32)

    return WorkItems(
        seq=i32(seq[w]), q_off=i32(q_off[w]), q_len=i32(item_len), kv_lo=i32(item_lo), kv_hi=i32(item_hi),
        part=i32(part), q_tokens=i32(q_tokens), q_pos=i32(token_pos[q_tokens]),
        num_partials=int(partial_rows.sum()), merge_tokens=i32(merge_tokens), merge_ptr=i32(merge_ptr),
        merge_parts=i32(merge_parts), num_group_items=prefix.shape[1],
        num_prefix_items=int(np.count_nonzero(w < prefix.shape[1])),
    )


def _prefix_items(lens: np.ndarray, q_count: np.ndarray, share_levels, group_block_q: int, min_members: int,
                  min_shared: int, align: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phase 1, level by level: members attended as groups (one decode token past the shared part,
    in groups big enough). Returns the prefix items as rows (seq, q_off, q_len, lo, hi), the members
    in the order their tokens are gathered (item q_off indexes this order), and per sequence how far
    prefix items reach (`covered`: where its suffix item starts; a multiple of `align`)."""
    covered = np.zeros(len(lens), dtype=np.int64)
    items, gathered = [np.zeros((5, 0), dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    num_gathered = 0
    for level_group, level_shared in share_levels:
        group = np.asarray(level_group, dtype=np.int64)
        shared = np.asarray(level_shared, dtype=np.int64) // align * align  # what a group's items reach
        candidate = (group >= 0) & (q_count == 1) & (shared - covered >= min_shared) & (shared < lens)
        # a group is keyed by its id and by what outer levels covered (the same for all its members)
        key = np.where(candidate, group * (int(lens.max()) + 1) + covered, -1)
        ids, counts = np.unique(key[candidate], return_counts=True)
        chosen = np.flatnonzero(candidate & np.isin(key, ids[counts >= min_members]))
        if not len(chosen):
            continue
        chosen = chosen[np.argsort(key[chosen], kind="stable")]  # grouped, in step order within a group
        starts = np.flatnonzero(np.r_[True, key[chosen][1:] != key[chosen][:-1]])
        sizes = np.diff(np.r_[starts, len(chosen)])
        chunks = -(-sizes // group_block_q)  # prefix items per group
        chunk_group = np.repeat(np.arange(len(sizes)), chunks)
        chunk_index = _index_in_run(chunks)
        offsets = starts[chunk_group] + chunk_index * group_block_q
        first = chosen[offsets]
        chunk_len = np.minimum(group_block_q, sizes[chunk_group] - chunk_index * group_block_q)
        items.append(np.stack([first, num_gathered + offsets, chunk_len, covered[first], shared[first]]))
        gathered.append(chosen)
        num_gathered += len(chosen)
        covered[chosen] = shared[chosen]
    return np.concatenate(items, axis=1), np.concatenate(gathered), covered


def _tile_and_suffix_items(loc: np.ndarray, token_pos: np.ndarray, block_q: int, member: np.ndarray,
                           covered: np.ndarray, num_gathered: int) -> np.ndarray:
    """Phase 2, the items of the step's own tokens, as rows (seq, q_off, q_len, lo, hi): a suffix
    item per group member (its decode token over [covered, position]) and tiles of up to `block_q`
    tokens for every other sequence. They read the step's tokens at q_tokens[num_gathered + token]
    (prefix items gathered their members' tokens before them)."""
    q_count = np.diff(loc)
    tiles = np.where(member, 1, -(-q_count // block_q))  # items per sequence
    seq = np.repeat(np.arange(len(q_count)), tiles)
    index = _index_in_run(tiles)
    first = loc[:-1][seq] + index * block_q  # first token of the item
    q_len = np.where(member[seq], 1, np.minimum(block_q, q_count[seq] - index * block_q))
    lo = np.where(member[seq], covered[seq], 0)
    return np.stack([seq, num_gathered + first, q_len, lo, token_pos[first + q_len - 1] + 1])


def _split_k(lo: np.ndarray, hi: np.ndarray, always_partial: np.ndarray, split_len: int | np.ndarray,
             align: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Phase 3, split-K: every key range longer than split_len (one, or one per item) cut into equal
    pieces (lengths rounded up to a multiple of `align`, so pieces of a range starting at a multiple
    start at multiples). Returns per piece its item (`w`, pieces of one item adjacent), its key range,
    and whether it writes partials (a piece of a split item, or of an item that always does)."""
    pieces = np.maximum(1, -(-(hi - lo) // split_len))
    step = -(-(hi - lo) // pieces)
    if align > 1:  # longer pieces may need fewer of them (never more, never an empty one)
        step = np.maximum(-(-step // align) * align, 1)
        pieces = np.maximum(1, -(-(hi - lo) // step))
    w = np.repeat(np.arange(len(lo)), pieces)
    piece_lo = lo[w] + _index_in_run(pieces) * step[w]
    return w, piece_lo, np.minimum(piece_lo + step[w], hi[w]), (always_partial | (pieces > 1))[w]


def _merge_lists(q_tokens: np.ndarray, q_off: np.ndarray, q_len: np.ndarray,
                 part: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Phase 4, the merge lists: every partial row, grouped by the token it belongs to (tokens
    ascending, an item's rows in item order). Returns (merge_tokens, merge_ptr, merge_parts)."""
    pw = np.flatnonzero(part >= 0)
    rows_per = q_len[pw]
    row_item = np.repeat(pw, rows_per)
    j = _index_in_run(rows_per)
    row_token = q_tokens[q_off[row_item] + j]
    order = np.argsort(row_token, kind="stable")
    merge_tokens, counts = np.unique(row_token[order], return_counts=True)
    return merge_tokens, np.r_[0, np.cumsum(counts)], (part[row_item] + j)[order]
