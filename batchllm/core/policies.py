"""Scheduling policies: the order of top-level work units and memory-centric admission.

Torch-free. A policy is an object passed in, not an `if` in the scheduler's loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from batchllm.request import Request


@dataclass(frozen=True)
class WorkUnit:
    """A top-level group of the plan (or one ungrouped request), summarised for ordering."""

    first_arrival: int
    prefill_tokens: int
    """Tokens this unit prefills: each shared segment once plus every member's own tokens."""
    expected_decode_tokens: int
    """Sum over members of the expected output length."""


class GroupOrder(Protocol):
    name: str

    def sort_key(self, unit: WorkUnit) -> tuple: ...


class ArrivalOrder:
    """First come, first served (by the earliest prompt of the unit)."""

    name = "fifo"

    def sort_key(self, unit: WorkUnit) -> tuple:
        return (unit.first_arrival,)


class PrefillLengthOrder:
    """BatchLLM's order: priority 1 / (L_prefix + sum L_suffix), highest first, so units with
    little prefill start early and long prefills arrive later to mix with their decodes."""

    name = "prefill"

    def sort_key(self, unit: WorkUnit) -> tuple:
        return (unit.prefill_tokens, unit.first_arrival)


class DecodeWeightedOrder:
    """Priority = expected decode work (members x output length) / prefill tokens, highest first:
    decode-heavy units start early, whatever their size; BatchLLM's key ignores group size."""

    name = "decode"

    def sort_key(self, unit: WorkUnit) -> tuple:
        return (-unit.expected_decode_tokens / max(unit.prefill_tokens, 1), unit.first_arrival)


GROUP_ORDERS: dict[str, type] = {o.name: o for o in (ArrivalOrder, PrefillLengthOrder, DecodeWeightedOrder)}


UNBOUNDED_OUTPUT_ESTIMATE = 512
"""Output tokens planned for a request without max_tokens (admission and ordering alike)."""


def expected_output_tokens(request: Request, max_model_len: int, cap: int = UNBOUNDED_OUTPUT_ESTIMATE) -> int:
    """The output tokens admission still plans for: what max_tokens leaves after the outputs so far (or `cap`
    when unbounded), within the context (`output_budget`)."""
    return output_budget(request.num_tokens, request.sampling_params.max_tokens, request.num_output_tokens,
                         max_model_len, cap)


def kv_tokens_written(total_tokens: int) -> int:
    """KV cache entries a request writes while it grows to `total_tokens` tokens (prompt + outputs): all but the
    last, a sampled token that ends the request without being fed back (a request of prompt P and max_tokens M
    writes at most P + M - 1; the scheduler never computes a token bound to be the last, even on a placeholder:
    `scheduler._waits_for_pending_token`). The context limit stays vLLM's: P + M <= max_model_len."""
    return total_tokens - 1


def output_budget(num_tokens: int, max_tokens: int | None, num_output_tokens: int, max_model_len: int,
                  cap: int = UNBOUNDED_OUTPUT_ESTIMATE) -> int:
    """Output tokens still planned for a sequence of `num_tokens` tokens (of which `num_output_tokens`
    are output): what max_tokens leaves (or `cap` when unbounded), within the context."""
    wanted = cap if max_tokens is None else max_tokens - num_output_tokens
    return max(0, min(max_model_len - num_tokens, wanted))


