"""Split one global prefix plan over data-parallel ranks. Torch-free; written by nobody after it is built.

The parent plans prefix sharing over the whole batch once, then gives each rank whole prefix groups
(a shared prefix is prefilled once in the whole job, not once per rank), balanced by estimated cost:

    cost(shard) = prefill_weight * (prefill tokens) + decode_weight * (expected output tokens)

where a shard's prefill tokens count each shared segment it touches once plus every member's own
suffix. Placement is longest-processing-time first: shards by decreasing cost, each to the least
loaded rank (within 4/3 of the optimum when nothing is split). A group costing more than
(1 + imbalance) x the per-rank share is split into contiguous member chunks (tree order, so nested
groups stay together as far as possible); each extra chunk prefills the prefix again, which the
partition counts in `duplicated_prefill_tokens`. The cheapest shards, up to `tail_fraction` of the
total cost, are not pinned: they form a queue that idle ranks pull from, so ranks finish together
even when real outputs end before max_tokens.

Where the engines kept KV from an earlier call (`held`: `kept_placement.py`'s estimate of the tokens each rank
holds of each prompt), a shard's cost on a rank is less by the prefill that rank need not compute. Each shard first
goes to the rank holding most of it (`_place_by_held`); a rank then loaded past an equal share gives up the shards
whose move loses the least saving per cost moved until it is within it, and those and the shards no rank holds are
placed as above (LPT), each to the rank where the load after it is least. (Placed one by one, LPT alone sent a
shard away from its rank whenever the shards before it in cost order happened to hold the same rank, though later
ones would balance it.) A rank asking for a tail shard takes the largest whose tokens it holds the most of, before
the largest left.

Invariants (tested): every prompt is in exactly one shard; shards of one rank never repeat; the
result depends only on the plan, the expected outputs and the settings (deterministic).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from batchllm.prefix.plan import PrefixPlan

DEFAULT_PREFILL_WEIGHT = 1.0
DEFAULT_DECODE_WEIGHT = 4.0
"""A decode token costs about four prefill tokens of GPU time in our H200 runs of the Llama-3.1-8B
shape (prefill ~45-50k tokens/s at 8,192-token steps; decode of the 2000/200 workloads ~11-13k
tokens/s once the batch is decode-bound): a calibration, not a law; it only needs to rank work."""


@dataclass(frozen=True)
class Shard:
    """Prompts that run on one rank together (a whole group, a chunk of one, or one plain prompt)."""

    prompts: tuple[int, ...]
    """Prompt indices of the plan, in prefix-tree order."""
    prefill_tokens: int
    """Tokens this shard prefills: each shared segment it touches once plus every member's suffix."""
    decode_tokens: int
    """Expected output tokens of its prompts."""
    cost: float
    held: tuple[tuple[int, int], ...] = ()
    """(rank, tokens of `prefill_tokens` that rank holds from an earlier call), for each rank holding any."""

    def largest_first(self) -> tuple[float, int]:
        """Sort key: costliest first, ties by first prompt (deterministic)."""
        return -self.cost, self.prompts[0]

    def cost_on(self, rank: int, prefill_weight: float) -> float:
        """The shard's cost on `rank`: less the prefill it holds there."""
        return self.cost - prefill_weight * dict(self.held).get(rank, 0)

    @property
    def preferred_rank(self) -> int | None:
        """The rank holding most of its prefill (the lowest of equals), or None where none holds any."""
        return min(self.held, key=lambda rt: (-rt[1], rt[0]))[0] if self.held else None


@dataclass
class Partition:
    pinned: list[list[Shard]]
    """Per rank, the shards it runs from the start (largest first)."""
    queue: list[Shard]
    """Shards any idle rank pulls, largest first (`TailQueue`)."""
    duplicated_prefill_tokens: int = 0
    """Prefill tokens computed more than once in the job because a group was split across shards."""
    num_split_groups: int = 0
    loads: list[float] = field(default_factory=list)
    """Pinned cost per rank (each shard's `cost_on` it)."""
    placed_on_held_tokens: int = 0
    """Of the pinned shards' prefill, the tokens their ranks hold from an earlier call (by the estimate)."""


