"""ModelRunner: turns a `ScheduledBatch` into one forward pass and a `RunnerOutput`.

Writer of the KV cache tensors, the per-request block tables, output histories
and grammar matchers (requests with penalties or structured output), the last
submitted step's sampled tokens and the decode CUDA graphs' input buffers, and nothing else; it
never reads or writes scheduler state (house rule 1). Decode-shaped steps (one query token per
sequence) replay a CUDA graph where `setup_decode_graphs` made them (`cuda_graphs.py`).

Block tables persist between steps: each request owns a row of `_BlockTables.rows` (a numpy array),
written only where the scheduler sends new entries (a whole table after admission or preemption, a
block every block_size decode steps), so a step gathers its rows instead of rebuilding every
table. Per-request state is dropped when the scheduler lists the request as finished.

Under tensor parallelism every rank runs a runner over its shard of the model and KV cache. Rank 0
(the driver) sends each batch to the others through the `StepChannel` before running it, samples,
and broadcasts the sampled tokens on the device; a follower (`follow`) runs the same batches, takes
part in the model's collectives, and takes the broadcast tokens as its own for the placeholders of
the next step. Only rank 0's outputs are read.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
from dataclasses import dataclass

import numpy as np
import torch

from batchllm.attention.backend import AttentionBackend, AttentionMetadata
from batchllm.attention.kv_quant import KEYS_MAJOR_BLOCK, KV_CACHE_DTYPES
from batchllm.attention.triton_backend import tma_by_default
from batchllm.config import ACTIVATION_RESERVE, CacheConfig, leaves_activation_reserve
from batchllm.layers.fp8 import FP8
from batchllm.layers.logits_processors import OutputHistory
from batchllm.layers.prompt_logprobs import PromptLogprobTensors, compute_prompt_logprobs
from batchllm.layers.sampler import SampledTokens, joined, row_slices, sample_on_device
from batchllm.layers.transfer import to_device, to_device_packed
from batchllm.models.decoder import DecoderForCausalLM
from batchllm.models.spec import ModelSpec
from batchllm.outputs import (
    PLACEHOLDER_TOKEN_ID,
    DecodeRows,
    RunnerOutput,
    SamplingSpec,
    ScheduledBatch,
    ScheduledRequest,
)
from batchllm.runner.activation_profile import BLOCK_COPY_BYTES, ActivationReserve
from batchllm.runner.cuda_graphs import DecodeGraphs
from batchllm.runner.step_markers import mark_step
from batchllm.structured import GrammarBackend, GrammarState

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_GIB = 2.0


@dataclass(frozen=True)
class KVCacheSpec:
    """What was found at start-up: the size of the paged KV cache and its element type."""

    num_blocks: int
    block_size: int
    bytes_per_block: int  # of this rank's cache (its KV heads), all layers, K and V
    dtype: torch.dtype  # the model's dtype, or float8_e4m3fn (kv_cache_dtype="fp8": 1 byte per element)
    activation_reserve: ActivationReserve | None = None
    """What a cache sized from the GPU's memory left for the steps, where it was measured."""

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_bytes(self) -> int:
        """The pool's bytes (the runner allocates one block more: the CUDA graphs' padding block)."""
        return self.num_blocks * self.bytes_per_block


def default_block_size(kv_dtype: torch.dtype, device: torch.device, head_dim: int) -> int:
    """The block size when the option leaves it open: blocks that hold whole 64-key attention tiles
    (KEYS_MAJOR_BLOCK) for an fp8 cache (its V is then keys-major: `kv_quant.values_keys_major`) and
    for a 16-bit cache whose tiles load by TMA (a Hopper GPU, a head dim the dot takes unpadded: on
    an H200 1.15-1.37x faster prefill attention, 1.02-1.07x the engine: docs/benchmarks.md, session
    14); 16 tokens otherwise (64 measured no faster without TMA, and smaller blocks share prefixes at
    a finer grain)."""
    return KEYS_MAJOR_BLOCK if kv_dtype == FP8 or tma_by_default(kv_dtype, device, head_dim) else 16


CUDA_CONTEXT_BYTES = 2**30
"""What a process holds on its GPU outside torch's allocator (the CUDA context, loaded kernels), as
`gpu_memory_accounting="engine"` counts it: about 1.1 GiB measured on an H200 (SmolLM2-135M, with
its weights' rounding; session 20)."""


def engine_share(utilization: float, engines: int) -> float:
    """The gpu_memory_utilization of each of `engines` engine processes that share one GPU: an
    equal part of `utilization`, which must be more than ACTIVATION_RESERVE."""
    share = utilization / engines
    if not leaves_activation_reserve(utilization, engines):
        raise ValueError(f"engines_per_gpu {engines} gives each engine {share:.3f} of the GPU "
                         f"(gpu_memory_utilization {utilization} / {engines}), no more than "
                         f"{ACTIVATION_RESERVE}, the least part an engine sharing a GPU may take: use fewer engines "
                         "per GPU")
    return share


