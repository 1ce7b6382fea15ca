"""The prefix planner: the paper's example, brute force on small batches, the paper's bounds."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.prefix import build_radix_tree, plan_prefix_sharing
from batchllm.prefix.radix import _adjacent_lcp


def test_radix_tree_nodes_are_lcp_intervals():
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9], [7, 8], [1, 2, 3, 4]]
    t = build_radix_tree(prompts)
    nodes = {(t.depth[v], tuple(sorted(t.order[t.lo[v]:t.hi[v]].tolist()))) for v in range(t.num_nodes)}
    assert nodes == {(0, (0, 1, 2, 3, 4)), (2, (0, 1, 2, 4)), (3, (0, 1, 4)), (4, (0, 4))}
    # distinct tokens: 1,2,3,4,5,9 on the [1,2,...] branch plus 7,8
    assert t.num_distinct_tokens() == 8


def paper_example():
    rng = random.Random(0)
    c = [1, 2, 3, 4]  # shared by all 5
    g = [10, 11, 12, 13, 14, 15, 16, 17]  # shared by prompts 0 and 1 only
    tail = lambda: [rng.randrange(100, 1000) for _ in range(6)]
    return [c + g + tail(), c + g + tail(), c + [20] + tail(), c + [21] + tail(), c + [22] + tail()]


def test_paper_example_two_sharing_eight_beat_five_sharing_four():
    prompts = paper_example()
    plan = plan_prefix_sharing(prompts, mode="single")
    groups = sorted((g.prefix_len, sorted(plan.prompts_under(g.group_id))) for g in plan.groups)
    # gain of forking g out of c: (2 - 1) * 8 - 4 = 4 > 0
    assert groups == [(4, [2, 3, 4]), (12, [0, 1])]
    total = sum(map(len, prompts))
    assert plan.prefill_tokens == total - 2 * 4 - 1 * 12  # c saved for 2 of 3, c+g saved once
    # If g were shared by only 2 tokens the fork would lose: (2 - 1) * 2 - 4 < 0
    short = [p[:4] + p[4:6] + p[12:] if i < 2 else p for i, p in enumerate(prompts)]
    plan = plan_prefix_sharing(short, mode="single")
    assert [(g.prefix_len, sorted(plan.prompts_under(g.group_id))) for g in plan.groups] == [(4, [0, 1, 2, 3, 4])]


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]
        yield [[first]] + part


def lcp(seqs):
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def brute_force_single_level(prompts):
    """Best prefill over every partition into groups; a group shares the LCP of its members
    (without their last tokens), computed once."""
    best = None
    for part in set_partitions(list(range(len(prompts)))):
        cost = 0
        for group in part:
            if len(group) == 1:
                cost += len(prompts[group[0]])
                continue
            shared = lcp([prompts[i][:-1] for i in group])
            cost += shared + sum(len(prompts[i]) - shared for i in group)
        best = cost if best is None else min(best, cost)
    return best


def random_batch(rng, n):
    """Prompts built from a few shared pieces, so that they nest and overlap."""
    pieces = [[rng.randrange(1, 5) for _ in range(rng.randrange(1, 6))] for _ in range(4)]
    prompts = []
    for _ in range(n):
        p = []
        for _ in range(rng.randrange(1, 4)):
            p += rng.choice(pieces)
        p += [rng.randrange(1, 5) for _ in range(rng.randrange(0, 3))]
        prompts.append(p)
    return prompts


@pytest.mark.parametrize("seed", range(60))
def test_single_level_dp_is_optimal_against_brute_force(seed):
    rng = random.Random(seed)
    prompts = random_batch(rng, rng.randrange(2, 8))
    plan = plan_prefix_sharing(prompts, mode="single")
    assert plan.prefill_tokens == brute_force_single_level(prompts)


@pytest.mark.parametrize("seed", range(60))
def test_multi_level_computes_each_distinct_prefix_once_and_never_loses(seed):
    rng = random.Random(seed)
    prompts = random_batch(rng, rng.randrange(2, 12))
    multi = plan_prefix_sharing(prompts, mode="multi")
    single = plan_prefix_sharing(prompts, mode="single")
    distinct_prefixes = {tuple(p[:i]) for p in prompts for i in range(1, len(p))}
    assert multi.prefill_tokens == len(distinct_prefixes) + len(prompts)
    assert multi.prefill_tokens <= single.prefill_tokens
    for plan in (multi, single):
        members = sorted(plan.ungrouped + [p for g in plan.groups for p in g.prompts])
        assert members == list(range(len(prompts))), "every prompt in exactly one place"
        for g in plan.groups:
            under = plan.prompts_under(g.group_id)
            assert len(under) >= 2
            assert all(prompts[i][: g.prefix_len] == prompts[under[0]][: g.prefix_len] for i in under)
            assert all(len(prompts[i]) > g.prefix_len for i in under)


def synthetic(num_groups, degree, shared, distinct, seed=0):
    """Random token ids; distinct first tokens keep groups (and members) from sharing by chance."""
    rng = np.random.default_rng(seed)
    prompts = []
    for g in range(num_groups):
        prefix = np.concatenate([[g + 1], rng.integers(1000, 32000, shared - 1)])
        for m in range(degree):
            suffix = np.concatenate([[500 + m], rng.integers(1000, 32000, distinct - 1)])
            prompts.append(np.concatenate([prefix, suffix]).astype(np.int32))
    order = rng.permutation(len(prompts))  # shuffled, as the paper's workloads
    return [prompts[i] for i in order]


@pytest.mark.parametrize("mode", ["single", "multi"])
@pytest.mark.parametrize("shared, distinct, groups, bound", [(2000, 200, 40, 0.852), (16000, 200, 4, 0.926)])
def test_saving_ratio_reaches_the_bound(mode, shared, distinct, groups, bound):
    plan = plan_prefix_sharing(synthetic(groups, 16, shared, distinct), mode=mode)
    exact = 1 - (shared + 16 * distinct) / (16 * (shared + distinct))
    assert plan.saving_ratio == pytest.approx(exact, abs=1e-12)
    assert round(plan.saving_ratio, 3) == bound
    s = plan.summary()
    assert s["num_groups"] == groups and s["mean_sharing_degree"] == 16 and s["max_sharing_degree"] == 16


def test_nothing_shared_means_no_groups():
    plan = plan_prefix_sharing([[1, 2, 3], [4, 5, 6], [7, 8]])
    assert plan.groups == [] and plan.prefill_tokens == 8 and plan.saving_ratio == 0.0


def test_identical_prompts_share_all_but_their_last_token():
    plan = plan_prefix_sharing([[5, 6, 7, 8]] * 3)
    assert [(g.prefix_len, g.prompts) for g in plan.groups] == [(3, [0, 1, 2])]
    assert plan.prefill_tokens == 3 + 3


def test_a_summary_counts_a_request_of_n_completions_once():
    """A request of n completions is n members of the plan: its prompt tokens were counted n times (vLLM's usage
    counts them once); the saving stays against the members' prompt tokens (the prefill without sharing)."""
    plan = plan_prefix_sharing([[5, 6, 7, 8]] * 3 + [[9, 9]])  # one request of n = 3, one of n = 1
    summary = plan.summary([4, 2])
    assert summary["num_requests"] == 2 and summary["prompt_tokens"] == 6
    assert summary["num_completions"] == 4 and summary["completion_prompt_tokens"] == 14
    assert summary["prefill_tokens"] == 3 + 3 + 2 and summary["saving_ratio"] == pytest.approx(1 - 8 / 14)
    plain = plan.summary()
    assert plain["num_requests"] == plain["num_completions"] == 4
    assert plain["prompt_tokens"] == plain["completion_prompt_tokens"] == 14


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_share_off_plans_every_prompt_on_its_own(mode):
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5], [7]]
    plan = plan_prefix_sharing(prompts, mode, share=False)
    assert plan.mode == mode and plan.groups == [] and plan.ungrouped == [0, 1, 2]
    assert plan.prefill_tokens == plan.prompt_tokens == 9 and plan.saving_ratio == 0.0
    with pytest.raises(ValueError, match="plan mode"):
        plan_prefix_sharing(prompts, "bogus", share=False)


