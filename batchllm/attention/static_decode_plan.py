"""The Triton attention's plan of decode-shaped steps at fixed device addresses, for CUDA graphs.

One writer of the buffer: `fill`, called by `runner.cuda_graphs.DecodeGraphs.prepare` before each
replay (the capture zeroes it once first); the captured launches only read it.
"""

from __future__ import annotations

import numpy as np
import torch

from batchllm.attention.backend import AttentionMetadata
from batchllm.attention.triton_backend import (
    COUNT_SLOT,
    ITEM_FIELDS,
    Launch,
    LaunchPlan,
    TritonBackend,
    launch_counts,
    next_power_of_2,
    plan_key,
    queries_per_program,
)
from batchllm.attention.work_items import TARGET_PROGRAMS, WorkItems
from batchllm.layers.transfer import aligned_offsets, copy_into


class StaticDecodePlan:
    """The work plan of decode-shaped steps (one query token per sequence, up to `max_batch`
    sequences) at fixed device addresses, so that one CUDA graph per batch size, captured once,
    serves every such step: the graph holds the launches, `fill` rewrites what they read.

    Layout (int32, each array 16-byte aligned): the item arrays have a prefix-item section at
    [0, prefix_capacity(max_batch)) and a one-query-item section after it; each launch's grid is the
    capacity of its section at the captured batch size, and programs past the item count written by
    `fill` return at once (the counts sit in `tensors["counts"]`, one 16-byte slot each: prefix
    launch, one-query launch, merge). The partial buffers are sized for the largest batch. Each
    padding row of a step smaller than the graph gets a one-query item over no keys, so its
    attention output is 0, not whatever the buffer held (padding rows stay finite).

    Invariant: after `fill(...)` returned True for a batch of n <= size sequences, the launches
    `install(metadata, size)` put in `metadata` compute exactly what `TritonBackend.forward` would
    for that step."""

    def __init__(self, backend: TritonBackend, max_batch: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, extra_items: int | None = None, *, block_size: int) -> None:
        """extra_items: room beyond one item per sequence (per section) for split-K pieces; default:
        the number of programs per KV head that split-K aims for (all pieces of a step fit in it).
        block_size: the cache's, for the plan's key alignment (`TritonBackend.work_items`, as the eager
        plan's; required, so a graph never replays a plan aligned differently from the eager step's)."""
        self.backend = backend
        self.block_size = block_size
        self.max_batch = max_batch
        self.num_kv_heads = num_kv_heads
        self.group_pad = next_power_of_2(num_heads // num_kv_heads)
        self.wide = queries_per_program(64, self.group_pad)  # as the eager plan's prefix items
        self.extra = extra_items if extra_items is not None else max(1, TARGET_PROGRAMS // num_kv_heads)
        self.prefix_section = self.prefix_capacity(max_batch)
        items = self.prefix_section + self.single_capacity(max_batch)
        self.capacity = {
            **{name: items for name in ITEM_FIELDS},
            "q_tokens": 3 * max_batch, "q_pos": 3 * max_batch,  # members gathered at up to two levels, then every token
            "merge_tokens": max_batch, "merge_ptr": max_batch + 1,
            # partial rows: each launch's split-K may add `extra` pieces (split_per_launch: both do)
            "merge_parts": 3 * max_batch + self.extra * (self.wide + 1),
            "counts": 3 * COUNT_SLOT,
        }
        starts = aligned_offsets(list(self.capacity.values()), np.int32)
        self.offsets = dict(zip(self.capacity, starts))
        self.buffer = torch.zeros(starts[-1], dtype=torch.int32, device=device)
        self.tensors = {name: self.buffer[self.offsets[name]:self.offsets[name] + size]
                        for name, size in self.capacity.items()}
        num_partials = self.capacity["merge_parts"]
        self.part_out = torch.empty(num_partials, num_heads, head_dim, dtype=torch.float32, device=device)
        self.part_lse = torch.empty(num_partials, num_heads, dtype=torch.float32, device=device)
        self.last_items: WorkItems | None = None
        """The items of the step filled last (for tests and diagnostics)."""

    def prefix_capacity(self, batch: int) -> int:
        """Room for prefix items at this batch size: with the default `MIN_GROUP_MEMBERS` (4) a level
        has at most batch / 4 items before split-K, so two levels fit; steps with more run eagerly."""
        return batch // 2 + self.extra

    def single_capacity(self, batch: int) -> int:
        return batch + self.extra

    def install(self, metadata: AttentionMetadata, size: int) -> None:
        """Make `metadata`'s steps launch this plan as the graph of `size` sequences does (fixed grids,
        counts on the device)."""
        prefix_count, single_count, merge_count = launch_counts(self.tensors["counts"])
        metadata.backend_cache[plan_key(self.group_pad)] = LaunchPlan(
            items=None, tensors=self.tensors, part_out=self.part_out, part_lse=self.part_lse,
            launches=[Launch(0, self.prefix_capacity(size), self.wide, self.backend.decode_tile, prefix_count),
                      Launch(self.prefix_section, self.single_capacity(size), 1, self.backend.decode_tile,
                             single_count)],
            merge_grid=size, merge_count=merge_count,
        )

    def fill(self, query_start_loc: list[int], seq_lens: list[int], share_levels, size: int) -> bool:
        """Plan a decode step (every query_start_loc gap is 1) and copy the plan into the buffer, for
        the graph of `size` sequences; False (nothing written) if it does not fit there."""
        items = self.backend.work_items(query_start_loc, seq_lens, share_levels, 1, self.wide, self.num_kv_heads,
                                        self.block_size)
        p = items.num_prefix_items
        num_pad = size - (len(query_start_loc) - 1)  # padding rows: one item each, over no keys (writes 0)
        num_single = items.num_items - p + num_pad
        num_q = len(items.q_tokens) + num_pad
        fits = (p <= self.prefix_capacity(size) and num_single <= self.single_capacity(size)
                and num_q <= self.capacity["q_tokens"] and len(items.merge_tokens) <= size
                and items.num_partials <= self.capacity["merge_parts"])
        if not fits:
            return False
        host = np.zeros(len(self.buffer), dtype=np.int32)

        def put(name: str, values, start: int = 0) -> None:
            host[self.offsets[name] + start:self.offsets[name] + start + len(values)] = values

        pad = np.arange(num_pad)
        padding = {"seq": 0, "q_off": len(items.q_tokens) + pad, "q_len": 1, "kv_lo": 0, "kv_hi": 0, "part": -1}
        indices = np.arange(items.num_items)  # each section in the eager plan's launch order
        order = np.r_[self.backend.launch_order(items, indices[:p]), self.backend.launch_order(items, indices[p:])]
        for name in ITEM_FIELDS:
            values = getattr(items, name)[order]
            put(name, values[:p])
            put(name, np.r_[values[p:], np.broadcast_to(padding[name], num_pad)], self.prefix_section)
        put("q_tokens", np.r_[items.q_tokens, size - num_pad + pad])
        for name in ("q_pos", "merge_tokens", "merge_ptr", "merge_parts"):  # padding rows' q_pos: 0
            put(name, getattr(items, name))
        host[self.offsets["counts"] + np.arange(3) * COUNT_SLOT] = p, num_single, len(items.merge_tokens)
        copy_into(self.buffer, host)
        self.last_items = items
        return True