def partition_plan(plan: PrefixPlan, expected_output: Sequence[int], num_ranks: int, *,
                   prefill_weight: float = DEFAULT_PREFILL_WEIGHT, decode_weight: float = DEFAULT_DECODE_WEIGHT,
                   imbalance: float = 0.10, tail_fraction: float = 0.10,
                   held: Sequence[dict[int, int]] | None = None) -> Partition:
    """Partition the plan's prompts over `num_ranks` ranks (see the module docstring).

    expected_output[i]: the output length planned for prompt i (max_tokens, or an estimate). held[i]: {rank:
    leading tokens of prompt i that rank holds from an earlier call} (`KeptPlacement.tokens_held`); None: none."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if len(expected_output) != plan.num_requests:
        raise ValueError(f"{len(expected_output)} expected outputs for {plan.num_requests} prompts")
    segments = _Segments(plan)

    def make_shard(prompts: Sequence[int]) -> Shard:
        prefill = segments.prefill_tokens(prompts)
        decode = int(sum(expected_output[p] for p in prompts))
        kept = segments.held_tokens(prompts, held) if held is not None else ()
        return Shard(tuple(prompts), prefill, decode, prefill_weight * prefill + decode_weight * decode, kept)

    units = [make_shard(segments.tree_order(g.group_id)) for g in plan.top_level_groups]
    units += [make_shard([p]) for p in plan.ungrouped]
    total = sum(u.cost for u in units)
    limit = (1.0 + imbalance) * total / num_ranks
    shards: list[Shard] = []
    num_split = 0
    for unit in units:
        if num_ranks > 1 and unit.cost > limit and len(unit.prompts) > 1:
            chunks = _split(unit, math.ceil(unit.cost / (total / num_ranks)), make_shard,
                            lambda p: prefill_weight * segments.own_tokens(p) + decode_weight * expected_output[p])
            num_split += len(chunks) > 1
            shards.extend(chunks)
        else:
            shards.append(unit)
    shards.sort(key=Shard.largest_first)
    queue = _tail(shards, tail_fraction) if num_ranks > 1 else []
    pinned_shards = shards[: len(shards) - len(queue)]
    if any(s.held for s in pinned_shards):
        pinned, loads = _place_by_held(pinned_shards, num_ranks, prefill_weight)
    else:
        pinned, loads = _place_longest_first(pinned_shards, num_ranks, prefill_weight)
    duplicated = sum(s.prefill_tokens for s in shards) - plan.prefill_tokens
    on_held = sum(dict(s.held).get(rank, 0) for rank, shards_of in enumerate(pinned) for s in shards_of)
    return Partition(pinned, queue, duplicated, num_split, loads, on_held)


def _split(unit: Shard, num_chunks: int, make_shard, member_cost) -> list[Shard]:
    """Cut a unit's prompts (tree order) into at most `num_chunks` contiguous chunks of about equal
    member cost."""
    num_chunks = max(1, min(num_chunks, len(unit.prompts)))
    costs = [member_cost(p) for p in unit.prompts]
    target = sum(costs) / num_chunks
    chunks: list[list[int]] = [[]]
    running = 0.0
    for p, c in zip(unit.prompts, costs):
        if chunks[-1] and running + c / 2 > target * len(chunks) and len(chunks) < num_chunks:
            chunks.append([])
        chunks[-1].append(p)
        running += c
    return [make_shard(chunk) for chunk in chunks]


def _tail(shards: list[Shard], fraction: float) -> list[Shard]:
    """The cheapest shards (a suffix of the cost-sorted list) whose total stays within `fraction`
    of the whole: they are pulled by whichever rank is idle first. Largest first."""
    budget = fraction * sum(s.cost for s in shards)
    taken, spent = 0, 0.0
    for shard in reversed(shards):
        if spent + shard.cost > budget or taken + 1 >= len(shards):
            break
        spent += shard.cost
        taken += 1
    return shards[len(shards) - taken:] if taken else []


def _place_by_held(shards: list[Shard], num_ranks: int,
                   prefill_weight: float) -> tuple[list[list[Shard]], list[float]]:
    """Each shard to the rank holding most of it, those of a rank loaded past an equal share of the total given up
    (least saving lost per cost moved first) until it is within it, then the given-up and unheld shards by
    `_place_longest_first` over the loads so far. Each rank's shards largest first."""
    pinned: list[list[Shard]] = [[] for _ in range(num_ranks)]
    loads = [0.0] * num_ranks
    rest = []
    for shard in shards:
        rank = shard.preferred_rank
        if rank is None:
            rest.append(shard)
        else:
            pinned[rank].append(shard)
            loads[rank] += shard.cost_on(rank, prefill_weight)
    share = (sum(loads) + sum(s.cost for s in rest)) / num_ranks
    for rank, own in enumerate(pinned):
        if loads[rank] <= share:
            continue
        # a move loses the prefill the rank holds; per unit of load it takes off this rank, least first
        own.sort(key=lambda s: ((s.cost - s.cost_on(rank, prefill_weight)) / max(s.cost_on(rank, prefill_weight),
                                                                                  1e-9), s.prompts[0]))
        while loads[rank] > share and len(own) > 1:
            shard = own.pop(0)
            loads[rank] -= shard.cost_on(rank, prefill_weight)
            rest.append(shard)
    rest.sort(key=Shard.largest_first)
    _place_longest_first(rest, num_ranks, prefill_weight, pinned, loads)
    for own in pinned:
        own.sort(key=Shard.largest_first)
    return pinned, loads