class MemoryAdmission:
    """Admit while the projected KV footprint of everything admitted fits `threshold` x the pool.

    A request's projection: the blocks of its table for its tokens and its expected output, less the
    full blocks it shares with its prefix (a copy-on-write copy of the prefix's partial block is one of its
    own); a shared prefix counts once. A
    prefix is admitted with its whole group (every member and nested group is charged then, and
    admitted later without a second check, but for a nested prefix while the charged total is over
    the budget: `can_open_subgroup`). Each request's share is released when it finishes or is
    preempted, and a prefix's when it is released. Work is always admitted when nothing is running,
    so the batch moves.
    """

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, threshold: float = 1.0,
                 unbounded_output_estimate: int = UNBOUNDED_OUTPUT_ESTIMATE) -> None:
        self.capacity = threshold * num_blocks
        self._loose_capacity, self._num_blocks = self.capacity, num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.unbounded_output_estimate = unbounded_output_estimate
        self.projected_blocks = 0

    def tighten(self) -> None:
        """Admit into the pool itself (threshold 1) until `relax`: the scheduler's release of idle prefixes, a
        step where nothing could run, found the pool over-committed (above a threshold over 1, nested groups
        opened together can fill it with READY prefixes whose members cannot start, released and reopened the
        same way forever)."""
        self.capacity = min(self._loose_capacity, self._num_blocks)

    def relax(self) -> None:
        """Back to the threshold's capacity: a request finished, the batch moves."""
        self.capacity = self._loose_capacity

    def projection(self, request: Request) -> int:
        """Blocks the request holds at most beside its prefixes: its table for the tokens it writes (a prefix: its
        tokens; a request: its tokens and expected output but the last output token, never written:
        `kv_tokens_written`) less the full blocks it shares with its parent. Its copy of the parent's partial last
        block is one of those table blocks (it held one more here, +1 on top, charged twice)."""
        end = request.num_tokens
        if not request.is_prefix:
            expected = expected_output_tokens(request, self.max_model_len, self.unbounded_output_estimate)
            end = kv_tokens_written(end + expected) if expected else end
        return -(-end // self.block_size) - request.fork_point // self.block_size

    def can_admit(self, request: Request, nothing_running: bool) -> bool:
        if nothing_running or request.projected_blocks > 0:  # nothing to wait for, or charged already
            return True
        return self.projected_blocks + sum(self.projection(r) for r in self._uncharged_group(request)) <= self.capacity

    def on_admit(self, request: Request) -> None:
        """Charge the request and, for a prefix, its whole group: members and nested groups that
        are not charged yet. A group starts only when all of it is projected to fit, so a prefix
        never holds memory its members cannot follow it into (when the pool held many READY
        prefixes whose members could not fit, they were released and recomputed over and over)."""
        for r in self._uncharged_group(request):
            r.projected_blocks = self.projection(r)
            self.projected_blocks += r.projected_blocks

    def group_blocks(self, request: Request) -> int:
        """The projection of a request and, for a prefix, of its members and nested groups not started
        yet (`pending_members`): its charge where it has one, else what it would be charged."""
        total, stack = 0, [request]
        while stack:
            r = stack.pop()
            total += r.projected_blocks or self.projection(r)
            stack.extend(r.pending_members)
        return total

    def can_open_subgroup(self, prefix: Request, open_blocks: Callable[[], int], nothing_running: bool) -> bool:
        """Whether a nested prefix, charged with the group it belongs to, may start now. While the charged
        total fits, always: a group that fits starts its nested groups as soon as they are ready. Over it (a
        group larger than the pool, admitted because nothing ran), only when nothing runs or its own group
        fits beside the open work: the running requests and READY prefixes, each with the members it has
        not started (`group_blocks`). So such a group is worked a few nested groups at a time, at least one
        (siblings started together outgrew the pool, were released and recomputed). It never stalls the
        batch: what runs ends or is preempted, and a step where nothing can run releases the idle READY
        prefixes (`Scheduler.schedule`), after which nothing runs and the prefix starts. open_blocks: the
        open work's `open_blocks`, called only over the budget (the caller keeps it across an admission loop)."""
        if nothing_running or self.projected_blocks <= self.capacity:
            return True
        return open_blocks() + self.group_blocks(prefix) <= self.capacity

    def open_blocks(self, open_work: Iterable[Request]) -> int:
        """The sum of `group_blocks` over `open_work`, walking only the entries with members not started: the
        others (every running member: almost all of the open work) are their own charge (`group_blocks` of an
        entry without pending members, inlined). Called once a step in a group larger than the pool; its
        `group_blocks` calls, one a running request, were 5% of a 50k-line job's main thread."""
        total = 0
        group_blocks, projection = self.group_blocks, self.projection
        for r in open_work:
            if r.pending_members:
                total += group_blocks(r)
            else:
                total += r.projected_blocks or projection(r)
        return total

    @staticmethod
    def _uncharged_group(request: Request) -> list[Request]:
        group, stack = [], [request]
        while stack:
            r = stack.pop()
            if r.projected_blocks == 0:
                group.append(r)
            stack.extend(r.pending_members)
        return group

    def on_release(self, request: Request) -> None:
        self.projected_blocks -= request.projected_blocks
        request.projected_blocks = 0
