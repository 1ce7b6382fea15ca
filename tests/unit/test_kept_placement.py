"""The data-parallel parent's memory of what each rank finished (`KeptPlacement`), and the partition placing a later
call's prompts by it: exact counts against a brute-force oracle, bounds, and where shards go."""

import random
from types import SimpleNamespace

import pytest

from batchllm.parallel.kept_placement import KeptPlacement
from batchllm.parallel.partition import Shard, TailQueue, _place_longest_first, _Segments, partition_plan
from batchllm.prefix import plan_prefix_sharing


def _output(*completions):
    """A RequestOutput's shape: completions of (token ids, finish reason)."""
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(t), finish_reason=f) for t, f in completions])


def test_a_continued_sequence_is_held_in_whole_blocks_up_to_its_last_written_token():
    kept = KeptPlacement([10_000, 10_000], block_size=16)
    prompt = list(range(1, 151))
    kept.record(0, prompt, _output((range(500, 510), "stop")))  # 150 + 9 written = 159 tokens: 9 blocks
    turn_two = prompt + list(range(500, 510)) + [7] * 40
    assert kept.tokens_held([turn_two, prompt, prompt[:40], prompt[:17], [9] * 100]) == [
        {0: 144}, {0: 144}, {0: 32}, {0: 16}, {}]
    assert kept.tokens_held([prompt[:16]]) == [{}]  # its last token is computed: no whole block before it


def test_only_stopped_or_finished_completions_are_held_and_each_of_n():
    kept = KeptPlacement([10_000], block_size=4)
    prompt = [1, 2, 3, 4, 5, 6]
    kept.record(0, prompt, _output(([7, 8, 9], "abort"), ([], "length")))
    assert not kept and kept.tokens_held([prompt + [7, 8, 9]]) == [{}]
    kept.record(0, prompt, _output(([7, 8, 9, 10, 11], "length"), ([20, 21, 22], "stop")))
    assert kept.tokens_held([prompt + [7, 8, 9, 10, 11], prompt + [20, 21, 22, 0]]) == [{0: 8}, {0: 8}]


def test_records_are_copies_and_bounded_by_each_ranks_cache():
    kept = KeptPlacement([32, 64], block_size=8)
    prompt, outputs = list(range(100, 124)), [1, 2, 3]
    output = _output((outputs, "stop"))
    kept.record(0, prompt, output)  # 24 + 2 = 26 tokens: 24 held
    prompt[0], outputs[0] = -1, -1  # the caller changes what it was given back
    output.outputs[0].token_ids.append(5)
    assert kept.tokens_held([list(range(100, 125))]) == [{0: 24}]
    kept.record(0, list(range(200, 217)), _output(([1], "stop")))  # 16 more: 40 > 32, so the first goes
    assert kept.tokens_held([list(range(100, 125)), list(range(200, 230))]) == [{}, {0: 16}]
    kept.record(1, list(range(100, 125)), _output(([1], "stop")))  # rank 1's cache is its own
    assert kept.tokens_held([list(range(100, 125))]) == [{1: 24}]
    kept.clear()
    assert not kept and kept.tokens_held([list(range(100, 125))]) == [{}]
    kept.record(0, list(range(300, 333)), _output(([1], "stop")))  # exactly the 4 blocks rank 0's cache holds
    assert kept.tokens_held([list(range(300, 334))]) == [{0: 32}]


def test_a_prefix_many_sequences_share_counts_once_against_a_ranks_cache():
    """100 conversations under one 2,000-token system prompt, alternating between two ranks: each rank holds
    125 + 50 x 4 blocks (5,200 tokens) of its 10,000, so every conversation is remembered (counted per sequence,
    the 100 x 2,064 tokens overflowed the caches and 8 of 100 were)."""
    kept = KeptPlacement([10_000, 10_000], block_size=16)
    system = list(range(1000, 3000))
    chats = [system + [5000 + i] * 48 for i in range(100)]
    for i, chat in enumerate(chats):
        kept.record(i % 2, chat, _output(([1] * 17, "length")))
    held = kept.tokens_held([chat + [1] * 16 + [9] for chat in chats])
    assert held == [{i % 2: 2064, 1 - i % 2: 2000} for i in range(100)]