def _naive_lcp(a, b) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), max_size=40), min_size=0, max_size=30), st.integers(1, 64))
def test_adjacent_lcp_matches_the_definition_whatever_the_round_budget(prompts, budget):
    arrays = [np.asarray(p, dtype=np.int32) for p in prompts]
    got = _adjacent_lcp(arrays, budget=budget).tolist()
    assert got == [0] * min(1, len(prompts)) + [_naive_lcp(prompts[i - 1], prompts[i]) for i in range(1, len(prompts))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=30), min_size=1, max_size=25),
       st.sampled_from(["single", "multi"]))
def test_plan_is_the_same_from_lists_int32_and_int64_arrays(prompts, mode):
    plans = [plan_prefix_sharing(ps, mode=mode) for ps in
             (prompts, [np.asarray(p, dtype=np.int32) for p in prompts], [np.asarray(p) for p in prompts])]
    assert plans[0] == plans[1] == plans[2]
    tree = build_radix_tree(prompts)
    for v in range(1, tree.num_nodes):  # each node's depth is its prompts' common prefix, and no longer
        members = [prompts[i] for i in tree.order[tree.lo[v]:tree.hi[v]].tolist()]
        assert min(_naive_lcp(members[0], m) for m in members[1:]) == tree.depth[v]


@pytest.mark.parametrize("mode", ["single", "multi"])
def test_prefixes_cut_to_blocks_end_on_boundaries_and_cost_each_member_less_than_a_block(mode):
    """Cut prefixes (what members whose worst case nearly fills the KV cache share: `LLM._plans_within_cache`)
    end on a block boundary; a cut group that no longer extends its enclosing one (here the nested groups of 6
    and 7 tokens under 4) or is left empty (a top-level group of 3) is dissolved into it, its prompts and nested
    groups moving up (a group's 3-token prefix no longer encloses 4-token ones: they become top-level); groups
    not asked to be cut keep their length, every prompt stays planned once."""
    rng = random.Random(3)
    prompts = ([[1] * 3 + [2] * 3 + [rng.randrange(10, 99) for _ in range(5)] for _ in range(3)]
               + [[1] * 3 + [3] * 4 + [rng.randrange(10, 99) for _ in range(5)] for _ in range(3)]
               + [[1] * 3 + [4] * 10 + [rng.randrange(10, 99) for _ in range(3)] for _ in range(3)]
               + [[7] * 3 + [rng.randrange(10, 99)] for _ in range(2)])
    plan = plan_prefix_sharing(prompts, mode)
    every = {g.group_id for g in plan.groups}
    cut = plan.with_prefixes_cut_to_blocks(every, 4)
    assert all(g.prefix_len % 4 == 0 and g.prefix_len > 0 for g in cut.groups)
    assert sorted(cut.ungrouped + [p for g in cut.groups for p in g.prompts]) == list(range(len(prompts)))
    assert all(cut.groups[c].parent == g.group_id and cut.groups[c].prefix_len > g.prefix_len
               for g in cut.groups for c in g.children)
    assert [9, 10] == [p for p in cut.ungrouped if p >= 9], "the 3-token group is dissolved"
    assert plan.prefill_tokens < cut.prefill_tokens <= plan.prefill_tokens + 3 * len(prompts)
    if mode == "multi":
        assert [(g.prefix_len, sorted(g.prompts), g.parent) for g in cut.groups] == [
            (4, [0, 1, 2], None), (4, [3, 4, 5], None), (12, [6, 7, 8], None)]
        one = plan.with_prefixes_cut_to_blocks({4}, 4)  # only the 13-token group: the rest keeps its nesting
        assert [(g.prefix_len, g.parent) for g in one.groups] == [(g.prefix_len - (g.group_id == 4), g.parent)
                                                                  for g in plan.groups]
    untouched = plan.with_prefixes_cut_to_blocks(set(), 4)
    assert untouched == plan