def kv_cache_budget(utilization: float, free: int, total: int, accounting: str, own: int, reserve: int) -> int:
    """Bytes for an automatically sized KV cache on a card of `total` bytes with `free` free: the
    engine's part of the card (utilization x total) less the activation `reserve` (what the largest
    step allocates: `activation_profile.measure_activation_reserve`) and less what `accounting` counts
    as used there.

    card: every byte in use on the card (total - free: this process's weights and context, and any
    other process's), the safe choice on a card shared with anything else.
    engine: only this engine's own (`own`: torch's reserved memory + CUDA_CONTEXT_BYTES), never more
    than is free beyond the reserve: engines sharing a GPU (`engines_per_gpu`) then size their caches
    at the same time, each from its own part, whatever the others have allocated so far."""
    limit = utilization * total - reserve
    if accounting == "card":
        return int(max(0.0, limit - (total - free)))
    free_room = free - reserve
    if free_room < limit - own:
        logger.warning("the KV cache is held to the GPU's free memory (%.1f GiB free beyond the activation reserve, "
                       "%.1f GiB its part would take): other processes are using this GPU",
                       free_room / 2**30, (limit - own) / 2**30)
    return int(max(0.0, min(limit - own, free_room)))


def kv_element_type(cache: CacheConfig, dtype: torch.dtype) -> torch.dtype:
    """The cache's element type: kv_cache_dtype's, else the model's `dtype`."""
    return KV_CACHE_DTYPES[cache.kv_cache_dtype] or dtype


def kv_block_size(spec: ModelSpec, cache: CacheConfig, dtype: torch.dtype, device: torch.device) -> int:
    """The cache's block size: the option's, else `default_block_size` for its element type (dtype: the model's)."""
    return cache.block_size or default_block_size(kv_element_type(cache, dtype), device, spec.head_dim)


def plan_kv_cache(spec: ModelSpec, cache: CacheConfig, dtype: torch.dtype, device: torch.device,
                  tp=None, reserve: ActivationReserve | None = None) -> KVCacheSpec:
    """spec: the model's (a tensor-parallel rank's shard spec: its KV heads); dtype: the model's,
    which the cache keeps unless kv_cache_dtype says otherwise (fp8: half the bytes of a 16-bit
    cache per token, so a memory budget holds twice the blocks). With tp, every rank takes the
    smallest block count any rank can hold, so their block pools are the same. reserve: the bytes a
    cache sized from a GPU's memory leaves for the steps (measured: `activation_profile`); None:
    ACTIVATION_RESERVE of the card (the torch attention's, whose workspace is not measured)."""
    kv_dtype = kv_element_type(cache, dtype)
    block_size = kv_block_size(spec, cache, dtype, device)
    bytes_per_block = spec.kv_bytes_per_token * block_size * torch.empty(0, dtype=kv_dtype).element_size()
    if cache.num_kv_blocks is not None:
        num_blocks = cache.num_kv_blocks
    elif cache.kv_cache_memory_gib is not None:
        num_blocks = int(cache.kv_cache_memory_gib * 2**30) // bytes_per_block
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        own = torch.cuda.memory_reserved(device) + CUDA_CONTEXT_BYTES
        reserve_bytes = int(ACTIVATION_RESERVE * total) if reserve is None else reserve.total
        budget = kv_cache_budget(cache.gpu_memory_utilization, free, total, cache.gpu_memory_accounting, own,
                                 reserve_bytes)
        num_blocks = budget // bytes_per_block
    else:
        num_blocks = int(_DEFAULT_CPU_KV_GIB * 2**30) // bytes_per_block
    if tp is not None:
        import datetime

        from batchllm.parallel.tensor_parallel import collective_timeout_s

        agreed = torch.tensor([num_blocks], dtype=torch.int64)
        work = torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN, group=tp.host_group,
                                            async_op=True)  # (the host group waits a week: a build does not)
        work.wait(timeout=datetime.timedelta(seconds=collective_timeout_s()))
        num_blocks = int(agreed.item())
    if num_blocks < 1:
        steps = "" if reserve is None else (f" beside the steps' activation reserve of {reserve.describe()}, which "
                                            "lower max_num_batched_tokens, max_num_seqs or max_logprobs make smaller")
        raise ValueError(f"no memory left for the KV cache{steps}: raise gpu_memory_utilization or "
                         "kv_cache_memory_gib, or free the GPU of other processes")
    return KVCacheSpec(num_blocks=num_blocks, block_size=block_size, bytes_per_block=bytes_per_block,
                       dtype=kv_dtype, activation_reserve=reserve)


CUT_SHORT = ("this LLM's tensor-parallel ranks were left part-way through an earlier step (it stopped on an error "
             "or a second interrupt), so they are out of step with rank 0 and it cannot generate again: call "
             "shutdown() and build a new LLM")
