"""Prefix-sharing plans: which prompts share which prefix, chosen over the whole batch before running.

A plan is a forest of groups. A group owns a shared prefix (the first `prefix_len` tokens of each
of its member prompts), computed once; its members are prompts and, in a multi-level plan, nested
groups whose longer prefix extends it. Every prompt belongs to exactly one group or to none.

Both planners solve an exact dynamic program over the radix tree. Opening node v (making its
prefix a group) makes every prompt whose deepest open ancestor is v skip d_v tokens; the cost of
opening v is
  single-level (BatchLLM): d_v              (the whole prefix is computed again for every group)
  multi-level:             d_v - d_a        (only the segment past the enclosing group a)
plus `group_overhead_tokens` (an integer >= 0; `check_group_overhead`). With g_v(a) = the best saving in v's
subtree given that the nearest open ancestor has depth a:
  g_v(a) = max( sum_c g_c(a) + k_v * a,                      # v closed
                sum_c g_c(d_v) + k_v * d_v - cost_v(a) )     # v open
where k_v counts prompts directly under v. BatchLLM's "first-level prefix enlargement" is the
greedy form of the single-level case (fork g out of c when (leaves(g) - 1) * len(g) > len(c)); the
DP finds the optimum of the same objective. The multi-level plan is never worse than the
single-level one, since the single-level plan's groups cost at least as much there.
g_v is convex and the open branch wins exactly on the ancestor depths below a threshold (`_solve`), so
each g_v is kept as a piecewise-linear function rather than a value per ancestor depth: deep nesting
(one request per turn of a long conversation) plans in O(n log^2 n), not O(n * depth).

Prompts are planned without their last token: a member must compute at least one token of its
own to produce logits, so a prefix never covers a whole prompt.
"""

from __future__ import annotations

import heapq
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from batchllm.prefix.radix import RadixTree, build_radix_tree

SINGLE_LEVEL = "single"
MULTI_LEVEL = "multi"
PLAN_MODES = (SINGLE_LEVEL, MULTI_LEVEL)


@dataclass
class PrefixGroup:
    group_id: int
    prefix_len: int
    parent: int | None
    """Enclosing group (multi-level plans); its prefix is a prefix of this one."""
    prompts: list[int] = field(default_factory=list)
    """Prompt indices whose deepest group this is."""
    children: list[int] = field(default_factory=list)
    """Nested groups."""


