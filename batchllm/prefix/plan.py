"""Prefix-sharing plans: which prompts share which prefix, chosen over the whole batch before running.

A plan is a forest of groups. A group owns a shared prefix (the first `prefix_len` tokens of each
of its member prompts), computed once; its members are prompts and, in a multi-level plan, nested
groups whose longer prefix extends it. Every prompt belongs to exactly one group or to none.

Both planners solve an exact dynamic program over the radix tree. Opening node v (making its
prefix a group) makes every prompt whose deepest open ancestor is v skip d_v tokens; the cost of
opening v is
  single-level (BatchLLM): d_v              (the whole prefix is computed again for every group)
  multi-level:             d_v - d_a        (only the segment past the enclosing group a)
plus `group_overhead_tokens`. With g_v(a) = the best saving in v's subtree given that the nearest
open ancestor has depth a:
  g_v(a) = max( sum_c g_c(a) + k_v * a,                      # v closed
                sum_c g_c(d_v) + k_v * d_v - cost_v(a) )     # v open
where k_v counts prompts directly under v. BatchLLM's "first-level prefix enlargement" is the
greedy form of the single-level case (fork g out of c when (leaves(g) - 1) * len(g) > len(c)); the
DP finds the optimum of the same objective. The multi-level plan is never worse than the
single-level one, since the single-level plan's groups cost at least as much there.

Prompts are planned without their last token: a member must compute at least one token of its
own to produce logits, so a prefix never covers a whole prompt.
"""

from __future__ import annotations

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
    option), every prompt on its own."""
    if mode not in PLAN_MODES:
        raise ValueError(f"plan mode must be one of {PLAN_MODES}, got {mode!r}")
    lengths = [len(p) for p in prompts]
    if not share:
        return PrefixPlan.without_sharing(lengths, mode)
    if any(n == 0 for n in lengths):
        raise ValueError("cannot plan an empty prompt")
    tree = build_radix_tree([p[:-1] for p in prompts])
    open_nodes = _solve(tree, mode, group_overhead_tokens)
    return _extract(tree, open_nodes, mode, lengths)


def _solve(tree: RadixTree, mode: str, overhead: int) -> dict[int, set[int]]:
    """Return, for each node, the ancestor depths `a` at which opening it is optimal."""
    depth, children = tree.depth, tree.children
    # Distinct depths of each node's proper ancestors (root included), outermost first.
    ancestor_depths: list[list[int]] = [[] for _ in range(tree.num_nodes)]
    postorder, stack = [], [0]
    while stack:
        v = stack.pop()
        postorder.append(v)
        for c in children[v]:
            ancestor_depths[c] = ancestor_depths[v] + [depth[v]]
            stack.append(c)
    postorder.reverse()
    direct = [tree.num_prompts_under(v) - sum(tree.num_prompts_under(c) for c in children[v])
              for v in range(tree.num_nodes)]
    gain: list[dict[int, int]] = [dict() for _ in range(tree.num_nodes)]
    opens: dict[int, set[int]] = {}
    for v in postorder:
        if v == 0:
            continue
        d, k = depth[v], direct[v]
        inside_open = sum(gain[c][d] for c in children[v]) + k * d
        for a in ancestor_depths[v]:
            closed = sum(gain[c][a] for c in children[v]) + k * a
            cost = (d if mode == SINGLE_LEVEL else d - a) + overhead
            opened = inside_open - cost
            if opened > closed:
                gain[v][a] = opened
                opens.setdefault(v, set()).add(a)
            else:
                gain[v][a] = closed
        for c in children[v]:
            gain[c] = {}  # no longer needed: keep memory flat
    return opens


def _extract(tree: RadixTree, opens: dict[int, set[int]], mode: str, lengths: list[int]) -> PrefixPlan:
    groups: list[PrefixGroup] = []
    ungrouped: list[int] = []
    # (node, depth of nearest open ancestor, its group id or None)
    stack: list[tuple[int, int, int | None]] = [(0, 0, None)]
    while stack:
        v, a, group = stack.pop()
        if v != 0 and a in opens.get(v, ()):
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
