"""How a shard of prompts crosses the pipe to a data-parallel worker: one flat integer array, not a
pickled Python list per prompt. Torch-free.

A pickled list of 1.1M small Python ints is ~3.4 MB that the worker must rebuild int by int (~50 ms
on a CPU of our GPU hosts, once per rank, with the rank idle), then convert again to arrays to plan
its prefix sharing. `PackedItems` holds the shard's token ids concatenated in one int32 array (int64
when an id does not fit; ids are validated non-negative and below the vocabulary before this), the
prompt lengths and global indices as int64 arrays, and the SamplingParams list (pickle keeps one
copy of a params object shared by many prompts). `unpack` gives each prompt a zero-copy view of
the array: the engine takes numpy prompts (`Request.token_ids`, the planner), as it does from the CLI.

Invariant (tested): unpack(pack(items)) gives the same indices, token values and params, in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchllm.prefix.radix import as_token_array

_INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class PackedItems:
    """A shard of (global prompt index, token ids, SamplingParams) items, packed."""

    indices: np.ndarray
    """[n] int64: each item's index in the whole batch."""
    lengths: np.ndarray
    """[n] int64: each item's number of tokens."""
    tokens: np.ndarray
    """[sum(lengths)] int32 (int64 when an id exceeds int32): the items' ids, concatenated."""
    params: list

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def unpack(self) -> list[tuple[int, np.ndarray, Any]]:
        """The items as (index, token ids (a view of `tokens`, no copy), params)."""
        ends = np.cumsum(self.lengths).tolist()
        starts = [0, *ends[:-1]]
        tokens = self.tokens
        return [(i, tokens[a:b], sp) for i, a, b, sp in zip(self.indices.tolist(), starts, ends, self.params)]


def pack_items(indices: Sequence[int], token_arrays: Sequence[Any], params: Sequence[Any]) -> PackedItems:
    """Pack items; token_arrays[k]: item k's ids (a list or a 1-D integer array, non-negative)."""
    if not len(indices) == len(token_arrays) == len(params):
        raise ValueError(f"pack_items: {len(indices)} indices, {len(token_arrays)} prompts and "
                         f"{len(params)} params must be as many")
    arrays = [as_token_array(t) for t in token_arrays]
    lengths = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    if flat.size and flat.min() < 0:
        raise ValueError(f"pack_items: negative token id {int(flat.min())}")
    dtype = np.int32 if not flat.size or flat.max() <= _INT32_MAX else np.int64
    return PackedItems(np.asarray(indices, dtype=np.int64), lengths, flat.astype(dtype, copy=False), list(params))
