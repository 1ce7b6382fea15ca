"""The data-parallel partitioner: exact assignment, balance, splitting counted, determinism."""

import random

import pytest

from batchllm.parallel.partition import partition_plan
from batchllm.prefix import plan_prefix_sharing


def _groups(num_groups, degree, prefix, suffix, seed=0, nested=False, first=1):
    rng = random.Random(seed)
    prompts = []
    for g in range(num_groups):
        head = [first + g] + [rng.randrange(1000, 30000) for _ in range(prefix - 1)]
        for m in range(degree):
            mid = [500 + m % 2] + [rng.randrange(1000, 30000) for _ in range(prefix // 2)] if nested else []
            prompts.append(head + mid + [100 + m] + [rng.randrange(1000, 30000) for _ in range(suffix - 1)])
    rng.shuffle(prompts)
    return prompts


def _all_prompts(partition):
    shards = [s for rank in partition.pinned for s in rank] + partition.queue
    return [p for s in shards for p in s.prompts]


@pytest.mark.parametrize("ranks", [1, 2, 3, 8])
def test_every_prompt_exactly_once_and_whole_groups(ranks):
    prompts = _groups(12, 6, 64, 8)
    plan = plan_prefix_sharing(prompts)
    part = partition_plan(plan, [16] * len(prompts), ranks)
    assert sorted(_all_prompts(part)) == list(range(len(prompts)))
    assert part.num_split_groups == 0 and part.duplicated_prefill_tokens == 0
    # no group straddles two shards when nothing was split
    shard_of = {p: i for i, s in enumerate([s for r in part.pinned for s in r] + part.queue) for p in s.prompts}
    for g in plan.top_level_groups:
        assert len({shard_of[p] for p in plan.prompts_under(g.group_id)}) == 1


def test_balance_within_the_lpt_bound():
    rng = random.Random(3)
    prompts = []
    for g in range(40):
        degree = rng.randrange(1, 12)
        head = [1 + g] + [rng.randrange(1000, 30000) for _ in range(rng.randrange(10, 200))]
        prompts += [head + [100 + m, rng.randrange(1000, 30000)] for m in range(degree)]
    plan = plan_prefix_sharing(prompts)
    outputs = [rng.randrange(1, 300) for _ in prompts]
    part = partition_plan(plan, outputs, 4, tail_fraction=0.0)
    biggest = max(s.cost for r in part.pinned for s in r)
    total = sum(part.loads)
    assert max(part.loads) <= total / 4 + biggest + 1e-9
    assert not part.queue


def test_a_large_group_is_split_and_its_extra_prefill_counted():
    prompts = _groups(1, 64, 512, 4) + _groups(4, 2, 16, 4, seed=1, first=50)
    plan = plan_prefix_sharing(prompts)
    part = partition_plan(plan, [8] * len(prompts), 4, tail_fraction=0.0)
    assert part.num_split_groups == 1
    chunks = [s for r in part.pinned for s in r if len(s.prompts) > 2]
    assert len(chunks) == 4
    # each extra chunk prefills the 512-token prefix again (the plan shares it as one segment)
    big = max(plan.top_level_groups, key=lambda g: g.prefix_len)
    assert part.duplicated_prefill_tokens == 3 * big.prefix_len
    assert sorted(_all_prompts(part)) == list(range(len(prompts)))
    assert max(part.loads) < 1.5 * min(part.loads)


def test_nested_groups_are_kept_in_tree_order_within_chunks():
    prompts = _groups(1, 40, 256, 4, nested=True)
    plan = plan_prefix_sharing(prompts)
    assert any(g.parent is not None for g in plan.groups)
    part = partition_plan(plan, [4] * len(prompts), 2, tail_fraction=0.0)
    # two chunks, each holding one of the two nested sub-groups whole: only the outer segment repeats
    outer = next(g for g in plan.groups if g.parent is None)
    assert part.duplicated_prefill_tokens == outer.prefix_len


def test_tail_queue_holds_the_cheapest_shards():
    prompts = _groups(30, 4, 32, 8)
    plan = plan_prefix_sharing(prompts)
    part = partition_plan(plan, [10] * len(prompts), 3, tail_fraction=0.2)
    assert part.queue
    pinned_min = min(s.cost for r in part.pinned for s in r)
    assert max(s.cost for s in part.queue) <= pinned_min
    total = sum(part.loads) + sum(s.cost for s in part.queue)
    assert sum(s.cost for s in part.queue) <= 0.2 * total


def test_deterministic():
    prompts = _groups(20, 5, 40, 6, seed=7)
    plan = plan_prefix_sharing(prompts)
    a = partition_plan(plan, list(range(len(prompts))), 3)
    b = partition_plan(plan_prefix_sharing(prompts), list(range(len(prompts))), 3)
    assert a == b


def test_bad_arguments_are_named():
    plan = plan_prefix_sharing([[1, 2, 3]])
    with pytest.raises(ValueError, match="num_ranks"):
        partition_plan(plan, [1], 0)
    with pytest.raises(ValueError, match="expected outputs"):
        partition_plan(plan, [1, 2], 2)
