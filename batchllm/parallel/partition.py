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

Invariants (tested): every prompt is in exactly one shard; shards of one rank never repeat; the
result depends only on the plan, the expected outputs and the settings (deterministic).
"""

from __future__ import annotations

import heapq
import math
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


@dataclass
class Partition:
    pinned: list[list[Shard]]
    """Per rank, the shards it runs from the start (largest first)."""
    queue: list[Shard]
    """Shards any idle rank pulls, largest first."""
    duplicated_prefill_tokens: int = 0
    """Prefill tokens computed more than once in the job because a group was split across shards."""
    num_split_groups: int = 0
    loads: list[float] = field(default_factory=list)
    """Pinned cost per rank."""


def partition_plan(plan: PrefixPlan, expected_output: Sequence[int], num_ranks: int, *,
                   prefill_weight: float = DEFAULT_PREFILL_WEIGHT, decode_weight: float = DEFAULT_DECODE_WEIGHT,
                   imbalance: float = 0.10, tail_fraction: float = 0.10) -> Partition:
    """Partition the plan's prompts over `num_ranks` ranks (see the module docstring).

    expected_output[i]: the output length planned for prompt i (max_tokens, or an estimate)."""
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
    if len(expected_output) != plan.num_requests:
        raise ValueError(f"{len(expected_output)} expected outputs for {plan.num_requests} prompts")
    segments = _Segments(plan)

    def make_shard(prompts: Sequence[int]) -> Shard:
        prefill = segments.prefill_tokens(prompts)
        decode = int(sum(expected_output[p] for p in prompts))
        return Shard(tuple(prompts), prefill, decode, prefill_weight * prefill + decode_weight * decode)

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
    shards.sort(key=lambda s: (-s.cost, s.prompts[0]))
    queue = _tail(shards, tail_fraction) if num_ranks > 1 else []
    pinned, loads = _place_longest_first(shards[: len(shards) - len(queue)], num_ranks)
    duplicated = sum(s.prefill_tokens for s in shards) - plan.prefill_tokens
    return Partition(pinned, queue, duplicated, num_split, loads)


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


def _place_longest_first(shards: list[Shard], num_ranks: int) -> tuple[list[list[Shard]], list[float]]:
    """LPT: each shard (already sorted by decreasing cost) to the least loaded rank, ties to the
    lowest rank."""
    heap = [(0.0, rank) for rank in range(num_ranks)]
    pinned: list[list[Shard]] = [[] for _ in range(num_ranks)]
    loads = [0.0] * num_ranks
    for shard in shards:
        load, rank = heapq.heappop(heap)
        pinned[rank].append(shard)
        loads[rank] = load + shard.cost
        heapq.heappush(heap, (loads[rank], rank))
    return pinned, loads


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

    def tree_order(self, group_id: int) -> list[int]:
        """The group's prompts, its own first, then each nested group's, depth first."""
        out, stack = [], [group_id]
        while stack:
            group = self.plan.groups[stack.pop()]
            out.extend(group.prompts)
            stack.extend(reversed(group.children))
        return out