def _place_longest_first(shards: list[Shard], num_ranks: int, prefill_weight: float,
                         pinned: list[list[Shard]] | None = None,
                         loads: list[float] | None = None) -> tuple[list[list[Shard]], list[float]]:
    """LPT: each shard (already sorted by decreasing cost) to the rank whose load after it is least (ties to the
    lowest rank): the least loaded rank, or one holding some of its prefill (`Shard.cost_on`). Without held
    tokens, plain LPT. pinned/loads: the ranks' shards and loads so far (updated; None: empty). The heap may hold
    stale entries of a rank (its load grew since): skipped when on top."""
    pinned = pinned if pinned is not None else [[] for _ in range(num_ranks)]
    loads = loads if loads is not None else [0.0] * num_ranks
    heap = [(load, rank) for rank, load in enumerate(loads)]
    heapq.heapify(heap)
    for shard in shards:
        while heap[0][0] != loads[heap[0][1]]:
            heapq.heappop(heap)
        least = heap[0][1]
        rank = min([least] + [r for r, _ in shard.held],
                   key=lambda r: (loads[r] + shard.cost_on(r, prefill_weight), r))
        pinned[rank].append(shard)
        loads[rank] += shard.cost_on(rank, prefill_weight)
        heapq.heappush(heap, (loads[rank], rank))
    return pinned, loads


class TailQueue:
    """The unpinned shards, largest first. A rank asking for one takes the largest left whose prefill it holds the
    most of (`Shard.preferred_rank`), else the largest left; each is taken once."""

    def __init__(self, shards: Sequence[Shard]) -> None:
        self._shards = list(shards)
        self._order = deque(range(len(self._shards)))
        self._preferring: dict[int, deque[int]] = {}
        for i, shard in enumerate(self._shards):
            if shard.preferred_rank is not None:
                self._preferring.setdefault(shard.preferred_rank, deque()).append(i)
        self._taken: set[int] = set()

    def __len__(self) -> int:
        return len(self._shards) - len(self._taken)

    def pop(self, rank: int) -> Shard | None:
        """The next shard for `rank`, or None where none is left."""
        for queue in (self._preferring.get(rank, ()), self._order):
            while queue:
                i = queue.popleft()
                if i not in self._taken:
                    self._taken.add(i)
                    return self._shards[i]
        return None


class _Segments:
    """Each prompt's chain of groups and each group's own segment (its prefix past its parent's)."""

    def __init__(self, plan: PrefixPlan) -> None:
        self.plan = plan
        self.deepest: dict[int, int] = {p: g.group_id for g in plan.groups for p in g.prompts}

    def segment(self, group_id: int) -> int:
        group = self.plan.groups[group_id]
        base = self.plan.groups[group.parent].prefix_len if group.parent is not None else 0
        return group.prefix_len - base

    def chain(self, prompt: int) -> list[int]:
        out, g = [], self.deepest.get(prompt)
        while g is not None:
            out.append(g)
            g = self.plan.groups[g].parent
        return out

    def own_tokens(self, prompt: int) -> int:
        """Tokens of the prompt past its deepest group's prefix."""
        g = self.deepest.get(prompt)
        return self.plan.prompt_lengths[prompt] - (self.plan.groups[g].prefix_len if g is not None else 0)

    def prefill_tokens(self, prompts: Sequence[int]) -> int:
        touched = {g for p in prompts for g in self.chain(p)}
        return sum(self.segment(g) for g in touched) + sum(self.own_tokens(p) for p in prompts)

    def held_tokens(self, prompts: Sequence[int], held: Sequence[dict[int, int]]) -> tuple[tuple[int, int], ...]:
        """(rank, tokens of `prefill_tokens(prompts)` it holds) per rank holding any: of each shared segment, the
        longest run into it of any prompt under it, and of each prompt's own tokens, what its run reaches into them
        (held[p]: {rank: leading tokens of prompt p held there})."""
        own: dict[int, int] = {}
        in_segment: dict[tuple[int, int], int] = {}
        for p in prompts:
            if not held[p]:
                continue
            chain = self.chain(p)
            start = self.plan.groups[chain[0]].prefix_len if chain else 0
            for rank, tokens in held[p].items():
                own[rank] = own.get(rank, 0) + min(max(tokens - start, 0), self.plan.prompt_lengths[p] - start)
                for g in chain:
                    base = self.plan.groups[g].prefix_len - self.segment(g)
                    covered = min(max(tokens - base, 0), self.segment(g))
                    in_segment[rank, g] = max(in_segment.get((rank, g), 0), covered)
        for (rank, _), tokens in in_segment.items():
            own[rank] = own.get(rank, 0) + tokens
        return tuple(sorted((rank, tokens) for rank, tokens in own.items() if tokens))

    def tree_order(self, group_id: int) -> list[int]:
        """The group's prompts, its own first, then each nested group's, depth first."""
        out, stack = [], [group_id]
        while stack:
            group = self.plan.groups[stack.pop()]
            out.extend(group.prompts)
            stack.extend(reversed(group.children))
        return out