@dataclass
class PrefixPlan:
    mode: str
    groups: list[PrefixGroup]
    ungrouped: list[int]
    """Prompts that share nothing worth sharing: they run as plain requests."""
    prompt_lengths: list[int]

    @classmethod
    def without_sharing(cls, prompt_lengths: list[int], mode: str = MULTI_LEVEL) -> PrefixPlan:
        """Every prompt on its own (prefix sharing off)."""
        return cls(mode, [], list(range(len(prompt_lengths))), list(prompt_lengths))

    @property
    def num_requests(self) -> int:
        return len(self.prompt_lengths)

    @property
    def top_level_groups(self) -> list[PrefixGroup]:
        return [g for g in self.groups if g.parent is None]

    def prompts_under(self, group_id: int) -> list[int]:
        out, stack = [], [group_id]
        while stack:
            g = self.groups[stack.pop()]
            out.extend(g.prompts)
            stack.extend(g.children)
        return out

    @property
    def prompt_tokens(self) -> int:
        """The members' prompt tokens (a request of n completions is n members): the prefill without sharing."""
        return int(sum(self.prompt_lengths))

    def own_prefix_len(self, group: PrefixGroup) -> int:
        """The tokens of `group`'s prefix past its enclosing group's: what it computes once for its members."""
        return group.prefix_len - (self.groups[group.parent].prefix_len if group.parent is not None else 0)

    @property
    def prefill_tokens(self) -> int:
        """Tokens the engine computes in prefill when it follows this plan."""
        total = 0
        for g in self.groups:
            total += self.own_prefix_len(g)
            total += sum(self.prompt_lengths[p] - g.prefix_len for p in g.prompts)
        total += sum(self.prompt_lengths[p] for p in self.ungrouped)
        return total

    @property
    def saving_ratio(self) -> float:
        return 1.0 - self.prefill_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def sharing_degrees(self) -> list[int]:
        """Requests served by each top-level group, and 1 for each ungrouped request."""
        return [len(self.prompts_under(g.group_id)) for g in self.top_level_groups] + [1] * len(self.ungrouped)

    def with_prefixes_cut_to_blocks(self, group_ids: set[int], block_size: int) -> PrefixPlan:
        """This plan with the prefixes of `group_ids` cut back to their last block boundary, so that a member
        under only such prefixes shares every block of theirs and copies none (`Scheduler.kv_blocks_needed`).
        A cut group that no longer extends its enclosing group (or, top-level, is empty) is dissolved into it:
        its prompts and nested groups move up. Every member of a cut group computes at most block_size - 1
        tokens more; nothing else changes. Groups are renumbered, parents before their nested groups."""
        groups: list[PrefixGroup] = []
        ungrouped = list(self.ungrouped)
        stack: list[tuple[int, int | None]] = [(g.group_id, None) for g in reversed(self.top_level_groups)]
        while stack:
            old_id, parent = stack.pop()
            old = self.groups[old_id]
            length = old.prefix_len - (old.prefix_len % block_size if old_id in group_ids else 0)
            if length > (groups[parent].prefix_len if parent is not None else 0):
                groups.append(PrefixGroup(len(groups), length, parent))
                if parent is not None:
                    groups[parent].children.append(len(groups) - 1)
                parent = len(groups) - 1
            (groups[parent].prompts if parent is not None else ungrouped).extend(old.prompts)
            stack.extend((child, parent) for child in reversed(old.children))
        return PrefixPlan(self.mode, groups, sorted(ungrouped), self.prompt_lengths)

    def summary(self, request_lengths: Sequence[int] | None = None) -> dict:
        """The plan in numbers. `request_lengths`: the requests' prompt lengths where a request's n completions are
        n members of the plan (None: each member is a request). num_requests and prompt_tokens count each request
        once, as vLLM's usage counts a prompt once whatever its n; num_completions and completion_prompt_tokens
        count the members (a prompt n times: the prefill without sharing), and saving_ratio is 1 - prefill_tokens /
        completion_prompt_tokens, what sharing saves (the sharing degrees are the members' too)."""
        degrees = self.sharing_degrees()
        lengths = self.prompt_lengths if request_lengths is None else request_lengths
        return {
            "plan_mode": self.mode,
            "num_requests": len(lengths),
            "num_completions": self.num_requests,
            "num_groups": len(self.top_level_groups),
            "num_nested_groups": len(self.groups) - len(self.top_level_groups),
            "num_ungrouped": len(self.ungrouped),
            "mean_sharing_degree": self.num_requests / len(degrees) if degrees else 0.0,
            "max_sharing_degree": max(degrees, default=0),
            "prompt_tokens": int(sum(lengths)),
            "completion_prompt_tokens": self.prompt_tokens,
            "prefill_tokens": self.prefill_tokens,
            "saving_ratio": self.saving_ratio,
        }


def plan_prefix_sharing(
    prompts: Sequence[Sequence[int] | np.ndarray], mode: str = MULTI_LEVEL, group_overhead_tokens: int = 0,
    share: bool = True,
) -> PrefixPlan:
    """The prefix-sharing plan of the whole batch; with `share` off (the engine's prefix_sharing
    option), every prompt on its own. group_overhead_tokens: what opening a group costs on top of its
    prefix tokens (`check_group_overhead`)."""
    if mode not in PLAN_MODES:
        raise ValueError(f"plan mode must be one of {PLAN_MODES}, got {mode!r}")
    check_group_overhead(group_overhead_tokens)
    lengths = [len(p) for p in prompts]
    if not share:
        return PrefixPlan.without_sharing(lengths, mode)
    if any(n == 0 for n in lengths):
        raise ValueError("cannot plan an empty prompt")
    tree = build_radix_tree([p[:-1] for p in prompts])
    open_nodes = _solve(tree, mode, int(group_overhead_tokens))
    return _extract(tree, open_nodes, mode, lengths)


