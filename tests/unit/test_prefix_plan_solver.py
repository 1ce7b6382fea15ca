"""The planner's DP (`plan._solve`): the same plan as the O(nodes x depth) solver it replaced, on random trees of
every shape, and deep nesting (one request per turn of a conversation, a growing document) in near-linear time."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from batchllm.prefix import plan_prefix_sharing
from batchllm.prefix.plan import MULTI_LEVEL, PLAN_MODES, SINGLE_LEVEL, PrefixGroup, PrefixPlan, _extract, _solve
from batchllm.prefix.radix import RadixTree, build_radix_tree


def oracle_solve(tree: RadixTree, mode: str, overhead: int) -> dict[int, set[int]]:
    """The solver before the threshold form, as it was: for each node, the ancestor depths `a` (every one of
    them, evaluated one by one) at which opening it is optimal."""
    depth, children = tree.depth, tree.children
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
            gain[c] = {}
    return opens


def oracle_extract(tree: RadixTree, opens: dict[int, set[int]], mode: str, lengths: list[int]) -> PrefixPlan:
    """The plan from `oracle_solve`'s sets, as the planner made it."""
    groups: list[PrefixGroup] = []
    ungrouped: list[int] = []
    stack: list[tuple[int, int, int | None]] = [(0, 0, None)]
    while stack:
        v, a, group = stack.pop()
        if v != 0 and a in opens.get(v, ()):
            parent = group if mode == MULTI_LEVEL else None
            groups.append(PrefixGroup(len(groups), tree.depth[v], parent))
            if parent is not None:
                groups[parent].children.append(len(groups) - 1)
            group, a = len(groups) - 1, tree.depth[v]
        (ungrouped if group is None else groups[group].prompts).extend(tree.direct_prompts(v))
        for c in reversed(tree.children[v]):
            stack.append((c, a, group))
    return PrefixPlan(mode, groups, sorted(ungrouped), lengths)


def ancestor_depths(tree: RadixTree, v: int) -> list[int]:
    out, u = [], tree.parent[v]
    while u != -1:
        out.append(tree.depth[u])
        u = tree.parent[u]
    return out


def pieces_batch(rng: random.Random) -> list[list[int]]:
    """Prompts over a 1-3 token alphabet: cuts of one base text, of earlier prompts, and noise; nesting at
    random depths, identical prompts, one-token prompts (planned as empty)."""
    alphabet = rng.randrange(1, 4)
    word = lambda n: [rng.randrange(alphabet) for _ in range(n)]  # noqa: E731
    base, prompts = word(rng.randrange(1, 60)), []
    for _ in range(rng.randrange(1, 40)):
        r = rng.random()
        if r < 0.5:
            prompts.append(base[: rng.randrange(1, len(base) + 1)] + word(rng.randrange(0, 5)))
        elif r < 0.8 and prompts:
            q = rng.choice(prompts)
            prompts.append(q[: rng.randrange(0, len(q) + 1)] + word(rng.randrange(1, 8)))
        else:
            prompts.append(word(rng.randrange(1, 20)))
    return prompts


def conversations_batch(rng: random.Random) -> list[list[int]]:
    """Multi-turn conversations expanded into one request per turn (each a prefix of the next) under a shared
    system prompt; some conversations branch off another's first turns."""
    system = [rng.randrange(100, 200) for _ in range(rng.randrange(0, 6))]
    conversations: list[list[list[int]]] = []
    for _ in range(rng.randrange(1, 6)):
        turns = [list(t) for t in rng.choice(conversations)[: rng.randrange(0, 4)]] if conversations else []
        turns += [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 7))] for _ in range(rng.randrange(1, 25))]
        conversations.append(turns)
    prompts = []
    for turns in conversations:
        text = list(system)
        for turn in turns:
            text += turn
            prompts.append(list(text) + [rng.randrange(1, 3)] * rng.randrange(0, 2))
    rng.shuffle(prompts)
    return prompts


