"""Iteration-level scheduler: which tokens of which requests run in the next forward step.

Writer of the `KVCacheManager` and of all `Request` state but `parent` (set before submission) and
`projected_blocks` (the admission policy's). Work arrives as top-level units in plan
order (`waiting`): a shared prefix (with its members registered under it) or a plain request. Each
step fills a token budget in this order:
  1. running work: decode tokens first, then requests' prefill chunks, then prefix chunks;
  2. members whose prefix is READY (`ready_members`): they fork from it and prefill their suffix (a
     nested prefix of a group larger than the pool waits until its group fits beside the open ones);
  3. new top-level units, while the admission policy's projected KV use fits.
A prefix that completes becomes READY and releases its members; it is freed exactly when its last
member finishes. A request or prefix whose tokens past its fork point have KV an earlier call left (the KV cache,
`core/prefix_cache.py`; what requests ending as asked leave) takes it when admitted and computes the rest; a
prefix whose whole KV was left is READY when admitted, computing nothing, and its members start in the same step.
When the KV pool cannot grow running work, the last-scheduled running entry is preempted by recompute (blocks
freed, counter back to 0, outputs kept, back to the front of its queue;
a nested prefix to the back, behind the members of READY prefixes, which can run). When nothing can run at
all (no step, or a step whose one runnable entry preempted itself), the READY prefixes with no running
member, but for those the first waiting entry forks from, are released and recomputed later, and admission
charges the pool itself, whatever its threshold, until a request finishes (`MemoryAdmission.tighten`).
No request is dropped and no token is ever wrong.

Scheduling a step advances the counters of its requests (and makes a prefix READY once its last
chunk is scheduled); `update_from_output` only records sampled tokens. So the next step can be
scheduled before the previous one's tokens are back (asynchronous scheduling, `EngineCore`): a
request whose token is pending is scheduled on a placeholder, unless that token is bound to end
it (max_tokens, the context); one that ends on EOS or a stop wastes one decode, whose token is
dropped. Blocks freed while a step is in flight are safe to reuse: steps run in order on the device,
so the in-flight step's writes land before any later step's.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import chain

from batchllm.config import SchedulerConfig
from batchllm.core import prompt_logprobs
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.policies import MemoryAdmission, kv_tokens_written
from batchllm.core.step_updates import SchedulerStats, StepUpdates
from batchllm.outputs import (
    PLACEHOLDER_TOKEN_ID,
    DecodeRows,
    LogitsAdjust,
    RunnerOutput,
    SamplingSpec,
    ScheduledBatch,
    ScheduledRequest,
)
from batchllm.request import Request, RequestStatus

logger = logging.getLogger(__name__)


_KEPT_ENDINGS = frozenset({"stop", "length"})
"""How a request ends for its KV to stay findable by later calls (`Scheduler._finish`)."""

_MAX_SHARED_SPECS = 4096
"""Distinct shared sampling specs kept before the table starts again (a bound, not a limit: a spec made
after it is shared with those made after it)."""


def _logits_adjust(request: Request) -> LogitsAdjust:
    """The runner-side form of a request's penalties and biases, as plain ints and floats."""
    sp = request.sampling_params
    prompt = ()
    if sp.repetition_penalty != 1.0:
        ids = request.prompt_token_ids
        prompt = tuple(ids.tolist() if hasattr(ids, "tolist") else ids)
    return LogitsAdjust(
        presence_penalty=float(sp.presence_penalty), frequency_penalty=float(sp.frequency_penalty),
        repetition_penalty=float(sp.repetition_penalty),
        logit_bias=tuple(sorted((sp.logit_bias or {}).items())),
        allowed_token_ids=tuple(sp.allowed_token_ids) if sp.allowed_token_ids else None,
        bad_words=tuple(sp.bad_words_token_ids), prompt_token_ids=prompt,
    )


def _waits_for_pending_token(request: Request, num_tokens: int) -> bool:
    """A request with a pending (not yet known) token is not scheduled on a placeholder when the
    runner reads its last token on the host (penalties, biases, grammars: `needs_host_tokens`) or
    when that pending token is its last whatever its value: its outputs, pending ones included,
    reach `max_output_tokens` (max_tokens, or the context). num_tokens: its `num_tokens`."""
    return request.needs_host_tokens or num_tokens - len(request.prompt_token_ids) >= request.max_output_tokens


def _service_order(running: list[Request]) -> list[tuple[Request, int, bool]]:
    """Running work in order of service, each with its token count and whether it is a decode
    (`_is_decode` of all its remaining tokens): decodes, then request prefill, then prefix prefill,
    each class in running order (a stable sort by class). Built every step over every running
    request: one pass, each token count read once."""
    decodes, prefills, prefixes = [], [], []
    for request in running:  # (`num_tokens` and `_is_decode` inlined: every running request, every step)
        pending = request.num_pending_tokens
        outputs = request.output_token_ids
        num_tokens = len(request.prompt_token_ids) + len(outputs) + pending
        if request.is_prefix:
            prefixes.append((request, num_tokens, False))
        elif request.num_computed_tokens + 1 == num_tokens and (pending or outputs):
            decodes.append((request, num_tokens, True))
        else:
            prefills.append((request, num_tokens, False))
    decodes += prefills
    decodes += prefixes
    return decodes


def _keepable_tokens(request: Request) -> int:
    """How much of a request's prompt kept KV may cover: all but its last token, whose step samples its first output;
    all of a shared prefix's (it samples nothing), which is then ready at admission, running no step (`_admit_from`)."""
    if request.is_prefix:
        return request.num_prompt_tokens
    return request.num_prompt_tokens - 1