def check_group_overhead(tokens: object) -> None:
    """group_overhead_tokens must be an integer >= 0. It is a cost per group in prefill tokens: a positive one
    keeps groups that save fewer tokens than it closed. A negative one would be a bonus per group: it opens
    groups that make the batch compute more prefill tokens (a single-level group nested where its members
    already share all but a few of its tokens) and models no cost, so it is refused; `_solve` itself stays
    exact for any integer. Not an integer: the solver's breakpoints would not be integers (a float) or it
    fails far from the cause (None, a string)."""
    if not isinstance(tokens, numbers.Integral) or isinstance(tokens, bool):
        raise TypeError(f"group_overhead_tokens must be an integer >= 0, got {tokens!r}")
    if tokens < 0:
        raise ValueError(f"group_overhead_tokens must be >= 0 (a cost per group in prefill tokens), got {tokens!r}")


def _solve(tree: RadixTree, mode: str, overhead: int) -> dict[int, int]:
    """Return, for each node worth opening somewhere, its threshold t >= 1: opening it is optimal exactly when
    the depth `a` of its nearest open ancestor is below t (a node opened nowhere is absent).

    Why a threshold: g_v(a) = max(C_v(a), L_v(a)) with C_v(a) = sum_c g_c(a) + k_v * a (v closed) and
    L_v(a) = C_v(d_v) - d_v - overhead + p * a (v open; p = 0 single-level, 1 multi-level). By induction
    every g is convex on the integers with slopes >= p (C_v's slope is k_v plus its children's, and v holds
    a prompt directly or in a child), so C_v - L_v is nondecreasing: L_v > C_v (open; a tie stays closed)
    holds on the depths below some t. g_v is kept as a `_Gain` on [0, depth of v's parent], the depths
    its ancestors have; a node's children's gains are summed smaller into larger. Each node adds at most
    two breakpoints, each removed once: O(n log^2 n) for n nodes, whatever the nesting depth (evaluating
    every ancestor depth of every node, as before, took O(n * depth) time and memory)."""
    depth, children, parent = tree.depth, tree.children, tree.parent
    postorder, stack = [], [0]
    while stack:
        v = stack.pop()
        postorder.append(v)
        stack.extend(children[v])
    postorder.reverse()
    slope_of_line = 0 if mode == SINGLE_LEVEL else 1  # opened(a) = C_v(d_v) - d_v - overhead + slope * a
    weights: list[int] = []
    gains: list[_Gain | None] = [None] * tree.num_nodes
    thresholds: dict[int, int] = {}
    for v in postorder:
        if v == 0:
            continue
        kids = [gains[c] for c in children[v]]
        f = max(kids, key=_Gain.size) if kids else _Gain()
        for c in kids:
            if c is not f:
                f.absorb(c, weights)
        for c in children[v]:
            gains[c] = None  # no longer needed: keep memory flat
        f.s0 += tree.num_prompts_under(v) - sum(tree.num_prompts_under(c) for c in children[v])
        d, top = depth[v], depth[parent[v]]
        line = f.value_at(d) - d - overhead
        f.drop_above(top, weights)
        t = f.raise_to_line(line, slope_of_line, top, weights)
        if t > 0:
            thresholds[v] = t
        gains[v] = f
    return thresholds