"""What a tensor-parallel rank 0 whose followers are out of step (`ModelRunner.step_cut_short`) raises."""


class ModelRunner:
    def __init__(self, model: DecoderForCausalLM, kv_spec: KVCacheSpec, backend: AttentionBackend, *,
                 device: torch.device, seed: int, tp=None) -> None:
        """tp: this rank's TPGroup (tensor parallelism), None for a single process."""
        self.model = model
        self.kv_spec = kv_spec
        self.tp = tp
        self.channel = None
        if tp is not None:
            from batchllm.parallel.step_channel import StepChannel

            self.channel = StepChannel(tp.host_group)
        self.backend = backend
        self.device = device
        self.block_size = kv_spec.block_size
        spec = model.spec
        self.num_blocks = kv_spec.num_blocks
        # one block beyond the pool's: where the padding rows of a CUDA graph's step store their K/V
        shape = (spec.num_layers, 2, kv_spec.num_blocks + 1, kv_spec.block_size, spec.num_kv_heads, spec.head_dim)
        # A 16-bit cache is never read before written (the attention reads slots below each sequence's
        # length); an fp8 one starts zeroed (through uint8: fill kernels need not exist for float8), since
        # a keys-major V is read in whole blocks and its unwritten slots must be finite (`kv_quant.py`)
        if kv_spec.dtype == FP8:
            self.kv_cache = torch.zeros(shape, dtype=torch.uint8, device=device).view(FP8)
        else:
            self.kv_cache = torch.empty(shape, dtype=kv_spec.dtype, device=device)  # [layers, 2, blocks, bs, kvh, d]
        self.kv_caches = list(self.kv_cache.unbind(0))
        self._kv_bytes = self.kv_cache.view(torch.uint8)  # block copies as bytes: index kernels exist for any dtype
        self.default_generator = torch.Generator(device=device).manual_seed(seed)
        self._tables = _BlockTables(max_width=kv_spec.num_blocks)  # no table outgrows the pool
        self._previous_tokens: tuple[torch.Tensor | None, dict[str, int]] = (None, {})
        """The tokens sampled by the step submitted last (on the device), and each request's index
        there: where the next step's placeholder tokens come from."""
        self._histories: dict[str, OutputHistory] = {}
        """Output tokens of the requests with penalties or a grammar (`logits_processors.py`)."""
        self._grammars: dict[str, GrammarState] = {}
        """Grammar matchers of the structured requests, advanced over their outputs."""
        self.structured: GrammarBackend | None = None
        """Compiles grammars; set once by `LLM` (it holds the tokenizer) before any structured request."""
        self.gpu_timeline: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        """Set to [] (CUDA only) to record events around every step's forward and sampling, from
        which the benchmark tells how long the GPU sat idle between steps."""
        self.annotate_steps = False
        """Set (while profiling) to mark each step's device work with its kind (`step_markers.py`)."""
        self.decode_graphs: DecodeGraphs | None = None
        """Set once, by `setup_decode_graphs` while the engine is built; None: every step runs eagerly."""
        self.step_cut_short = False
        """Tensor-parallel rank 0 only: a step it had sent to the followers stopped part-way (an exception on rank
        0, a second interrupt while one was held: `held_signals.signals_held`), so they may wait in one of its
        collectives and cannot be told to stop in order: `TensorParallelFollowers.stop` kills them instead, and
        a later `submit` raises CUT_SHORT rather than wait on them. Stays set: nothing puts them back in step."""
        self.num_graph_steps = 0
        """Steps run as a graph so far."""

    def execute(self, batch: ScheduledBatch) -> RunnerOutput:
        """Run one step and wait for its tokens."""
        return self.submit(batch).result()

    @torch.inference_mode()
    def submit(self, batch: ScheduledBatch) -> PendingRunnerOutput:
        """Queue one step on the device and return without waiting for it: nothing here reads a
        device value back (host-to-device copies go through pinned memory). A placeholder input
        token is the token its request samples in the step submitted just before this one."""
        if self.tp is None or not self.tp.is_driver:
            return self._submit(batch)
        if self.step_cut_short:
            raise RuntimeError(CUT_SHORT)
        from batchllm.parallel.held_signals import signals_held

        with signals_held():  # an interrupt waits for the step's end (`signals_held`): the followers stay in step
            self.step_cut_short = True  # until the step's last collective is issued
            self.channel.send(batch)
            pending = self._submit(batch)
            self.step_cut_short = False
        return pending

    def _submit(self, batch: ScheduledBatch) -> PendingRunnerOutput:
        """`submit`'s step on this rank, after rank 0 sent it to the followers."""
        for request_id in batch.finished_request_ids:
            self._tables.drop(request_id)
            self._histories.pop(request_id, None)
            self._grammars.pop(request_id, None)
        if batch.block_copies:
            self._copy_blocks(batch.block_copies)
        step = self._host_inputs(batch)
        extras = self._sampling_extras(batch, step)  # host work, while the step before runs
        graph_size = self._prepare_graph_step(step)
        with self._step_annotation(batch):
            sampled, prompt = self._forward_and_sample(step, graph_size, extras)
        ids = step.sample_ids
        self._previous_tokens = (None if sampled is None else sampled.tokens, dict(zip(ids, range(len(ids)))))
        if self.tp is not None and not self.tp.is_driver:
            sampled = None  # a follower's tokens are never read: no copy to the host
        return PendingRunnerOutput(ids, None if sampled is None else sampled.to_host(), self.device,
                                   None if prompt is None else prompt.to_host())

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write of partial prefix blocks and kept tails: each (source, destination) block's bytes, every
        layer's K and V, at most BLOCK_COPY_BYTES at a time, those chunks in list order; within a chunk every source
        is gathered into a temporary before any destination is written (one gather of 514 pairs took 4 GiB on the 8B
        shape), so a source that is an earlier pair's destination would be read unwritten: the scheduler names the
        first source instead (`Scheduler._add_copy`)."""
        on_device = to_device(pairs, self.device, torch.int64)
        per_copy = max(1, BLOCK_COPY_BYTES // self.kv_spec.bytes_per_block)
        for begin in range(0, len(pairs), per_copy):
            chunk = on_device[begin:begin + per_copy]
            self._kv_bytes[:, :, chunk[:, 1]] = self._kv_bytes[:, :, chunk[:, 0]]

    def _forward_and_sample(self, step: StepInputs, graph_size: int | None,
                            extras: tuple) -> tuple[SampledTokens | None, PromptLogprobTensors | None]:
        """Run the step's forward (eagerly, or as the decode graph of `graph_size` whose buffers
        `_prepare_graph_step` wrote), sample its sampling rows (None: the step has none) and compute any
        prompt logprobs, all queued on the device."""
        if graph_size is None:
            input_ids, positions, metadata, rows = self._device_inputs(step)
        else:
            rows = to_device(step.sample_indices, self.device)
        timeline = self.gpu_timeline
        if timeline is not None:
            started = torch.cuda.Event(enable_timing=True)
            started.record()
        if graph_size is None:
            hidden = self.model(input_ids, positions, self.kv_caches, metadata, self.backend)
        else:
            hidden = self.decode_graphs.replay(graph_size)
            self.num_graph_steps += 1
        sampled = self._sample(hidden[rows], step, extras) if step.sample_ids else None
        prompt = None
        if step.prompt_rows:  # only steps where a request asked for prompt logprobs
            prompt = compute_prompt_logprobs(self.model.compute_logits, self.model.full_spec.vocab_size, hidden,
                                             step.prompt_rows, driver=self.tp is None or self.tp.is_driver)
        if timeline is not None:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            timeline.append((started, ended))
        return sampled, prompt

    def _step_annotation(self, batch: ScheduledBatch) -> contextlib.AbstractContextManager:
        """While `annotate_steps` is set: the step's profiling marks (`step_markers.mark_step`);
        otherwise a context that does nothing."""
        return mark_step(batch, self.device) if self.annotate_steps else contextlib.nullcontext()

    def follow(self) -> None:
        """A follower's loop: run rank 0's steps until it stops."""
        while (batch := self.channel.recv()) is not None:
            self.submit(batch)
        self.release_graphs()

    def release_graphs(self) -> None:
        """Wait for the device and drop the decode graphs: they hold the tensor-parallel group's
        collectives, which must not outlive the group's teardown."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.decode_graphs = None

    def stop_followers(self) -> None:
        """Rank 0: end the followers' loops."""
        if self.tp is not None and self.tp.is_driver:
            self.channel.stop()

    def _sample(self, hidden: torch.Tensor, step: StepInputs, extras: tuple) -> SampledTokens:
        """The tokens of the sampling rows' hidden states. The rows go through the LM head and the sampler in
        slices of at most `sampler.LOGITS_PER_SLICE` logits (`row_slices`), so a step's logits never take more
        memory than one slice's, whatever its row count. Under tensor parallelism every rank gathers each slice's
        logits (the LM head is split by vocabulary); rank 0 samples and broadcasts the tokens, which the followers
        keep for their next step's placeholders."""
        driver = self.tp is None or self.tp.is_driver
        # each row samples the token after its last one: where a seeded row's noise comes from
        positions = (step.seq_lens[step.sample_seqs].tolist()
                     if driver and any(spec.seed is not None and not spec.is_greedy for spec in step.sample_settings)
                     else None)
        histories, grammar = extras
        slices = row_slices(len(step.sample_ids), self.model.full_spec.vocab_size)
        parts = []
        for begin, end in slices:
            logits = self.model.compute_logits(hidden[begin:end])
            if driver:
                parts.append(sample_on_device(
                    logits, step.sample_specs[begin:end], None if positions is None else positions[begin:end],
                    self.default_generator, None if histories is None else histories[begin:end],
                    None if grammar is None else grammar.rows_in(begin, end), uniform=step.sample_uniform))
        if driver:
            sampled = joined(parts, [begin for begin, _ in slices])
        else:
            sampled = SampledTokens(torch.empty(len(step.sample_ids), dtype=torch.int64, device=self.device))
        if self.tp is not None:
            self.tp.broadcast(sampled.tokens)
        return sampled

    def setup_decode_graphs(self, max_batch: int, max_model_len: int, *, capture: bool = True,
                            extra_items: int | None = None) -> None:
        """Run decode-shaped steps of up to `max_batch` sequences as CUDA graphs (`cuda_graphs.py`),
        captured now; capture=False (any device): the same buffers and plans, run eagerly (tests).
        Needs an attention backend with a static decode plan (Triton)."""
        self.decode_graphs = DecodeGraphs(
            self.model, self.backend, self.kv_caches, block_size=self.block_size, max_batch=max_batch,
            max_blocks_per_seq=min(-(-max_model_len // self.block_size), self.num_blocks),
            pad_slot=self.num_blocks * self.block_size, device=self.device, capture=capture, extra_items=extra_items)

    def _prepare_graph_step(self, step: StepInputs) -> int | None:
        """Write the step into the buffers of the graph that runs it and return that graph's size;
        None (nothing written: run it eagerly) unless graphs exist, the step is decode-shaped and
        small enough, and its attention plan fits the graph's buffers."""
        graphs = self.decode_graphs
        if graphs is None or step.max_query_len != 1:
            return None
        size = graphs.size_for(step.num_seqs, step.block_tables.shape[1])
        if size is None or not graphs.prepare(size, step, self._previous_tokens[0]):
            return None
        return size

    def _sampling_extras(self, batch: ScheduledBatch, step: StepInputs) -> tuple[list | None, GrammarRows | None]:
        """For rows with penalties or a grammar: record the outputs this step computes into the
        request's history, advance its grammar matcher over them, and fill the grammar bitmask
        (on the host; copied to the device behind the step). (None, None) when no row needs it.
        The sampling rows are those of `batch.requests` whose `sampling` is set, in order."""
        if not any(spec.needs_history for spec in step.sample_settings):
            return None, None
        sample_rows = [s for s in batch.requests if s.sampling is not None]
        histories: list[OutputHistory | None] = []
        grammar_rows: list[tuple[int, GrammarState]] = []
        for row, scheduled in enumerate(sample_rows):
            spec = scheduled.sampling
            if not spec.needs_history:
                histories.append(None)
                continue
            history = self._histories.get(scheduled.request_id)
            if history is None:
                history = self._histories[scheduled.request_id] = OutputHistory(spec.num_prompt_tokens)
            history.record(scheduled.start_position, scheduled.token_ids)
            histories.append(history)
            if spec.grammar is not None:
                state = self._grammars.get(scheduled.request_id)
                if state is None:
                    if self.structured is None:
                        raise RuntimeError(f"{scheduled.request_id}: structured output asked for, but the "
                                           "runner has no grammar backend (LLM sets it)")
                    state = self._grammars[scheduled.request_id] = self.structured.new_state(spec.grammar)
                state.advance(history.outputs)
                grammar_rows.append((row, state))
        mask = None
        if grammar_rows:
            bitmask = self.structured.allocate_bitmask(len(grammar_rows))
            kept = [j for j, (_, state) in enumerate(grammar_rows) if state.fill(bitmask, j)]
            if kept:
                rows = [grammar_rows[j][0] for j in kept]
                mask = GrammarRows(bitmask[kept].to(self.device), to_device(rows, self.device, torch.int64), rows)
        return histories, mask

    def _host_inputs(self, batch: ScheduledBatch) -> StepInputs:
        """A step's inputs as numpy arrays and lists. The decode rows come as columns (`DecodeRows`) and
        become arrays whole; the other entries are read in passes that each take one field (list
        comprehensions); per-token arrays come from numpy. Block-table diffs are applied only for the
        rows that sent entries, and the shared-prefix levels only for the rows under a prefix."""
        rows = _StepRows.of(batch)
        self._apply_table_diffs(batch)
        request_ids, counts, num_seqs = rows.request_ids, rows.counts, len(rows.request_ids)
        table_of = self._tables.lists
        tables = list(map(table_of.__getitem__, request_ids))
        held = np.fromiter(map(len, tables), dtype=np.int64, count=num_seqs)
        if (held != rows.table_lengths).any():  # (the scheduler's diffs and the runner's tables disagree: a bug)
            row = int(np.flatnonzero(held != rows.table_lengths)[0])
            raise RuntimeError(f"{request_ids[row]}: runner holds {held[row]} blocks, scheduler's table has "
                               f"{rows.table_lengths[row]}")
        query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        num_tokens = int(query_start_loc[-1])
        input_ids = rows.input_ids(num_tokens)
        last_token = query_start_loc[1:] - 1  # each sequence's last token: where it samples, if it does
        where, source = self._placeholders(input_ids, last_token, request_ids)
        sample_seqs = rows.sample_seqs
        prompt_rows = [(int(query_start_loc[rows.num_decodes + i]) + s.prompt_logprobs.row_start, s)
                       for i, s in enumerate(batch.entries) if s.prompt_logprobs is not None]
        bs = self.block_size
        block_tables = self._tables.gather(request_ids, int(held.max()))
        starts = rows.starts
        seq_lens = starts + counts
        positions = np.repeat(starts - query_start_loc[:-1], counts) + np.arange(num_tokens)
        token_seq = np.repeat(np.arange(num_seqs), counts)
        slots = block_tables[token_seq, positions // bs].astype(np.int64) * bs + positions % bs
        return StepInputs(
            input_ids=input_ids, positions=positions, slots=slots,
            query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables, tables=tables,
            share_levels=_share_levels(rows.shared_prefixes), max_query_len=int(counts.max()),
            sample_indices=last_token[sample_seqs], sample_seqs=sample_seqs, sample_ids=rows.sample_ids,
            sample_specs=rows.sample_specs, sample_uniform=_uniform(rows.sample_specs), placeholder_at=where,
            placeholder_source=source, prompt_rows=prompt_rows,
        )

    def _apply_table_diffs(self, batch: ScheduledBatch) -> None:
        """Place the step's new block-table entries: the decode rows' (`DecodeRows.new_blocks`, about one
        row in block_size) and the other entries' (most send none)."""
        update_table = self._tables.update
        decodes = batch.decodes
        if decodes is not None:
            for row, blocks in decodes.new_blocks:
                update_table(decodes.request_ids[row], decodes.table_lengths[row] - len(blocks), blocks)
        for scheduled in [s for s in batch.entries if s.block_ids]:
            update_table(scheduled.request_id, scheduled.block_table_start, scheduled.block_ids)

    def _placeholders(self, input_ids: np.ndarray, last_token: np.ndarray,
                      request_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(token indices that hold PLACEHOLDER_TOKEN_ID, the index of each one's token among the
        previous step's sampled tokens). Only a sequence's last token can be one: the token its
        request samples in the step submitted just before."""
        rows = np.flatnonzero(input_ids[last_token] == PLACEHOLDER_TOKEN_ID)
        previous_index = self._previous_tokens[1]
        source = list(map(previous_index.get, map(request_ids.__getitem__, rows.tolist())))
        if None in source:
            request_id = request_ids[rows[source.index(None)]]
            raise RuntimeError(f"{request_id}: a placeholder token, but the previous step sampled nothing "
                               "for this request")
        return last_token[rows], np.array(source, dtype=np.int64)

    def _device_inputs(self, step: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Token ids, positions, attention metadata and the rows to sample, on the device: the
        integers go in one copy, after which placeholder ids are filled from the previous step's
        sampled tokens (on the device)."""
        ids, positions, slots, loc, lens, rows, where, source = to_device_packed(
            [step.input_ids, step.positions, step.slots, step.query_start_loc, step.seq_lens, step.sample_indices,
             step.placeholder_at, step.placeholder_source], self.device)
        if len(step.placeholder_at):
            ids[where] = self._previous_tokens[0][source]
        metadata = AttentionMetadata(
            num_tokens=len(step.input_ids), block_size=self.block_size, slot_mapping=slots,
            query_start_loc=loc.to(torch.int32), seq_lens=lens.to(torch.int32),
            block_tables=to_device(np.ascontiguousarray(step.block_tables), self.device),
            max_query_len=step.max_query_len, max_seq_len=int(step.seq_lens.max()),
            query_start_loc_cpu=step.query_start_loc.tolist(), seq_lens_cpu=step.seq_lens.tolist(),
            block_tables_cpu=step.tables, share_levels_cpu=step.share_levels)
        return ids, positions, metadata, rows


def _share_levels(chains: list[tuple[tuple[str, int], ...]]) -> list[tuple[list[int], list[int]]] | None:
    """`AttentionMetadata.share_levels_cpu` of a step, from each sequence's `shared_prefixes`: per depth,
    each sequence's prefix group (numbered in order of first appearance, sequence by sequence and outermost
    first; -1: none at that depth) and that prefix's length (0: none). None when no sequence is under a
    shared prefix."""
    num_seqs = len(chains)
    deepest = max(map(len, chains), default=0)
    group_index: dict[str, int] = {}
    if deepest <= 1:  # (one level or none: the common case, in two passes)
        if not deepest:
            return None
        groups = [group_index.setdefault(chain[0][0], len(group_index)) if chain else -1 for chain in chains]
        return [(groups, [chain[0][1] if chain else 0 for chain in chains])]
    levels: list[tuple[list[int], list[int]]] = []
    for i, chain in enumerate(chains):
        for depth, (prefix_id, length) in enumerate(chain):  # (empty for a request under no prefix)
            if depth == len(levels):
                levels.append(([-1] * num_seqs, [0] * num_seqs))
            groups, lengths = levels[depth]
            groups[i] = group_index.setdefault(prefix_id, len(group_index))
            lengths[i] = length
    return levels or None


def _uniform(specs: list[SamplingSpec]) -> SamplingSpec | None:
    """The spec object every row holds (the scheduler shares one among requests of the same settings), or None:
    then a step's tests of its rows' settings read it once. An identity scan in C (`operator.is_`), which
    stops at the first other object."""
    if not specs:
        return None
    first = specs[0]
    return first if all(map(operator.is_, specs, itertools.repeat(first))) else None


@dataclass(frozen=True)
class GrammarRows:
    """A step's grammar bitmask on the device, for the sampling rows listed in `host_rows`."""

    bitmask: torch.Tensor  # [m, words] int32
    rows: torch.Tensor  # [m] int64: the sampling row of each bitmask row (host_rows on the device)
    host_rows: list[int]

    def rows_in(self, begin: int, end: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (bitmask, rows) of sampling rows [begin, end) with rows counted from begin, as `sample_on_device`
        takes them; None where none of them has a grammar. Nothing is read back from the device."""
        kept = [j for j, row in enumerate(self.host_rows) if begin <= row < end]
        if not kept:
            return None
        if begin == 0 and len(kept) == len(self.host_rows):
            return self.bitmask, self.rows
        shifted = to_device([self.host_rows[j] - begin for j in kept], self.rows.device, torch.int64)
        return self.bitmask[to_device(kept, self.bitmask.device, torch.int64)], shifted


@dataclass(slots=True)
class _StepRows:
    """A batch's rows as columns, in batch order (the decode rows, then the other entries): what
    `_host_inputs` reads. The decode rows' columns are the batch's own lists, taken whole."""

    request_ids: list[str]
    counts: np.ndarray  # [num_seqs] int64: tokens each row computes
    starts: np.ndarray  # [num_seqs] int64
    table_lengths: np.ndarray  # [num_seqs] int64: entries of each row's table once this step's are placed
    shared_prefixes: list[tuple[tuple[str, int], ...]]
    sample_seqs: np.ndarray  # [num_sampling_rows] int64: the rows that sample, in order
    sample_ids: list[str]
    sample_specs: list[SamplingSpec]
    num_decodes: int
    decode_tokens: list[int]
    entries: list[ScheduledRequest]

    @classmethod
    def of(cls, batch: ScheduledBatch) -> _StepRows:
        """The batch's rows; every decode row samples, an entry where its `sampling` is set."""
        decodes, entries = batch.decodes, batch.entries
        if decodes is None:
            decodes = DecodeRows([], [], [], [], [], [], [])
        num_decodes = len(decodes.request_ids)
        sampling = [i for i, s in enumerate(entries) if s.sampling is not None]
        return cls(
            request_ids=decodes.request_ids + [s.request_id for s in entries],
            counts=np.concatenate([np.ones(num_decodes, dtype=np.int64),
                                   np.fromiter([len(s.token_ids) for s in entries], np.int64, len(entries))]),
            starts=np.array(decodes.start_positions + [s.start_position for s in entries], dtype=np.int64),
            table_lengths=np.array(decodes.table_lengths + [s.block_table_start + len(s.block_ids) for s in entries],
                                   dtype=np.int64),
            shared_prefixes=decodes.shared_prefixes + [s.shared_prefixes for s in entries],
            sample_seqs=np.concatenate([np.arange(num_decodes, dtype=np.int64),
                                        np.array(sampling, dtype=np.int64) + num_decodes]),
            sample_ids=decodes.request_ids + [entries[i].request_id for i in sampling],
            sample_specs=decodes.samplings + [entries[i].sampling for i in sampling],
            num_decodes=num_decodes, decode_tokens=decodes.token_ids, entries=entries)

    def input_ids(self, num_tokens: int) -> np.ndarray:
        """[num_tokens] int64: the decode rows' tokens, then each entry's."""
        tokens = itertools.chain(self.decode_tokens, itertools.chain.from_iterable(s.token_ids for s in self.entries))
        return np.fromiter(tokens, dtype=np.int64, count=num_tokens)


@dataclass
class StepInputs:
    """One step's model inputs on the host (built by `ModelRunner._host_inputs`)."""

    input_ids: np.ndarray  # [num_tokens] int64; PLACEHOLDER_TOKEN_ID where the previous step's token goes
    positions: np.ndarray  # [num_tokens] int64
    slots: np.ndarray  # [num_tokens] int64: block * block_size + offset, where each token's K/V is stored
    query_start_loc: np.ndarray  # [num_seqs + 1] int64
    seq_lens: np.ndarray  # [num_seqs] int64
    block_tables: np.ndarray  # [num_seqs, width] int32, rows padded with 0
    tables: list[list[int]]  # each sequence's whole block table
    share_levels: list[tuple[list[int], list[int]]] | None  # as AttentionMetadata.share_levels_cpu
    max_query_len: int
    sample_indices: np.ndarray  # [num_sampling_rows] int64: token index of each sampling row (its last token)
    sample_seqs: np.ndarray  # [num_sampling_rows] int64: the sequence of each sampling row
    sample_ids: list[str]  # the request of each sampling row
    sample_specs: list[SamplingSpec]  # how each samples
    sample_uniform: SamplingSpec | None  # the one spec object every sampling row holds, if they all hold one
    placeholder_at: np.ndarray  # token indices whose id is the previous step's token ...
    placeholder_source: np.ndarray  # ... at these indices of that step's sampled tokens
    prompt_rows: list  # (token index of its first prompt-logprob row, ScheduledRequest), where asked

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def sample_settings(self) -> list[SamplingSpec] | tuple[SamplingSpec]:
        """The specs a test of the sampling rows' settings reads: the one they all share, or every row's."""
        return self.sample_specs if self.sample_uniform is None else (self.sample_uniform,)


class PendingRunnerOutput:
    """A submitted step's output: its tokens are copied to the host behind the step's kernels;
    `result()` waits for that copy (not for later steps) and returns the RunnerOutput."""

    def __init__(self, request_ids: list[str], sampled: SampledTokens | None, device: torch.device,
                 prompt: PromptLogprobTensors | None = None) -> None:
        self.request_ids = request_ids
        self.sampled = sampled
        self.prompt = prompt
        self.copied = None
        if (sampled is not None or prompt is not None) and device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()

    def result(self) -> RunnerOutput:
        if self.sampled is None and self.prompt is None:
            return RunnerOutput(sampled_token_ids={})
        if self.copied is not None:
            self.copied.synchronize()
        prompt = {} if self.prompt is None else self.prompt.lists()
        if self.sampled is None:
            return RunnerOutput(sampled_token_ids={}, prompt_logprobs=prompt)
        tokens, logprobs = self.sampled.lists()
        ids = self.request_ids
        return RunnerOutput(
            sampled_token_ids=dict(zip(ids, tokens)),
            logprobs={ids[row]: logprobs[row] for row in self.sampled.logprob_rows},
            prompt_logprobs=prompt,
        )


class _BlockTables:
    """Each request's block table, as a Python list (for slot lookups) and as a row of a numpy
    array (for gathering a step's [num_seqs, width] table without per-request copies)."""

    def __init__(self, max_width: int) -> None:
        self.width = 64
        self.max_width = max_width
        self.rows = np.zeros((64, self.width), dtype=np.int32)  # [row capacity, width]
        self._row_of: dict[str, int] = {}
        self.lists: dict[str, list[int]] = {}
        """Each request's whole table (read directly, without `update`, when a step sends no entries)."""
        self._free_rows: list[int] = list(range(63, -1, -1))

    def update(self, request_id: str, start: int, new_ids: list[int]) -> None:
        """Apply one of the scheduler's diffs: `new_ids` (never empty: a step that sends no entries
        leaves the table as it is, and `_host_inputs` reads `lists` directly) from position `start`;
        start 0 replaces the table (a new or preempted request). A start other than the table's
        length is the scheduler and the runner disagreeing: a RuntimeError naming the request."""
        if start == 0:
            table = self.lists[request_id] = list(new_ids)
        else:
            table = self.lists[request_id]
            if len(table) != start:
                raise RuntimeError(f"{request_id}: runner holds {len(table)} blocks, scheduler sent from {start}")
            table.extend(new_ids)
        row = self._row_of.get(request_id)
        if row is None:
            row = self._row_of[request_id] = self._take_row()
        if len(table) > self.width:
            self._widen(len(table))
        self.rows[row, start:len(table)] = new_ids

    def gather(self, request_ids: list[str], width: int) -> np.ndarray:
        rows = np.fromiter(map(self._row_of.__getitem__, request_ids), dtype=np.int64, count=len(request_ids))
        return self.rows[rows, :width]

    def drop(self, request_id: str) -> None:
        self.lists.pop(request_id, None)
        row = self._row_of.pop(request_id, None)
        if row is not None:
            self._free_rows.append(row)

    def _take_row(self) -> int:
        if not self._free_rows:
            old = self.rows.shape[0]
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        return self._free_rows.pop()

    def _widen(self, needed: int) -> None:
        width = min(max(needed, 2 * self.width), max(self.max_width, needed))
        wider = np.zeros((self.rows.shape[0], width), dtype=np.int32)
        wider[:, : self.width] = self.rows
        self.rows, self.width = wider, width
