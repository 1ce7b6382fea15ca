"""Scheduling policies: the order of top-level work units and memory-centric admission.

Torch-free. A policy is an object passed in, not an `if` in the scheduler's loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from batchllm.request import Request


@dataclass(frozen=True)
class WorkUnit:
    """A top-level group of the plan (or one ungrouped request), summarised for ordering."""

    first_arrival: int
    prefill_tokens: int
    """Tokens this unit prefills: each shared segment once plus every member's own tokens."""
    num_requests: int
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

MEMBER_LOOKAHEAD = 0.4
"""Over budget, a member starts when the pool holds it and the running work through this fraction of its planned
steps (`MemoryAdmission.fits_ahead`); past that it may be preempted. Chosen by measurement (tiny model, CPU, 48
outputs, fake runner; 16 documents of six questions in 48 blocks, 64 in 40): unchecked, 1,625 and 12,608 steps,
35 and 272 preemptions, 1,579 and 11,414 tokens recomputed; 0.4, 1,558 and 12,536 steps, 19 and 139 preemptions,
1,001 and 7,227 recomputed; 1.0 (worst case), none, but 1,591 and 14,037 steps (members ran in waves); 0.5 ran 3%
more steps on the second."""


def expected_output_tokens(request: Request, max_model_len: int, cap: int = UNBOUNDED_OUTPUT_ESTIMATE) -> int:
    """The output length admission plans for: max_tokens, or at most `cap` when unbounded."""
    return output_budget(request.num_tokens, request.sampling_params.max_tokens, request.num_output_tokens,
                         max_model_len, cap)


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
    admitted later without a second check while the charged total fits; over it, where the pool holds
    it ahead: `fits_ahead`). Each request's share is released when it finishes or is
    preempted, and a prefix's when it is released. Work is always admitted when nothing is running,
    so the batch moves.
    """

    def __init__(self, num_blocks: int, block_size: int, max_model_len: int, threshold: float = 1.0,
                 unbounded_output_estimate: int = UNBOUNDED_OUTPUT_ESTIMATE) -> None:
        self.capacity = threshold * num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.unbounded_output_estimate = unbounded_output_estimate
        self.projected_blocks = 0

    def projection(self, request: Request) -> int:
        """Blocks the request holds at most beside its prefixes: its table for its tokens (and, but for a prefix,
        its expected output) less the full blocks it shares with its parent. Its copy of the parent's partial last
        block is one of those table blocks (it held one more here, +1 on top, charged twice)."""
        end = request.num_tokens
        if not request.is_prefix:
            end += expected_output_tokens(request, self.max_model_len, self.unbounded_output_estimate)
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

    @property
    def over_budget(self) -> bool:
        """The charged total is over the budget: a group larger than the pool was admitted (nothing ran)."""
        return self.projected_blocks > self.capacity

    def planned_steps(self, request: Request) -> int:
        """Steps a started request still runs, as planned: the outputs left to it (max_tokens or the context, at
        most the unbounded estimate without max_tokens), its pending ones counted as made."""
        outputs = request.max_output_tokens
        if request.sampling_params.max_tokens is None:
            outputs = min(outputs, self.unbounded_output_estimate)
        return max(0, request.num_prompt_tokens + outputs - request.num_tokens)

    def fits_ahead(self, candidate: Request | None, running: Iterable[Request], table_len, free_blocks: int,
                   reserve: int = 0, lookahead: float = MEMBER_LOOKAHEAD) -> bool:
        """Whether `candidate` (a member about to fork, or None) can start beside `running` and `reserve` more
        blocks without the pool running out within `lookahead` x its planned steps. Each running request grows one
        token a step to its planned end (`planned_steps`) and frees its own blocks (its table, `table_len`, less
        the full blocks it shares with its prefix) one step later (its last token is collected in the next step);
        a running prefix grows to its prompt and stays. The pool's use peaks just before a release, so it is
        checked there and at the horizon: O(running x releases within the horizon). Used only over budget."""
        bs, free, plans = self.block_size, free_blocks - reserve, []
        for r in running:
            shared, table = r.fork_point // bs, table_len(r)
            if r.is_prefix:
                free -= -(-r.num_prompt_tokens // bs) - table
            else:
                plans.append((r.num_tokens, self.planned_steps(r), shared, table - shared))
        horizon = 0
        if candidate is not None:
            steps = self.planned_steps(candidate)
            plans.append((candidate.num_tokens, steps, candidate.fork_point // bs, 0))
            horizon = int(lookahead * steps)
        for k in sorted({left for _, left, _, _ in plans if left <= horizon} | {0, horizon}):
            extra = 0  # blocks the running requests (and the candidate) hold at step k beyond what they hold now
            for tokens, left, shared, held in plans:
                if left >= k:
                    extra += max(0, -(-(tokens + min(k, left - 1)) // bs) - shared - held)
                else:
                    extra -= held
            if extra > free:
                return False
        return True

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