class _Gain:
    """A convex function on the integers 0 <= a <= top, as slope trick keeps it:
        g(a) = v0 + s0 * a + sum over live breakpoints (b, w) of w * max(0, a - b)
    so that g(a + 1) - g(a) = s0 + (weight of the breakpoints <= a). A breakpoint is an id into the solve's
    `weights` list (its weight; 0 once dead), held in both heaps: `low` (min-heap of (b, id)) and `high`
    (max-heap of (-b, id)); a dead one is skipped where it surfaces. `count` and `moment` are the live
    breakpoints' sum of w and of w * b, `live` how many there are.

    Invariants: every live breakpoint has 1 <= b <= top and w >= 1, where top is the highest depth the caller
    evaluates at (`value_at(top)` is then exact from the totals); each breakpoint id lives in one `_Gain`."""

    __slots__ = ("v0", "s0", "low", "high", "count", "moment", "live")

    def __init__(self) -> None:
        self.v0 = self.s0 = self.count = self.moment = self.live = 0
        self.low: list[tuple[int, int]] = []
        self.high: list[tuple[int, int]] = []

    def size(self) -> int:
        return self.live

    def value_at(self, a: int) -> int:
        """g(a), for an `a` at or above every live breakpoint."""
        return self.v0 + self.s0 * a + self.count * a - self.moment

    def push(self, b: int, w: int, weights: list[int]) -> None:
        """Add w * max(0, a - b) (b >= 1, w >= 1) under a new breakpoint id."""
        weights.append(w)
        heapq.heappush(self.low, (b, len(weights) - 1))
        heapq.heappush(self.high, (-b, len(weights) - 1))
        self.count, self.moment, self.live = self.count + w, self.moment + w * b, self.live + 1

    def absorb(self, other: _Gain, weights: list[int]) -> None:
        """self += other (other is spent; call it on the larger of the two: each breakpoint then moves
        O(log n) times in a whole solve)."""
        self.v0, self.s0 = self.v0 + other.v0, self.s0 + other.s0
        self.count, self.moment = self.count + other.count, self.moment + other.moment
        self.live += other.live
        for b, i in other.low:
            if weights[i]:
                heapq.heappush(self.low, (b, i))
                heapq.heappush(self.high, (-b, i))

    def _kill(self, b: int, i: int, weights: list[int]) -> int:
        w, weights[i] = weights[i], 0
        self.count, self.moment, self.live = self.count - w, self.moment - w * b, self.live - 1
        return w

    def drop_above(self, top: int, weights: list[int]) -> None:
        """Restrict g to [0, top]: breakpoints above it change no value there."""
        high = self.high
        while high and (not weights[high[0][1]] or -high[0][0] > top):
            nb, i = heapq.heappop(high)
            if weights[i]:
                self._kill(-nb, i, weights)

    def _lowest(self, weights: list[int]) -> tuple[int, int] | None:
        low = self.low
        while low and not weights[low[0][1]]:
            heapq.heappop(low)
        return low[0] if low else None

    def raise_to_line(self, q: int, p: int, top: int, weights: list[int]) -> int:
        """g := max(g, L) with L(a) = q + p * a, where g - L is nondecreasing; return t, the first a >= 0
        with g(a) >= L(a) (top + 1 where there is none in [0, top]): L > g exactly on [0, t). Walks up
        from 0, removing the breakpoints below t (each breakpoint is removed once: amortised O(log n))."""
        x, gx, s = 0, self.v0, self.s0  # g(x) = gx; s = g(x + 1) - g(x); no live breakpoint at or below x
        if gx >= q:
            return 0
        while True:
            nxt = self._lowest(weights)
            gap = q + p * x - gx  # > 0: L(x) > g(x)
            t = x - (-gap // (s - p)) if s > p else top + 1  # g is linear from x to the next breakpoint
            if nxt is None or t < nxt[0]:
                break
            b, i = heapq.heappop(self.low)
            gx, x = gx + s * (b - x), b
            s += self._kill(b, i, weights)
            if t == b:
                break
        if t > top:  # L on the whole domain (no breakpoint was left: they are all <= top)
            self.v0, self.s0, self.count, self.moment, self.live = q, p, 0, 0, 0
            self.low, self.high = [], []
            return top + 1
        gt = gx + s * (t - x)  # g(t); s is now g's slope at t
        step = gt - (q + p * (t - 1))  # the new slope from t - 1 to t, between p and s
        self.v0, self.s0 = q, (p if t > 1 else step)
        if t > 1 and step > p:
            self.push(t - 1, step - p, weights)
        if s > step:
            self.push(t, s - step, weights)
        return t


def _extract(tree: RadixTree, thresholds: dict[int, int], mode: str, lengths: list[int]) -> PrefixPlan:
    """The plan `_solve`'s thresholds make: top down, a node opens when its nearest open ancestor's depth is
    below its threshold."""
    groups: list[PrefixGroup] = []
    ungrouped: list[int] = []
    # (node, depth of nearest open ancestor, its group id or None)
    stack: list[tuple[int, int, int | None]] = [(0, 0, None)]
    while stack:
        v, a, group = stack.pop()
        if v != 0 and a < thresholds.get(v, 0):
            parent = group if mode == MULTI_LEVEL else None
            groups.append(PrefixGroup(len(groups), tree.depth[v], parent))
            new_group = len(groups) - 1
            if parent is not None:
                groups[parent].children.append(new_group)
            group, a = new_group, tree.depth[v]
        members = tree.direct_prompts(v)
        if group is None:
            ungrouped.extend(members)
        else:
            groups[group].prompts.extend(members)
        for c in reversed(tree.children[v]):
            stack.append((c, a, group))
    return PrefixPlan(mode, groups, sorted(ungrouped), lengths)