@pytest.mark.parametrize("seed", range(6))
def test_tokens_held_match_a_brute_force_over_the_records(seed):
    rng = random.Random(seed)
    block, ranks = rng.choice([2, 4, 8]), rng.randrange(1, 5)
    kept = KeptPlacement([10**9] * ranks, block_size=block)
    stems = [[rng.randrange(3) for _ in range(rng.randrange(0, 40))] for _ in range(5)]  # few symbols: many ties
    recorded: list[list[list[int]]] = [[] for _ in range(ranks)]
    for _ in range(30):
        rank, prompt = rng.randrange(ranks), rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
        out = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
        kept.record(rank, prompt, _output((out, "stop")))
        whole = prompt + out[:-1]
        recorded[rank].append(whole[: len(whole) // block * block])
    queries = [rng.choice(stems) + [rng.randrange(3) for _ in range(rng.randrange(0, 30))] for _ in range(60)]
    queries = [q for q in queries if q]

    def common(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    expected = []
    for q in queries:
        cap = (len(q) - 1) // block * block
        held = {r: min(cap, max((common(q, rec) // block * block for rec in recorded[r]), default=0))
                for r in range(ranks)}
        expected.append({r: t for r, t in held.items() if t})
    assert kept.tokens_held(queries) == expected


def _groups(num_groups, degree, prefix, suffix, seed=0):
    rng = random.Random(seed)
    heads = [[1 + g] + [rng.randrange(1000, 30000) for _ in range(prefix - 1)] for g in range(num_groups)]
    return [head + [100 + m] + [rng.randrange(1000, 30000) for _ in range(suffix - 1)]
            for head in heads for m in range(degree)]


def test_held_tokens_count_each_segment_once_and_each_prompts_own_tokens():
    rng = random.Random(1)
    head = [rng.randrange(1000, 30000) for _ in range(40)]
    mids = [[500 + i] + [rng.randrange(1000, 30000) for _ in range(19)] for i in range(2)]
    prompts = [head + mids[m % 2] + [rng.randrange(1000, 30000) for _ in range(10)] for m in range(6)]
    plan = plan_prefix_sharing(prompts)
    segments = _Segments(plan)
    every = list(range(len(prompts)))
    whole = [{0: len(p)} for p in prompts]
    assert segments.held_tokens(every, whole) == ((0, segments.prefill_tokens(every)),)
    # rank 1 holds 30 tokens of every prompt (the outer prefix is 40); rank 0 the outer prefix and 5 of the middle,
    # through one prompt only
    partial = [{1: 30} for _ in prompts]
    partial[3] = {0: 45, 1: 30}
    assert segments.held_tokens(every, partial) == ((0, 45), (1, 30))


def test_a_later_call_goes_where_its_prefixes_are_held_and_stays_balanced():
    prompts = _groups(8, 4, 64, 8)
    plan = plan_prefix_sharing(prompts)
    outputs = [16] * len(prompts)
    blind = partition_plan(plan, outputs, 2, tail_fraction=0.0)
    blind_rank = {p: r for r, shards in enumerate(blind.pinned) for s in shards for p in s.prompts}
    # the rank other than the one the blind placement chose holds each group's prefix
    held = [{1 - blind_rank[p]: 64} for p in range(len(prompts))]
    placed = partition_plan(plan, outputs, 2, tail_fraction=0.0, held=held)
    rank_of = {p: r for r, shards in enumerate(placed.pinned) for s in shards for p in s.prompts}
    assert all(rank_of[p] == 1 - blind_rank[p] for p in range(len(prompts)))
    assert placed.placed_on_held_tokens == 8 * 64 and blind.placed_on_held_tokens == 0
    assert sorted(len(s) for s in placed.pinned) == [4, 4]
    # every prefix held on rank 0: the saving is not worth a rank idle, the load stays within LPT's bound
    lopsided = partition_plan(plan, outputs, 2, tail_fraction=0.0, held=[{0: 64}] * len(prompts))
    biggest = max(s.cost for r in lopsided.pinned for s in r)
    assert max(lopsided.loads) <= sum(lopsided.loads) / 2 + biggest
    assert 0 < lopsided.placed_on_held_tokens < 8 * 64 and all(lopsided.pinned)


def test_shards_stay_on_their_ranks_whatever_their_order_when_that_balances():
    """The first four groups in cost order are held on rank 0, the last four on rank 1: placed one by one, the
    third went to rank 1 (rank 0 looked loaded) and computed its prefix again; placed by where they are held, each
    stays, and the ranks are equally loaded."""
    prompts = _groups(8, 4, 64, 8)
    plan = plan_prefix_sharing(prompts)
    held = [{0 if p // 4 < 4 else 1: 64} for p in range(len(prompts))]
    part = partition_plan(plan, [16] * len(prompts), 2, tail_fraction=0.0, held=held)
    rank_of = {p: r for r, shards in enumerate(part.pinned) for s in shards for p in s.prompts}
    assert all(rank_of[p] == next(iter(held[p])) for p in range(len(prompts)))
    assert part.placed_on_held_tokens == 8 * 64 and part.loads[0] == part.loads[1]
    assert all([s.cost for s in shards] == sorted((s.cost for s in shards), reverse=True) for shards in part.pinned)


@pytest.mark.parametrize("seed", range(20))
def test_placement_by_held_keeps_every_prompt_once_and_stays_within_the_lpt_bound(seed):
    rng = random.Random(seed)
    ranks = rng.randrange(2, 6)
    prompts = _groups(rng.randrange(1, 12), rng.randrange(1, 6), rng.randrange(8, 80), rng.randrange(1, 20), seed)
    prompts += [[rng.randrange(1000, 30000) for _ in range(rng.randrange(2, 90))] for _ in range(rng.randrange(0, 9))]
    plan = plan_prefix_sharing(prompts)
    held = [{r: rng.randrange(0, len(p)) for r in rng.sample(range(ranks), rng.randrange(0, ranks + 1))}
            for p in prompts]
    weight = rng.choice([1.0, 0.5, 2.5])
    part = partition_plan(plan, [rng.randrange(1, 50) for _ in prompts], ranks, held=held,
                          tail_fraction=rng.choice([0.0, 0.1]), prefill_weight=weight)
    shards = [s for r in part.pinned for s in r] + part.queue
    assert sorted(p for s in shards for p in s.prompts) == list(range(len(prompts)))
    pinned = [s for r in part.pinned for s in r]
    if pinned:
        costs = [[s.cost_on(r, weight) for s in shards_of] for r, shards_of in enumerate(part.pinned)]
        assert all(s.cost_on(r, weight) == s.cost - weight * dict(s.held).get(r, 0)
                   for s in pinned for r in range(ranks))
        assert part.loads == pytest.approx([sum(c) for c in costs])
        # within the LPT bound of the shards' full costs: an equal share plus the largest
        assert max(part.loads) <= sum(s.cost for s in pinned) / ranks + max(s.cost for s in pinned) + 1e-6


def test_a_shard_placed_on_a_rank_holding_it_leaves_the_least_loaded_rank_next_in_line():
    """LPT over a heap with stale entries: the first shard goes to rank 1, which holds it (cheaper there), though
    rank 0 was least loaded; the next ones still go to the least loaded ranks, rank 0 first."""
    shards = [Shard((0,), 100, 0, 100.0, ((1, 90),))] + [Shard((i,), 50, 0, 50.0) for i in range(1, 5)]
    pinned, loads = _place_longest_first(shards, 3, 1.0)
    assert [[s.prompts[0] for s in r] for r in pinned] == [[1, 4], [0, 3], [2]]
    assert loads == [100.0, 60.0, 50.0]


def test_a_tail_shard_goes_first_to_the_rank_holding_most_of_it():
    held = {1: ((1, 5),), 2: ((0, 5),), 3: ((0, 8), (1, 5))}
    tail = TailQueue([Shard((i,), 10, 0, 10.0 - i, held.get(i, ())) for i in range(5)])
    taken = [tail.pop(rank) for rank in (1, 1, 0, 0, 1)]
    assert [s.prompts[0] for s in taken] == [1, 0, 2, 3, 4]
    assert tail.pop(0) is None and len(tail) == 0
    # the partition's queue carries what each rank holds
    prompts = [[i] + list(range(100, 130)) for i in range(6)]
    part = partition_plan(plan_prefix_sharing(prompts, share=False), [4] * 6, 2, tail_fraction=1.0,
                          held=[{}, {1: 16}, {0: 16}, {1: 16}, {}, {}])
    preferred = {0: None, 1: 1, 2: 0, 3: 1, 4: None, 5: None}
    assert all(s.preferred_rank == preferred[s.prompts[0]] for s in part.queue) and len(part.queue) == 5
