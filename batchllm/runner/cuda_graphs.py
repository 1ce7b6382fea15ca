"""CUDA graphs of the model's forward pass for decode-shaped steps (one query token per sequence).

A decode step of an 8B model launches ~13 kernels per layer, ~400 in all, each through Python; for
small batches the host takes longer to launch them than the GPU to run them. A CUDA graph replays
the whole forward pass in one launch.

One graph per batch size in `capture_sizes`; a step of n sequences runs the graph of the smallest
size >= n, its last rows padding (token 0 at position 0, K/V written to a slot no sequence owns,
attending to nothing). Every graph reads fixed buffers, rewritten before each replay:
* `ints`: token ids, positions and KV slots (and the placeholder fill's indices);
* `block_tables`: [max_batch, max_blocks_per_seq] int32; a step writes its [n, width] corner (rows
  and columns past it are never read: no work item reaches them);
* the attention's `StaticDecodePlan` (work items at fixed addresses, launch counts on the device).
Graphs are replayed on the stream the step's other work uses, so a buffer written for step N+1
(asynchronous scheduling) is written after step N's graph has read it.

Everything but the capture also runs where no CUDA is (`capture=False`: each "replay" runs the
forward eagerly over the same buffers), so the CPU tests check the buffer layout and padding with
the Triton interpreter.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import logging
import threading
import time

import numpy as np
import torch

from batchllm.attention.backend import AttentionMetadata
from batchllm.attention.static_decode_plan import StaticDecodePlan
from batchllm.layers.transfer import copy_into

logger = logging.getLogger(__name__)

_collector_hold = threading.Lock()
_collector_holders = 0
_collector_was_enabled = False


@contextlib.contextmanager
def collector_held():
    """Python's garbage collector off inside, for every thread, until the last of the threads inside leaves (two
    engines may capture in two threads at once: the first to finish must not restart it under the other's capture).
    It is restarted then only if it ran when the first came in: a caller who turned it off keeps it off."""
    global _collector_holders, _collector_was_enabled
    with _collector_hold:
        if _collector_holders == 0:
            _collector_was_enabled = gc.isenabled()
            gc.disable()
        _collector_holders += 1
    try:
        yield
    finally:
        with _collector_hold:
            _collector_holders -= 1
            if _collector_holders == 0 and _collector_was_enabled:
                gc.enable()


def capture_sizes(max_size: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 8 up to 128, and from each power of two p
    >= 128 on every p / 8 (every 16 up to 256, 32 up to 512, 64 up to 1,024, 128 up to 2,048, ...),
    and max_size (35 graphs up to 512, 8 more per doubling): a batch of n sequences is padded by
    fewer than max(8, n / 8) rows."""
    sizes, size = [], 1
    while size < max_size:
        sizes.append(size)
        size = size * 2 if size < 8 else size + max(8, (1 << (size.bit_length() - 1)) // 8)
    return sizes + [max_size]


class DecodeGraphs:
    """The graphs of one model, attention backend and KV cache; `prepare` then `replay` run a step."""

    def __init__(self, model, backend, kv_caches: list[torch.Tensor], *, block_size: int, max_batch: int,
                 max_blocks_per_seq: int, pad_slot: int, device: torch.device, capture: bool = True,
                 extra_items: int | None = None) -> None:
        """pad_slot: a KV slot no sequence owns, where padding rows store their K/V.
        capture=False: no CUDA graphs (each replay runs the forward eagerly over the same buffers).
        extra_items: see `StaticDecodePlan`."""
        spec = model.spec
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.max_batch, self.pad_slot = max_batch, pad_slot
        self.sizes = capture_sizes(max_batch)
        self.plan = StaticDecodePlan(backend, max_batch, spec.num_heads, spec.num_kv_heads, spec.head_dim, device,
                                     extra_items, block_size=block_size)
        self.ints = torch.zeros(5 * max_batch, dtype=torch.int64, device=device)
        self.input_ids, self.positions, self.slots, self.fill_at, self.fill_from = self.ints.view(5, max_batch)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._metadata = {size: self._static_metadata(size, block_size) for size in self.sizes}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._num_seqs = 0
        self.capture_seconds = 0.0
        self.capture_memory_bytes = 0
        """Device memory the capture kept (the graphs' shared pool of intermediate buffers)."""
        if capture:
            self._capture()

    def size_for(self, num_seqs: int, width: int) -> int | None:
        """The graph a decode step of `num_seqs` sequences with block tables `width` wide would run;
        None: too many sequences, or tables wider than the buffer."""
        if num_seqs > self.max_batch or width > self.block_tables.shape[1]:
            return None
        return self.sizes[bisect.bisect_left(self.sizes, num_seqs)]

    def prepare(self, size: int, step, previous_tokens: torch.Tensor | None) -> bool:
        """Write a decode step's inputs (`runner.StepInputs`, one query per sequence) into the
        buffers of the graph of `size`; False (nothing written) if its attention plan does not fit
        there. Placeholder ids are taken from `previous_tokens` on the device."""
        n = step.num_seqs
        if not self.plan.fill(step.query_start_loc.tolist(), step.seq_lens.tolist(), step.share_levels, size):
            return False
        m, k = self.max_batch, len(step.placeholder_at)
        host = np.zeros(5 * m, dtype=np.int64)
        host[:n] = step.input_ids
        host[m:m + n] = step.positions
        host[2 * m:3 * m] = self.pad_slot
        host[2 * m:2 * m + n] = step.slots
        host[3 * m:3 * m + k] = step.placeholder_at
        host[4 * m:4 * m + k] = step.placeholder_source
        copy_into(self.ints, host)
        copy_into(self.block_tables[:n, :step.block_tables.shape[1]], np.ascontiguousarray(step.block_tables))
        if k:
            self.input_ids[self.fill_at[:k]] = previous_tokens[self.fill_from[:k]]
        self._num_seqs = n
        return True

    def replay(self, size: int) -> torch.Tensor:
        """Run the graph of `size` on the prepared step: the hidden states of its sequences' tokens
        (a view of the graph's output buffer, valid until the next replay is queued)."""
        graph = self._graphs.get(size)
        if graph is None:
            return self._forward(size)[:self._num_seqs]
        graph[0].replay()
        return graph[1][:self._num_seqs]

    def _forward(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self._metadata[size],
                          self.backend)

    def _static_metadata(self, size: int, block_size: int) -> AttentionMetadata:
        """Metadata whose device tensors are the buffers; its plan is the static one (the host lists
        are unused: the plan is filled by `prepare`, not derived from them)."""
        device = self.ints.device
        metadata = AttentionMetadata(
            num_tokens=size, block_size=block_size, slot_mapping=self.slots[:size],
            query_start_loc=torch.arange(size + 1, dtype=torch.int32, device=device),
            seq_lens=torch.ones(size, dtype=torch.int32, device=device),
            block_tables=self.block_tables, max_query_len=1, max_seq_len=1,
            query_start_loc_cpu=list(range(size + 1)), seq_lens_cpu=[1] * size, block_tables_cpu=[],
        )
        self.plan.install(metadata, size)
        return metadata

    @torch.inference_mode()
    def _capture(self) -> None:
        """Capture every size, largest first, into one memory pool (graphs run one at a time, so
        they share their intermediate buffers). Before each capture the forward runs once for real
        over empty plans (nothing attended, K/V to the pad slot): kernels compile outside capture.
        Python's collector is run first and held off until the last capture ends: an engine dropped without
        `shutdown` waits in reference cycles, and a collection inside a capture that freed its CUDA objects there
        invalidated the capture (torch's `cuda.graph` no longer collects before capturing)."""
        started = time.perf_counter()
        device = self.ints.device
        gc.collect()
        torch.cuda.empty_cache()  # as torch.cuda.graph does: what stays reserved after is the graphs' pool
        memory_before = torch.cuda.memory_reserved(device)
        with collector_held():
            self._capture_sizes(device)
        torch.cuda.synchronize(device)
        self.capture_seconds = time.perf_counter() - started
        torch.cuda.empty_cache()  # the warm-up runs' blocks (outside the graphs' pool)
        self.capture_memory_bytes = torch.cuda.memory_reserved(device) - memory_before
        logger.info("captured %d decode CUDA graphs (batch sizes 1 to %d) in %.1f s, %.2f GiB",
                    len(self.sizes), self.max_batch, self.capture_seconds, self.capture_memory_bytes / 2**30)

    def _capture_sizes(self, device: torch.device) -> None:
        """`_capture`'s captures, largest size first, into one pool."""
        copy_into(self.ints[2 * self.max_batch:3 * self.max_batch], np.full(self.max_batch, self.pad_slot))
        self.plan.buffer.zero_()  # every launch count 0
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the NCCL watchdog thread of a tensor-parallel rank may query events meanwhile
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = self._forward(size)
            pool = graph.pool()
            self._graphs[size] = (graph, out)