@pytest.mark.parametrize("make", [pieces_batch, conversations_batch])
@pytest.mark.parametrize("seed", range(150))
def test_thresholds_open_exactly_where_the_old_solver_opened(make, seed):
    """Opening a node is optimal on a prefix of its ancestor depths (the threshold form): at every ancestor
    depth of every node the decision is the old solver's, and so is every plan (groups, members, nesting),
    in both modes, with group overheads (negative too: the DP is exact for any)."""
    rng = random.Random(seed)
    prompts = make(rng)
    tree = build_radix_tree([p[:-1] for p in prompts])
    lengths = [len(p) for p in prompts]
    for mode in (SINGLE_LEVEL, MULTI_LEVEL):
        overhead = rng.choice([0, 0, rng.randrange(-3, 40)])
        want = oracle_solve(tree, mode, overhead)
        thresholds = _solve(tree, mode, overhead)
        for v in range(1, tree.num_nodes):
            got = {a for a in ancestor_depths(tree, v) if a < thresholds.get(v, 0)}
            assert got == want.get(v, set()), (mode, overhead, v)
        assert _extract(tree, thresholds, mode, lengths) == oracle_extract(tree, want, mode, lengths)
        if overhead >= 0:  # (plan_prefix_sharing refuses a negative overhead: test_group_overhead_is_checked_by_name)
            assert plan_prefix_sharing(prompts, mode, overhead) == oracle_extract(tree, want, mode, lengths)


def test_group_overhead_is_checked_by_name():
    """group_overhead_tokens was not checked: None or a string failed deep in the solver ('unsupported operand
    type(s) for -'), a float made non-integer breakpoints, and a negative one (a bonus per group) opened groups
    that compute more prefill tokens: here a single-level group nested for 2 prompts sharing 1 more token (the
    whole 101-token prefix again, to save 2), 208 prefill tokens instead of 109."""
    shared = list(range(10, 110))
    prompts = [shared + [1, 5, 0], shared + [1, 6, 0], shared + [2, 7, 0]]
    for mode in PLAN_MODES:
        for bad in (None, "3", 1.5, True):
            with pytest.raises(TypeError, match=f"group_overhead_tokens must be an integer >= 0, got {bad!r}"):
                plan_prefix_sharing(prompts, mode, bad)
        with pytest.raises(ValueError, match=r"group_overhead_tokens must be >= 0 \(a cost per group"):
            plan_prefix_sharing(prompts, mode, -100)
    assert plan_prefix_sharing(prompts, SINGLE_LEVEL, np.int64(0)).prefill_tokens == 109
    assert plan_prefix_sharing(prompts, MULTI_LEVEL, 0).prefill_tokens == 108
    assert plan_prefix_sharing(prompts, SINGLE_LEVEL, 3).prefill_tokens == 109


def nested_chain_tree(n: int, step: int) -> RadixTree:
    """What `build_radix_tree` makes of n nested prompts, prompt i the first (i + 1) * step tokens of one
    text: node i (1 <= i < n) at depth i * step holds prompts i - 1 .. n - 1, prompt i - 1 directly."""
    return RadixTree(
        order=np.arange(n, dtype=np.int64), prompt_lengths=np.arange(1, n + 1, dtype=np.int64) * step,
        depth=[i * step for i in range(n)], lo=[0] + list(range(n - 1)), hi=[n] * n,
        parent=[-1] + list(range(n - 1)), children=[[i + 1] for i in range(n - 1)] + [[]])


def test_the_chain_tree_is_what_the_radix_tree_builds():
    text = list(range(1, 200))
    prompts = [text[: (i + 1) * 3] for i in range(40)]
    built, made = build_radix_tree(prompts), nested_chain_tree(40, 3)
    assert built.order.tolist() == made.order.tolist() and built.prompt_lengths.tolist() == made.prompt_lengths.tolist()
    assert (built.depth, built.lo, built.hi, built.parent, built.children) == (
        made.depth, made.lo, made.hi, made.parent, made.children)


@pytest.mark.parametrize("mode", [SINGLE_LEVEL, MULTI_LEVEL])
def test_five_thousand_nested_prompts_plan_in_near_linear_time(mode):
    """5,000 nested prompts (one request per turn of a long conversation): the old solver evaluated every
    ancestor depth of every node and copied each node's ancestor list, ~10 s and ~600 MB here; the threshold
    solver takes ~0.05 s. CPU time (not wall), with a margin for a slow machine."""
    tree = nested_chain_tree(5000, 4)
    start = time.process_time()
    thresholds = _solve(tree, mode, 0)
    assert time.process_time() - start < 2.0
    plan = _extract(tree, thresholds, mode, tree.prompt_lengths.tolist())
    if mode == MULTI_LEVEL:  # every nested prefix opens, each inside the previous: each token computed once
        assert len(plan.groups) == 4999 and plan.prefill_tokens == 5000 * 4
        assert all(g.parent == (g.group_id - 1 if g.group_id else None) for g in plan.groups)
    else:
        assert 0 < len(plan.groups) < 4999 and plan.prefill_tokens < plan.prompt_tokens // 10