def _is_decode(request: Request, num_new: int, num_tokens: int) -> bool:
    """num_new tokens from num_computed_tokens are one output token: the last of `num_tokens`."""
    return num_new == 1 and request.num_computed_tokens + 1 == num_tokens and bool(
        request.output_token_ids or request.num_pending_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        """config: with its step budget resolved (the engine replaces max_num_batched_tokens=None by
        the device's default, `engine.default_step_tokens`, before building a scheduler)."""
        if config.max_num_batched_tokens is None:
            raise ValueError("Scheduler needs a step budget: max_num_batched_tokens is None (the engine "
                             "resolves the device default in resolve_model)")
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.admission = MemoryAdmission(kv.pool.num_blocks, kv.block_size, max_model_len,
                                         config.kv_admission_threshold)
        self.waiting: deque[Request] = deque()
        self.ready_members: deque[Request] = deque()
        self.running: list[Request] = []
        self.ready_prefixes: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self.num_pending_outputs = 0
        """Sampled tokens of scheduled steps whose results have not come back."""
        self._finished_since_last_step: list[str] = []
        self._finished_last_sent: list[str] = []
        """The finished requests the last batch made told the runner of (sent again after a failed step)."""
        self._wanted_blocks: list[list[int]] = []
        """Cached blocks requests added since the last step will take (`_note_kept_kv`)."""
        self._unsent_copies: dict[int, int] = {}
        """Block copies (destination -> source) of a step that scheduled no tokens (a prefix whose whole KV was kept,
        readied at admission, whose members could not start): the next batch sent copies them first
        (`_schedule_once`)."""
        self._shared_specs: dict[SamplingSpec, SamplingSpec] = {}
        """One SamplingSpec per distinct unseeded, unadjusted setting (`_sampling_spec`)."""

    # ------------------------------------------------------------------ admission
    def add_request(self, request: Request) -> None:
        """Queue a request or a shared prefix. Members are added after their parent."""
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"duplicate request id {rid!r}")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {rid!r} has an empty prompt")
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"request {rid!r}: prompt has {request.num_prompt_tokens} tokens, "
                f"the model's context (max_model_len) is {self.max_model_len}; no room to generate"
            )
        parent = request.parent
        if parent is not None:
            if parent.request_id not in self.requests or not parent.is_prefix:
                raise ValueError(f"request {rid!r}: its prefix must be added first")
            if parent.num_prompt_tokens >= request.num_prompt_tokens:
                raise ValueError(f"request {rid!r}: a member must extend its prefix by at least one token")
        if not request.is_prefix:
            worst_case = self.kv_blocks_needed(request)
            if worst_case > self.kv.pool.num_blocks:
                raise ValueError(
                    f"request {rid!r} may need {worst_case} KV blocks but the cache has "
                    f"{self.kv.pool.num_blocks}; give the KV cache more memory or lower max_model_len"
                )
        request.max_output_tokens = self._max_total_tokens(request) - request.num_prompt_tokens
        self.requests[rid] = request
        if parent is None:
            self.waiting.append(request)
        else:
            parent.num_live_members += 1
            parent.pending_members.append(request)
        sp = request.sampling_params
        if self.kv.cache is not None and sp.prompt_logprobs is None and not sp.skip_reading_prefix_cache:
            self._note_kept_kv(request)

    def _note_kept_kv(self, request: Request) -> None:
        """Whether the KV cache holds the KV of this request's (or prefix's) tokens past its fork point (full blocks,
        then a tail: `PrefixCache.match_tail`), which it then takes when admitted (`_take_kept_kv`). Found now,
        those blocks are queued to be handed out last, in the order their requests were added
        (`_keep_wanted_blocks`, before the next step): under memory pressure the pool reuses the cached blocks no
        request wants first, and of the wanted ones those wanted last."""
        blocks, tail = self.kv.match_tail(request.prompt_token_ids, _keepable_tokens(request))
        if len(blocks) * self.kv.block_size + (tail[1] if tail else 0) > request.fork_point:
            request.may_reuse_kept_kv = True
            self._wanted_blocks.append(blocks + [tail[0]] if tail else blocks)

    def _keep_wanted_blocks(self) -> None:
        """Queue the blocks found by `_note_kept_kv` since the last step at the back of the pool's free queue, those
        of the first request added last (so handed out last)."""
        for blocks in reversed(self._wanted_blocks):
            self.kv.pool.move_to_back(blocks)
        self._wanted_blocks = []

    def _take_kept_kv(self, request: Request) -> tuple[int, tuple[int, int] | None]:
        """At admission, a request (or prefix) `_note_kept_kv` found cached KV for, with nothing computed: where
        blocks still holding that KV, full ones and then a tail, reach past its fork point, it takes them
        (`KVCacheManager.adopt`; a member the parent's full blocks and the rest, `KVCacheManager.fork_onto_kept`)
        and starts past them, a request with at least its last token left to compute, a prefix possibly with none
        (`_keepable_tokens`; the KV of the blocks it takes is exactly its tokens': `core/prefix_cache.py`). A tail
        is copied into the block its table holds next, allocated with the rest of its blocks once the admission
        goes through (`KVCacheManager.tail_copy`). Returns the tokens taken past the fork point (0: nothing taken, it
        forks or starts as planned) and the tail as (its block, the table index its copy goes to), or None."""
        blocks, tail = self.kv.match_tail(request.prompt_token_ids, _keepable_tokens(request), index_new=False)
        tail_block, tail_tokens = tail if tail else (None, 0)
        start = len(blocks) * self.kv.block_size + tail_tokens
        if start <= request.fork_point:
            return 0, None
        if request.parent is None:
            self.kv.adopt(request.request_id, blocks)
        else:
            self.kv.fork_onto_kept(request.request_id, request.parent.request_id, request.fork_point, blocks,
                                   tail_block is not None)
        request.num_computed_tokens = start
        return start - request.fork_point, None if tail_block is None else (tail_block, len(blocks))

    def kv_blocks_needed(self, request: Request) -> int:
        """KV blocks the pool must hold for a request at once, exactly: its own table, for the tokens it writes
        (its prompt and max_tokens, at most the context, without max_tokens `_max_total_tokens`, less the last
        output token, which is never written: `kv_tokens_written`), and the last block of each prefix above it
        that ends inside a block: that prefix keeps its partial block while the member writes into a copy (or,
        nested, its own prefix's copy). A prefix ending on a block boundary costs nothing more: the member shares
        all of its blocks, which it would otherwise hold itself."""
        partial, prefix = 0, request.parent
        while prefix is not None:
            partial += prefix.num_prompt_tokens % self.kv.block_size != 0
            prefix = prefix.parent
        return self.kv.blocks_for(kv_tokens_written(self._max_total_tokens(request))) + partial

    def _max_total_tokens(self, request: Request) -> int:
        """Prompt and output tokens the request may reach: with max_tokens, at most the context; without
        (vLLM's None), the context or what the whole cache holds (one token more than its entries: the last
        token is never written, `kv_tokens_written`), whichever is less (vLLM would not start with a cache
        smaller than the context), but at least one output token (a prompt the cache cannot hold is then
        refused by name). Whatever else is in the batch: such a member that cannot also hold copies of
        its prefixes' last blocks shares prefixes ending on block boundaries instead (`LLM._crowded_members`),
        with the same limit."""
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is not None:
            return min(self.max_model_len, request.num_prompt_tokens + max_tokens)
        cache_tokens = self.kv.pool.num_blocks * self.kv.block_size
        return max(request.num_prompt_tokens + 1, min(self.max_model_len, cache_tokens + 1))

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def num_unfinished_requests(self) -> int:
        """Unfinished requests other than shared prefixes (what a caller submitted)."""
        return sum(not r.is_prefix for r in self.requests.values())

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch:
        """The next step. Empty while everything that could run waits on pending tokens (the
        caller collects the step in flight and asks again), or when nothing is left."""
        if self._wanted_blocks:
            self._keep_wanted_blocks()
        batch = self._schedule_once()
        while (not batch.num_seqs and not self.num_pending_outputs and self.has_unfinished()
               and self._release_idle_prefixes()):
            batch = self._schedule_once()
        return batch

    def _schedule_once(self) -> ScheduledBatch:
        """Choose the step's running work (`_choose_decodes`, then `_choose_in_order`), then admit new work;
        the running decodes become the batch's columns (`_decode_rows`) before admission, so admission sees
        every counter as the step leaves it."""
        budget = self.config.max_num_batched_tokens
        decoding: list[Request] = []  # the running decodes chosen, in order
        grown: list[int] = []  # their indices whose table may have grown (allocated at a block boundary)
        chosen: list[tuple[Request, int, int, bool]] = []  # the rest: (request, new tokens, its token count, decode)
        copies, self._unsent_copies = self._unsent_copies, {}  # (destination -> source, in the order added)
        budget, rest = self._choose_decodes(budget, decoding, grown)
        budget, preempted = self._choose_in_order(rest, budget, decoding, grown, chosen)
        decodes = self._decode_rows(decoding, grown) if decoding else None

        # Admitting new work right after a preemption would only thrash: wait for blocks to free up,
        # unless the preemption emptied the step (the one running request could not grow beside
        # READY prefixes kept for the waiting members: those members are what can run now). Such a step is
        # one where nothing could run: the idle READY prefixes go first, as in an empty step, or the same
        # request (first in its queue again) or prefix is admitted and stopped at the same place, forever.
        if not preempted or not (decoding or chosen):
            if preempted:
                self._release_idle_prefixes()
            readied = -1
            while readied != self.stats.num_prefixes_kept_whole:  # (a prefix readied at admission: its members next)
                readied = self.stats.num_prefixes_kept_whole
                for queue in (self.ready_members, self.waiting):
                    budget = self._admit_from(queue, budget, chosen, copies)
        return self._make_batch(decodes, chosen, copies)

    def _choose_decodes(self, budget: int, decoding: list[Request], grown: list[int]) -> tuple[int, list]:
        """Choose the running decodes, in running order, in the pass that tells them from the rest (every
        running request, every step: `_service_order` and `_num_new_tokens` inlined), as `_choose_in_order`
        would over `_service_order(self.running)`: a decode waiting for its pending token is skipped, one with
        room in its last block is chosen as it is, one at a block boundary once its block is allocated. Returns
        the budget left and what `_choose_in_order` takes next: the prefills then the prefixes, each class in
        running order, or, when a decode's block could not be had, that decode, the decodes after it and then
        those (where the victims of preemption come from the back, exactly as in the whole order)."""
        prefills, prefixes = [], []
        allocate_slots, block_size = self.kv.allocate_slots, self.kv.block_size
        running = self.running
        for index, request in enumerate(running):
            pending = request.num_pending_tokens
            outputs = request.output_token_ids
            num_tokens = len(request.prompt_token_ids) + len(outputs) + pending
            if request.is_prefix:
                prefixes.append((request, num_tokens, False))
            elif not (request.num_computed_tokens + 1 == num_tokens and (pending or outputs)):
                prefills.append((request, num_tokens, False))
            elif budget <= 0 or (pending and (request.needs_host_tokens  # (`_waits_for_pending_token` inlined)
                                              or len(outputs) + pending >= request.max_output_tokens)):
                continue  # (budget spent: nothing else is chosen, `_choose_in_order` stops at once)
            elif request.num_computed_tokens % block_size:
                # its last block has room: the table covers every computed token (the KV manager's
                # invariant) and the runner holds all of it (`_free_blocks`: the rule of sent tables)
                decoding.append(request)
                budget -= 1
            elif allocate_slots(request.request_id, request.num_computed_tokens + 1):
                grown.append(len(decoding))
                decoding.append(request)
                budget -= 1
            else:  # (no block: the rest in service order, this decode first; a failed allocation changed nothing)
                rest = _service_order(running[index:])
                return budget, ([e for e in rest if e[2]] + prefills
                                + [e for e in rest if not e[2] and not e[0].is_prefix]
                                + prefixes + [e for e in rest if e[0].is_prefix])
        return budget, prefills + prefixes

    def _choose_in_order(self, order: list[tuple[Request, int, bool]], budget: int, decoding: list[Request],
                         grown: list[int], chosen: list) -> tuple[int, bool]:
        """Choose from `order` (entries of `_service_order`) while budget lasts, preempting from its back when
        the pool cannot grow an entry (a chosen entry is never a victim: its counters and table stay as
        chosen). Returns the budget left and whether anything was preempted."""
        allocate_slots = self.kv.allocate_slots
        preempted = False
        i = 0
        while i < len(order) and budget > 0:
            request, num_tokens, decode = order[i]
            if decode:
                num_new = 0 if request.num_pending_tokens and _waits_for_pending_token(request, num_tokens) else 1
            else:
                num_new = self._num_new_tokens(request, budget, num_tokens)
            if num_new == 0:
                i += 1
                continue
            while not allocate_slots(request.request_id, request.num_computed_tokens + num_new):
                victim = order.pop()[0]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            else:
                if decode:
                    if request.num_computed_tokens % self.kv.block_size == 0:
                        grown.append(len(decoding))
                    decoding.append(request)
                else:
                    chosen.append((request, num_new, num_tokens, False))
                budget -= num_new
                i += 1
        return budget, preempted

    def _decode_rows(self, decoding: list[Request], grown: list[int]) -> DecodeRows:
        """The chosen running decodes as the batch's columns (`DecodeRows`): each one's last token (pending, as
        a placeholder, or its last output), which samples, with the table entries the runner lacks for those
        in `grown` (the others' tables are unchanged and the runner holds all of them: the rule of sent
        tables). Advances their counters. Every running decode, every step: one comprehension per column."""
        specs = [r.cached_sampling_spec or self._sampling_spec(r) for r in decoding]  # (before pending grows)
        new_blocks = []
        for row in grown:
            blocks = self._unsent_blocks(decoding[row])
            if blocks:
                new_blocks.append((row, blocks))
        rows = DecodeRows(
            [r.request_id for r in decoding], [r.num_computed_tokens for r in decoding],
            [PLACEHOLDER_TOKEN_ID if r.num_pending_tokens else r.output_token_ids[-1] for r in decoding],
            specs, [r.shared_prefixes for r in decoding], [r.num_blocks_sent for r in decoding], new_blocks)
        for request in decoding:
            request.num_computed_tokens += 1
            request.num_pending_tokens += 1
        return rows

    def _admit_from(self, queue: deque[Request], budget: int, chosen: list, copies: dict[int, int]) -> int:
        """Admit from the head of `queue` while budget, seats and memory last; the queue's order is kept
        (the first entry that cannot start stops it). Returns the budget left.

        The open work's blocks (`MemoryAdmission.open_blocks` over the running requests and READY prefixes) are
        summed once, where a nested prefix first asks, and kept as the loop admits: an entry of `queue` is no
        open work until it runs, then adds its `group_blocks`. (Summed per nested prefix, a pass over every
        running request each, they took 20 s of a 98-s run of 100k lines over a 0.5 GiB cache: docs/benchmarks.md.)"""
        cap = self.config.max_num_seqs
        open_sum: int | None = None  # (None until summed)

        def open_blocks() -> int:
            nonlocal open_sum
            if open_sum is None:
                open_sum = self.admission.open_blocks(chain(self.running, self.ready_prefixes))
            return open_sum

        while queue and budget > 0 and (cap is None or len(self.running) < cap):
            request = queue[0]
            if request.num_pending_tokens or not self.admission.can_admit(request, nothing_running=not self.running):
                break  # (a request preempted with a token in flight waits for its value)
            if request.is_prefix and request.parent is not None and not self.admission.can_open_subgroup(
                    request, open_blocks, nothing_running=not self.running):
                break  # (its group outgrew the pool: it waits for its siblings to free memory)
            copy, kept, tail = None, 0, None
            if request.may_reuse_kept_kv and not request.num_computed_tokens:
                kept, tail = self._take_kept_kv(request)
            if request.parent is not None and not kept:
                ok, copy = self.kv.fork(request.request_id, request.parent.request_id, request.fork_point)
                if not ok:
                    break
                request.num_computed_tokens = request.fork_point
            num_tokens = request.num_tokens
            whole = request.num_computed_tokens == num_tokens  # a prefix whose whole KV was kept: ready now
            num_new = 0 if whole else self._num_new_tokens(request, budget, num_tokens)
            if not (whole or num_new) or not self.kv.allocate_slots(
                request.request_id, request.num_computed_tokens + num_new
            ):
                self._free_blocks(request)  # (a kept tail is untouched: its copy's block was not allocated)
                request.num_computed_tokens = 0
                break
            if tail is not None:
                copy = self.kv.tail_copy(request.request_id, *tail)
            self._start_running(queue, request, kept, copy, copies)
            if whole:
                self.stats.num_prefixes_kept_whole += 1
                self._prefix_ready(request)
                continue
            if open_sum is not None:
                open_sum += self.admission.group_blocks(request)
            chosen.append((request, num_new, num_tokens, _is_decode(request, num_new, num_tokens)))
            budget -= num_new
        return budget

    def _start_running(self, queue: deque[Request], request: Request, kept: int, copy: tuple[int, int] | None,
                       copies: dict[int, int]) -> None:
        """`_admit_from`'s admission of the head of `queue`, its blocks held: it runs, with the block copy its start
        needs (`_add_copy`)."""
        queue.popleft()
        if request.may_reuse_kept_kv:  # (this admission's: a preempted request may find fewer blocks again)
            request.kept_tokens = kept
            self.stats.kept_prefill_tokens += kept
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self.admission.on_admit(request)
        if copy is not None:
            self._add_copy(copies, copy)

    def _add_copy(self, copies: dict[int, int], copy: tuple[int, int]) -> None:
        """Add a block copy to this batch's (destination -> source, in the order added). One whose source is an
        earlier copy's destination (a member forking from a prefix whose partial block is the copy of a kept tail
        made in this batch: both copies run before the step, gathered at once) copies that copy's source instead,
        which holds the same tokens there (and is dropped where that source is its destination: the kept tail handed
        out as the member's copy block). A copy carried from an empty step into a block freed since (its prefix
        released) and handed out here again is replaced: two copies into one block in one gather would leave
        either."""
        source, destination = copy
        source = copies.get(source, source)
        copies.pop(destination, None)
        if source != destination:
            copies[destination] = source

    def _num_new_tokens(self, request: Request, budget: int, num_tokens: int) -> int:
        """Tokens of the request this step can compute within `budget`; num_tokens: its `num_tokens`."""
        if request.num_pending_tokens and _waits_for_pending_token(request, num_tokens):
            return 0
        remaining = num_tokens - request.num_computed_tokens
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _free_blocks(self, request: Request, keep: bool = False) -> None:
        """Free the request's blocks; with `keep` (it ended as asked: `_finish`), the KV cache first records the
        tokens they hold, for a later call to find (`KVCacheManager.free`): those of its prompt and outputs that a
        step was scheduled for (the last output's only when a step in flight decodes it, on a placeholder: that
        step writes its KV before any later step reads it, and a failed step clears the cache). The rule of sent
        tables: every block a step allocates or forks for a request is sent to the runner by that step's batch
        (`_unsent_blocks`), or freed here before any batch; so a running request's `num_blocks_sent` is its
        table's length between steps, and a decode that allocates nothing sends nothing (`_decode_rows`)."""
        if keep:
            self.kv.free(request.request_id, request.prompt_token_ids, request.output_token_ids,
                         request.num_computed_tokens)  # (at most its prompt and outputs: one token is pending)
        else:
            self.kv.free(request.request_id)
        request.num_blocks_sent = 0  # the next table is sent whole

    def _preempt(self, request: Request) -> None:
        self._free_blocks(request)
        self.running.remove(request)
        self.admission.on_release(request)
        _forget_computed(request)
        request.status = RequestStatus.PREEMPTED
        self.stats.num_preemptions += 1
        # (a nested prefix waits behind the members of READY prefixes, which can run: ahead of them, it was
        # admitted again before them and stopped at the same place; a top-level one waits ahead of the other
        # top-level work, which comes after those members anyway)
        self._requeue(request, front=not request.is_prefix or request.parent is None)
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    def _requeue(self, request: Request, front: bool) -> None:
        """Put a request (back) in the queue it waits in: top-level work, the members of a READY
        prefix, or its prefix's pending members."""
        parent = request.parent
        if parent is None:
            queue = self.waiting
        elif parent.status is RequestStatus.READY:
            queue = self.ready_members
        else:
            queue = parent.pending_members
        if not front:
            queue.append(request)
        elif isinstance(queue, deque):
            queue.appendleft(request)
        else:
            queue.insert(0, request)

    def _release_idle_prefixes(self) -> bool:
        """Nothing could run (`schedule` found no step, or the one runnable entry preempted itself): free every
        READY prefix that has no running member and is not an ancestor of the first waiting entry, and queue
        them behind it, so that entry runs next. (Its own ancestors always fit beside it: add_request checked
        the worst case.) False if there was nothing to release."""
        head = self.ready_members[0] if self.ready_members else (self.waiting[0] if self.waiting else None)
        keep = set()
        ancestor = head.parent if head is not None else None
        while ancestor is not None:
            keep.add(ancestor.request_id)
            ancestor = ancestor.parent
        busy: set[str] = set()  # every prefix above a running request
        for r in self.running:
            ancestor = r.parent
            while ancestor is not None and ancestor.request_id not in busy:
                busy.add(ancestor.request_id)
                ancestor = ancestor.parent
        released = [p for p in self.ready_prefixes if p.request_id not in busy and p.request_id not in keep]
        for prefix in released:
            self.ready_prefixes.remove(prefix)
            self._free_blocks(prefix)
            self.admission.on_release(prefix)
            _forget_computed(prefix)
            prefix.status = RequestStatus.WAITING
            mine = [m for m in self.ready_members if m.parent is prefix]
            self.ready_members = deque(m for m in self.ready_members if m.parent is not prefix)
            prefix.pending_members = mine + prefix.pending_members
            self._requeue(prefix, front=False)
            self.stats.num_prefix_releases += 1
            logger.debug("released idle prefix %s to unblock the batch", prefix.request_id)
        if released:
            self.admission.tighten()
        return bool(released)

    def _make_batch(self, decodes: DecodeRows | None, chosen: list[tuple[Request, int, int, bool]],
                    copies: dict[int, int]) -> ScheduledBatch:
        """The step's batch: the running decodes, already made (`_decode_rows`), then the other
        chosen entries, made here; advances the counters of its requests (see the module docstring).
        An empty step keeps the finished ids for the next one. chosen: (request, new tokens, its
        token count, whether those are a decode: only an admitted request's can be)."""
        if decodes is None and not chosen:
            self._unsent_copies = copies  # (a kept prefix's tail copy: before any step reads it)
            return ScheduledBatch([])
        scheduled: list[ScheduledRequest] = []
        num_decodes = 0 if decodes is None else len(decodes.request_ids)
        attended_keys = 0 if decodes is None else sum(decodes.start_positions)  # (+ 1 per decode, below)
        completed_prefixes = []
        num_samples = 0
        for request, num_new, num_tokens, decode in chosen:
            start = request.num_computed_tokens
            if decode:
                scheduled.append(self._scheduled_decode(request))
                num_decodes += 1
                attended_keys += start
                continue
            made, samples = self._scheduled_prefill(request, num_new, num_tokens)
            scheduled.append(made)
            num_samples += samples
            self.stats.prefill_tokens += num_new
            self.stats.recomputed_tokens += num_new - _first_prompt_tokens(request, start, num_new)
            attended_keys += num_new * start + num_new * (num_new + 1) // 2  # positions start .. + num_new - 1
            if request.is_prefix and start + num_new == num_tokens:
                completed_prefixes.append(request)
        self.num_pending_outputs += num_samples + num_decodes
        self.stats.decode_tokens += num_decodes
        self.stats.attended_keys += attended_keys + num_decodes
        batch = ScheduledBatch(scheduled, finished_request_ids=self._finished_since_last_step,
                               block_copies=[(source, destination) for destination, source in copies.items()],
                               num_sampling_rows=num_samples + num_decodes, decodes=decodes)
        self._finished_last_sent, self._finished_since_last_step = self._finished_since_last_step, []
        for prefix in completed_prefixes:  # its members run in later steps, after its KV on the device
            self._prefix_ready(prefix)  # (after the batch: a prefix dropped here must reach the runner later)
        self._record_step(len(copies))
        return batch

    def _record_step(self, num_block_copies: int) -> None:
        self.stats.num_steps += 1
        self.stats.num_block_copies += num_block_copies
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, self.kv.pool.num_used_blocks)

    def _scheduled_prefill(self, request: Request, num_new: int, num_tokens: int) -> tuple[ScheduledRequest, bool]:
        """A prefill chunk of `num_new` tokens of a request (or prefix) of `num_tokens`, as a ScheduledRequest with
        the table entries the runner lacks, and whether it samples (the chunk reaches the end of a request that
        is no prefix). Advances the request's counters."""
        start, sp = request.num_computed_tokens, request.sampling_params
        sent, new_blocks = request.num_blocks_sent, self._unsent_blocks(request)
        samples = start + num_new == num_tokens and not request.is_prefix
        spec = (request.cached_sampling_spec or self._sampling_spec(request)) if samples else None
        scheduled = ScheduledRequest(
            request.request_id, request.token_ids(start, start + num_new), start, new_blocks, sent, spec,
            request.shared_prefixes,
            None if sp.prompt_logprobs is None else prompt_logprobs.spec_for_chunk(request, start, num_new))
        request.num_computed_tokens = start + num_new
        if samples:  # (after its spec: min_tokens counts the pending tokens before this one)
            request.num_pending_tokens += 1
        return scheduled, samples

    def _scheduled_decode(self, request: Request) -> ScheduledRequest:
        """A decode admitted this step, as a ScheduledRequest (rare: the running decodes are columns,
        `_decode_rows`): the request's last token (pending, as a placeholder, or its last output), which
        samples, with the table entries the runner lacks (admission allocated them). Advances the request's
        counters."""
        start, pending, sp = request.num_computed_tokens, request.num_pending_tokens, request.sampling_params
        sent = request.num_blocks_sent
        spec = request.cached_sampling_spec or self._sampling_spec(request)  # (before the pending count grows)
        scheduled = ScheduledRequest(
            request.request_id, [PLACEHOLDER_TOKEN_ID] if pending else request.output_token_ids[-1:], start,
            self._unsent_blocks(request), sent, spec, request.shared_prefixes,
            None if sp.prompt_logprobs is None else prompt_logprobs.spec_for_chunk(request, start, 1))
        request.num_computed_tokens = start + 1
        request.num_pending_tokens = pending + 1
        return scheduled

    def _unsent_blocks(self, request: Request) -> list[int]:
        """The entries of the request's block table the runner does not hold yet (marked sent)."""
        table = self.kv.block_table(request.request_id)
        new_blocks = table[request.num_blocks_sent:]
        request.num_blocks_sent = len(table)
        return new_blocks

    def _sampling_spec(self, request: Request) -> SamplingSpec:
        """A sampling row's settings, made when `request.cached_sampling_spec` holds none (the caller
        reads that first: every sampling row, every step); cached once past min_tokens. Requests with the
        same settings share one spec object (`_shared_specs`: the runner then tests one spec for a step
        whose rows all hold it, `StepInputs.sample_uniform`), except seeded ones and those with
        adjustments (whose prompt ids would make the key costly), which are each their own. A greedy
        request's seed is dropped (it draws no noise), so greedy rows share a spec on `batchllm run --seed`, which
        seeds every request."""
        sp = request.sampling_params
        banned: tuple[int, ...] = ()
        if request.num_output_tokens + request.num_pending_tokens < sp.min_tokens:
            banned = tuple(sorted(set(request.eos_token_ids) | set(sp.stop_token_ids)))
        adjust = _logits_adjust(request) if sp.has_adjustments else None
        seed = None if sp.is_greedy else sp.seed  # (a greedy row draws no noise: its seed changes nothing)
        spec = SamplingSpec(temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, min_p=sp.min_p, seed=seed,
                            num_logprobs=sp.num_logprobs, logprob_token_ids=tuple(sp.logprob_token_ids or ()),
                            banned_token_ids=banned, adjust=adjust, grammar=sp.grammar_key,
                            num_prompt_tokens=request.num_prompt_tokens if request.needs_host_tokens else 0)
        if adjust is None and seed is None:
            if len(self._shared_specs) >= _MAX_SHARED_SPECS:
                self._shared_specs.clear()
            spec = self._shared_specs.setdefault(spec, spec)
        if not banned:  # past min_tokens the settings never change again
            request.cached_sampling_spec = spec
        return spec

    # ------------------------------------------------------------------ results
    def recover_from_failed_step(self, in_flight: ScheduledBatch | None) -> None:
        """After a failed step (`EngineCore._after_failure`): only `in_flight` (None: no step) will record its tokens,
        so only its sampling rows count as pending. Every other step's tokens never come (one whose execution,
        collection or recording failed, one submitted after it, one scheduled as the failure came), so later steps
        schedule as if those had not run. Their requests cannot go on (their pending tokens never come): the caller
        ends them. The finished requests the last batch told the runner of go with the next batch again: that batch
        may never have reached the runner (it drops a request's state idempotently)."""
        self.num_pending_outputs = 0 if in_flight is None else in_flight.num_sampling_rows or 0
        self._finished_since_last_step = self._finished_last_sent + self._finished_since_last_step
        self._finished_last_sent = []

    def update_from_output(self, batch: ScheduledBatch, output: RunnerOutput) -> StepUpdates:
        """Record the tokens a step sampled, in batch order (`output.sampled_token_ids` holds one per
        sampling row, in that order: the runner's, and any executor's, contract). A request that ended
        while the step was in flight (EOS or a stop in the step before, an abort) drops its token."""
        if output.prompt_logprobs:  # (first: a request's first token hands them on, assembled)
            for scheduled in batch.entries:  # (a decode row asks for none)
                if scheduled.prompt_logprobs is not None:
                    self._record_prompt_logprobs(scheduled, output)
        sampled = output.sampled_token_ids
        if batch.num_sampling_rows is not None and len(sampled) != batch.num_sampling_rows:
            raise RuntimeError(f"the step sampled {len(sampled)} tokens for {batch.num_sampling_rows} sampling rows")
        updates = StepUpdates(logprobs=output.logprobs)
        ended, requests, dropped = updates.ended, self.requests, set()
        with self._finishing_in_bulk() as gone:  # (`running` filtered once)
            for request_id, token in sampled.items():  # (every running request, every step: locals, no property reads)
                request = requests.get(request_id)
                if request is None:
                    dropped.add(request_id)
                    continue
                request.num_pending_tokens -= 1
                outputs = request.output_token_ids
                outputs.append(token)
                if token in request.stop_token_set or len(outputs) >= request.max_output_tokens:
                    finish_reason, stop_reason = self._check_finished(request, token)
                    if finish_reason is not None:
                        self._finish(request, finish_reason, stop_reason, gone)
                        ended[request_id] = (finish_reason, stop_reason)
                if len(outputs) == 1 and request.sampling_params.prompt_logprobs is not None:
                    updates.prompt_logprobs[request_id] = prompt_logprobs.assemble(request)
        if dropped:
            kept = [(rid, token) for rid, token in sampled.items() if rid not in dropped]
            updates.request_ids, updates.token_ids = [rid for rid, _ in kept], [token for _, token in kept]
        else:
            updates.request_ids, updates.token_ids = list(sampled), list(sampled.values())
        self.num_pending_outputs -= len(sampled)
        return updates

    def _record_prompt_logprobs(self, scheduled: ScheduledRequest, output: RunnerOutput) -> None:
        """Keep a step's prompt-logprob rows on their request (or prefix); dropped when it has
        ended meanwhile (aborted: nobody will read them)."""
        request = self.requests.get(scheduled.request_id)
        if request is not None:
            prompt_logprobs.record(request, scheduled.prompt_logprobs, scheduled.start_position,
                                   output.prompt_logprobs[scheduled.request_id])

    def _prefix_ready(self, prefix: Request) -> None:
        """A prefix computed: its members queue to fork from it. A nested prefix's go to the front, where it was
        (it was admitted from the head): a group is worked depth first, so its members run and free it before
        its sibling prefixes take memory. Queued behind those siblings, the members of nested prefixes never
        ran in a small cache: the siblings filled it, were released to unblock it, and were computed again,
        forever."""
        if prefix.num_live_members == 0:  # every member ended (aborted) while it was computed
            self._finish(prefix, None, None)
            return
        self.running.remove(prefix)
        prefix.status = RequestStatus.READY
        self.ready_prefixes.append(prefix)
        if prefix.parent is None:
            self.ready_members.extend(prefix.pending_members)
        else:
            self.ready_members.extendleft(reversed(prefix.pending_members))
        prefix.pending_members = []

    def _check_finished(self, request: Request, token: int) -> tuple[str | None, int | None]:
        """(finish reason, stop reason) after the request's latest output `token`, (None, None) while
        it goes on. Only called when `token` is in its `stop_token_set` or its outputs reached
        `max_output_tokens`: otherwise nothing here can end it (update_from_output skips the call)."""
        sp = request.sampling_params
        num_outputs = len(request.output_token_ids)
        # before min_tokens an EOS is sampled only where a grammar allowed nothing else (`sampler`): it ends the answer
        if (num_outputs >= sp.min_tokens or sp.structured_outputs is not None) and not sp.ignore_eos \
                and token in request.eos_token_ids:
            return "stop", None if token == request.model_eos_token_id else token
        if num_outputs >= sp.min_tokens and token in sp.stop_token_ids:
            return "stop", token
        if num_outputs >= request.max_output_tokens:
            return "length", None
        return None, None

    def finish_requests(self, request_ids: list[str], reason: str, stop_reason: int | str | None = None) -> None:
        """End requests from outside the step (a stop string matched, or an abort). In bulk: the state
        afterwards is exactly that of `_finish` on each in turn, in O(len(request_ids) + the lengths of the
        queues they were in) (`_unlink_all`), so stopping a job with 100k lines left takes no longer than
        its lines (one `_unlink` each scanned the queues: quadratic)."""
        with self._finishing_in_bulk() as gone:
            for request_id in request_ids:
                request = self.requests.get(request_id)
                if request is not None and not request.is_prefix:
                    self._finish(request, reason, stop_reason, gone)

    def abort_requests_of(self, id_prefix: str) -> None:
        """End every request whose id starts with `id_prefix` (one call's, submitted part-way when an interrupt
        came): its members, then any prefix a member never added would have kept alive, nested ones before
        their parents (each was added after its parent; a nested prefix is a live member of its parent, which
        goes with it when it was the last: finished first, the parent was finished a second time). In bulk,
        as `finish_requests`."""
        ours = [r for rid, r in self.requests.items() if rid.startswith(id_prefix)]
        prefixes = [r for r in reversed(ours) if r.is_prefix]
        with self._finishing_in_bulk() as gone:
            for request in [r for r in ours if not r.is_prefix] + prefixes:
                if request.request_id in self.requests:  # (a prefix goes with its last member)
                    self._finish(request, "abort", None, gone)

    def _finish(self, request: Request, reason: str | None, stop_reason: int | str | None,
                gone: dict[str, tuple[Request, RequestStatus]] | None = None, keep: bool = False) -> None:
        """Finish a request, or drop a prefix whose members are all done; frees its blocks and
        tells its parent, which is dropped in turn when this was its last live member. With `gone`
        (a bulk finish), the request (and any parent dropped with it) is recorded there with the
        status it had instead of being taken out of its queue: the caller then calls `_unlink_all`
        once. Nothing here reads the queues, so deferring that changes no other state. The KV of a request
        that ended as asked ("stop", "length"), and of a prefix whose last member did, is kept findable
        (`_free_blocks`); an aborted one's is not (its last steps may never have run)."""
        keep = keep if request.is_prefix else reason in _KEPT_ENDINGS
        if gone is None:
            self._unlink(request)
        else:
            gone[request.request_id] = (request, request.status)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        self._free_blocks(request, keep)
        self.admission.on_release(request)
        if not request.is_prefix:
            self.admission.relax()
        self._finished_since_last_step.append(request.request_id)  # the runner drops its state
        del self.requests[request.request_id]
        parent = request.parent
        if parent is not None:
            parent.num_live_members -= 1
            if parent.num_live_members == 0:
                self._finish(parent, None, None, gone, keep=keep)

    @contextmanager
    def _finishing_in_bulk(self) -> Iterator[dict[str, tuple[Request, RequestStatus]]]:
        """The `gone` of a bulk finish (`_finish(..., gone)` for each request ended inside the block), whose requests
        leave their queues once, at its end (`_unlink_all`), however it ends: interrupted part-way, those already
        ended would otherwise stay queued, finished and freed, for the next step to run."""
        gone: dict[str, tuple[Request, RequestStatus]] = {}
        try:
            yield gone
        finally:
            self._unlink_all(gone)

    def _unlink_all(self, gone: dict[str, tuple[Request, RequestStatus]]) -> None:
        """Take the finished requests in `gone` (id: (request, its status before it finished)) out of their
        queues, as `_unlink` on each would; the order of what stays is kept. Each queue that can hold one of
        them is filtered once: running work (RUNNING), the READY prefixes (READY), and for the waiting ones
        the queue `_requeue` chose: `waiting` (top level), `ready_members` and their parents'
        `pending_members` (members). So O(len(gone) + the lengths of those queues), a status never seen
        costing nothing (a stop string ending running requests filters `running` alone)."""
        if not gone:
            return
        statuses = {status for _, status in gone.values()}
        waiting = [r for r, status in gone.values() if status is not RequestStatus.RUNNING
                   and status is not RequestStatus.READY]
        if RequestStatus.RUNNING in statuses:
            self.running[:] = [r for r in self.running if r.request_id not in gone]
        if RequestStatus.READY in statuses:
            self.ready_prefixes[:] = [r for r in self.ready_prefixes if r.request_id not in gone]
        queues: list = [self.waiting] if any(r.parent is None for r in waiting) else []
        if any(r.parent is not None for r in waiting):
            queues.append(self.ready_members)
            queues.extend({id(r.parent): r.parent.pending_members for r in waiting if r.parent is not None}.values())
        for queue in queues:
            kept = [r for r in queue if r.request_id not in gone]
            if len(kept) != len(queue):
                queue.clear()
                queue.extend(kept)

    def _unlink(self, request: Request) -> None:
        """Take the request out of whichever queue holds it."""
        if request in self.running:
            self.running.remove(request)
        elif request.status is RequestStatus.READY:
            self.ready_prefixes.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        elif request in self.ready_members:
            self.ready_members.remove(request)
        elif request.parent is not None and request in request.parent.pending_members:
            request.parent.pending_members.remove(request)


def _forget_computed(request: Request) -> None:
    """Its KV freed: it computes from the start again (`Request.num_computed_before_release` keeps how far it got)."""
    request.num_computed_before_release = max(request.num_computed_before_release, request.num_computed_tokens)
    request.num_computed_tokens = 0


def _first_prompt_tokens(request: Request, start: int, num_new: int) -> int:
    """Of a prefill of positions start .. start + num_new - 1, the prompt's positions computed for the first time
    (the others: computed before its KV was freed, or its outputs, which a preempted request computes as prefill)."""
    first = max(start, request.num_computed_before_release)
    return max(0, min(start + num_new, request.num_prompt_tokens) - first)
