"""KV kept from one call to the next (`core/prefix_cache.py`, `Scheduler._kept_prefix_for`).

The oracle is the fake runner of the scheduling tests: it keeps every KV slot's token across calls, as the device's
pool does, and samples a function of the whole context it reads through the request's table. So a later call that
takes a block holding other tokens than its prompt's samples other tokens than a fresh engine given the same
prompts; a run that takes the right blocks samples exactly the same, with fewer tokens computed."""

from __future__ import annotations

import random

import pytest

from batchllm.config import SchedulerConfig
from batchllm.core.block_pool import BlockPool
from batchllm.core.engine_core import EngineCore
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.policies import ArrivalOrder
from batchllm.core.prefix_cache import MAX_TAILS_PER_NODE, PrefixCache
from batchllm.core.scheduler import Scheduler
from batchllm.core.work_units import build_submission
from batchllm.prefix import plan_prefix_sharing
from batchllm.request import Request
from batchllm.sampling_params import SamplingParams
from tests.unit.test_async_scheduling import STOP_IDS, AsyncPagedKVExecutor
from tests.unit.test_prefix_scheduling import grouped_prompts

# ----------------------------------------------------------------------------- the pool and the index


def test_revive_takes_free_blocks_out_of_the_queue_and_allocation_counts_generations():
    pool = BlockPool(5)
    assert pool.allocate(3) == [0, 1, 2] and pool.generations == [1, 1, 1, 0, 0]
    pool.free([1, 2, 0])
    assert pool.free_queue() == [3, 4, 1, 2, 0]
    pool.revive([2, 0])  # free blocks: out of the queue, contents (generations) kept
    assert pool.free_queue() == [3, 4, 1] and pool.ref_count(2) == 1 and pool.generations[2] == 1
    pool.revive([2])  # held already: one more reference
    assert pool.ref_count(2) == 2 and pool.num_free_blocks == 3
    assert pool.allocate(3) == [3, 4, 1] and pool.generations == [1, 2, 1, 1, 1]
    pool.free([2, 2, 0])
    assert pool.free_queue() == [2, 0]


def _recorded(block_size=4, num_blocks=16):
    pool = BlockPool(num_blocks)
    return pool, PrefixCache(block_size, pool.generations, num_blocks)


def test_a_record_is_found_by_its_full_blocks_tokens_and_lost_with_a_reused_block():
    pool, cache = _recorded(num_blocks=3)
    blocks = pool.allocate(3)
    prompt = list(range(10, 20))
    cache.record(prompt, [7, 8], 11, blocks)  # 11 tokens: two full blocks of 4
    pool.free(blocks)
    assert cache.match(prompt + [7, 8, 9], 5) == blocks[:2]
    assert cache.match(prompt, 1) == blocks[:1]  # at most max_blocks
    assert cache.match(prompt[:4] + [0] + prompt[5:], 5) == blocks[:1]  # the second block's tokens differ
    assert cache.match([99] + prompt[1:], 5) == []
    assert cache.match(prompt[:7], 5) == blocks[:1]  # only full blocks of the prompt asked about
    pool.allocate(2)  # the queue's front: blocks[0], blocks[1] handed out again
    assert cache.match(prompt, 5) == []


def test_outputs_recorded_are_part_of_the_tokens_and_clear_forgets():
    pool, cache = _recorded()
    blocks = pool.allocate(3)
    cache.record([1, 2, 3], [4, 5, 6, 7, 8, 9], 9, blocks)  # prompt 3 + 6 outputs: two full blocks
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8, 0], 9) == blocks[:2]
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 0], 9) == blocks[:1]
    cache.clear()
    assert cache.match([1, 2, 3, 4, 5, 6, 7, 8, 0], 9) == []


def test_a_node_whose_block_was_reused_takes_a_later_records_block():
    pool, cache = _recorded(num_blocks=4)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    first = pool.allocate(2)
    cache.record(prompt, [], 8, first)
    pool.free(first)
    assert cache.match(prompt + [0], 3) == first
    pool.allocate(4)  # every block handed out again
    again = [2, 3]
    cache.record(prompt, [], 8, again)  # (blocks 2, 3 now hold the same tokens)
    assert cache.match(prompt + [0], 3) == again


def test_records_owning_no_block_are_dropped_and_the_rest_stay_findable():
    """A call that never asks (one `run` job) keeps at most twice the pool's blocks in records: those whose every
    block a later record holds are dropped. Members of a long shared prefix (9 shared blocks, 1 of their own) stay
    findable as long as their own block is, however many came after."""
    pool, cache = _recorded(num_blocks=20)
    shared_blocks, shared = pool.allocate(9), list(range(36))
    members = []
    for i in range(60):
        [own] = pool.allocate(1)
        tokens = shared + [1000 + i] * 4
        cache.record(tokens, [], 40, shared_blocks + [own])
        pool.free([own])
        members.append((tokens, own))
    assert len(cache._records) <= 40
    found = [cache.match(t + [0], 10) == shared_blocks + [own] for t, own in members]
    assert found == [False] * 49 + [True] * 11  # the pool's 11 other blocks hold the last 11 members' own KV


# ----------------------------------------------------------------------------- the scheduler over calls


def _engine(num_blocks, block_size, budget, threshold, overlap):
    kv = KVCacheManager(num_blocks, block_size, keep_finished=True)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, kv_admission_threshold=threshold), kv, 512)
    return EngineCore(scheduler, AsyncPagedKVExecutor(block_size), async_scheduling=overlap)


def _call(engine, prompts, params, tag, abort_after=None):
    """Plan and run one call's prompts to the end; its outputs by prompt index (aborting the requests in
    `abort_after` after that many steps: they are left out)."""
    requests = [Request(f"{tag}-{i}", list(p), sp, arrival_index=i) for i, (p, sp) in enumerate(zip(prompts, params))]
    for r in build_submission(plan_prefix_sharing(prompts, mode="multi"), requests, ArrivalOrder(),
                              lambda r: r.sampling_params.max_tokens, f"{tag}-p-"):
        engine.add_request(r)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert steps < 5000, "no progress"
        if abort_after is not None and steps == abort_after[0]:
            engine.finish_requests([f"{tag}-{i}" for i in abort_after[1]], "abort")
    engine.drain()
    return {i: list(r.output_token_ids) for i, r in enumerate(requests)}


def _params(rng, n):
    return [SamplingParams(temperature=0, max_tokens=rng.randrange(1, 9),
                           stop_token_ids=STOP_IDS if rng.random() < 0.3 else None) for _ in range(n)]


@pytest.mark.parametrize("seed", range(24))
def test_later_calls_take_the_kv_earlier_calls_left_and_sample_what_a_fresh_engine_samples(seed):
    """Three calls on one engine: the second continues some of the first's sequences (prompt + outputs + a new
    turn), repeats some prompts and brings new ones; the third repeats the second's. Each call's tokens are those
    of a fresh engine given that call alone. Pools from roomy to a few sequences' worth (kept prefixes released
    and computed again), synchronous and asynchronous steps, stop tokens."""
    rng = random.Random(seed)
    block_size = rng.choice([4, 8])
    num_blocks = rng.choice([15, 18, 40, 400]) * 4 // block_size
    budget, threshold, overlap = rng.choice([16, 32, 64]), rng.choice([1.0, 4.0]), seed % 2 == 0
    engine = _engine(num_blocks, block_size, budget, threshold, overlap)

    first = grouped_prompts(rng, groups=3, members=3, prefix_len=rng.choice([6, 13]), suffix_len=(1, 12))
    first_params = _params(rng, len(first))
    out1 = _call(engine, first, first_params, "a")
    second = []
    for i, prompt in enumerate(first):
        kind = rng.random()
        if kind < 0.5:  # the conversation goes on
            second.append(prompt + out1[i] + [rng.randrange(1, 500) for _ in range(rng.randrange(1, 6))])
        elif kind < 0.8:
            second.append(list(prompt))
        else:
            second.append([rng.randrange(1, 500) for _ in range(rng.randrange(2, 20))])
    second_params = _params(rng, len(second))
    out2 = _call(engine, second, second_params, "b")
    assert out2 == _call(_engine(num_blocks, block_size, budget, threshold, overlap), second, second_params, "b"), seed
    out3 = _call(engine, second, second_params, "c")
    assert out3 == out2, seed
    assert engine.scheduler.kv.num_free_blocks == num_blocks, "every block returns to the pool"
    assert not engine.scheduler.requests and not engine.scheduler.ready_prefixes


def test_continued_conversations_compute_only_their_new_tokens():
    """Roomy pool: the second call's prompts continue the first's sequences; each takes the full blocks and the
    partial last block (its tail) the first left, and computes only what follows the first's last output but one
    (whose KV is never kept: only a step in flight writes it)."""
    rng = random.Random(5)
    engine = _engine(400, 4, 64, 1.0, overlap=True)
    first = [[rng.randrange(1, 500) for _ in range(9 + i)] for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True) for _ in first]
    out1 = _call(engine, first, params, "a")
    second = [p + out1[i] + [1, 2, 3] for i, p in enumerate(first)]
    kept_before, computed_before = engine.scheduler.stats.kept_prefill_tokens, engine.scheduler.stats.prefill_tokens
    out2 = _call(engine, second, params, "b")
    kept = engine.scheduler.stats.kept_prefill_tokens - kept_before
    expected = [len(p) + 5 for p in first]  # prompt + outputs but the last
    assert kept == sum(expected) and any(k % 4 for k in expected)
    assert engine.scheduler.stats.prefill_tokens - computed_before == sum(len(s) for s in second) - sum(expected)
    assert out2 == _call(_engine(400, 4, 64, 1.0, overlap=True), second, params, "b")


def test_members_of_a_shared_prefix_take_their_own_kept_blocks_past_it_without_copying_its_partial_block():
    """Continued sequences grouped under their shared 10-token prefix: the prefix takes its 2 full kept blocks and
    a copy of its tail, each member the parent's full blocks and its own kept blocks from the one over the
    prefix's partial block on, then a copy of its tail: the only copies are the tails' (no copy-on-write of the
    prefix's partial block), and each computes only what follows its kept KV."""
    engine = _engine(400, 4, 64, 1.0, overlap=True)
    prefix = list(range(50, 60))
    first = [prefix + [100 + i] * (5 + 2 * i) for i in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True) for _ in first]
    out1 = _call(engine, first, params, "a")
    second = [p + out1[i] + [7] for i, p in enumerate(first)]
    stats = engine.scheduler.stats
    kept, copies, computed = stats.kept_prefill_tokens, stats.num_block_copies, stats.prefill_tokens
    out2 = _call(engine, second, params, "b")
    own = [len(p) + 3 for p in first]  # each first sequence's recorded tokens, its tail's included
    # the prefix takes its 2 full blocks and its own tail (the first call's prefix left it): it computes nothing,
    # ready at admission, and its members start in the same step
    assert stats.kept_prefill_tokens - kept == 10 + sum(k - 10 for k in own) and any(k % 4 for k in own)
    assert stats.num_prefixes_kept_whole == 1
    assert stats.num_block_copies - copies == 1 + sum(k % 4 != 0 for k in own)  # the prefix's tail, members' tails
    assert stats.prefill_tokens - computed == sum(len(p) - k for p, k in zip(second, own))
    assert out2 == _call(_engine(400, 4, 64, 1.0, overlap=True), second, params, "b")


def test_a_tail_is_found_as_far_as_the_prompt_agrees_and_only_while_unchanged():
    pool = BlockPool(8)
    cache = PrefixCache(4, pool.generations, 8, keep_tails=True)
    blocks = pool.allocate(3)
    prompt = list(range(10, 20))
    cache.record(prompt, [], 10, blocks)  # two full blocks, a tail of 2 tokens in the third
    pool.free(blocks)
    assert cache.match_tail(prompt + [5], 10) == (blocks[:2], (blocks[2], 2))
    assert cache.match_tail(prompt + [5], 10) == (blocks[:2], (blocks[2], 2))  # (found again: it is copied, not taken)
    assert cache.match_tail(prompt[:9] + [99, 5], 10) == (blocks[:2], (blocks[2], 1))  # agrees on one token
    assert cache.match_tail(prompt[:8] + [99, 5], 10) == (blocks[:2], None)
    assert cache.match_tail(prompt + [5], 9) == (blocks[:2], (blocks[2], 1))  # at most max_tokens in all
    assert cache.match_tail(prompt + [5], 8) == (blocks[:2], None)
    assert cache.match_tail(prompt[:8] + [99, 19, 5], 10) == (blocks[:2], None)  # only a later token agrees: no run
    assert cache.match(prompt + [5], 3) == blocks[:2]  # (full blocks only)
    handed = pool.allocate(8)
    assert handed[-1] == blocks[2]  # handed out again: its generation moves on, never offered again
    pool.free(handed)
    assert cache.match_tail(prompt + [5], 10)[1] is None
    full_only = PrefixCache(4, pool.generations, 8)  # (keep_tails off: full blocks only)
    table = pool.allocate(3)
    full_only.record(prompt, [], 10, table)
    assert full_only.match_tail(prompt + [5], 10) == (table[:2], None)


def _run_requests(engine, prompts, tag, max_tokens=3):
    """Add each prompt as its own request (no plan: all in one step's admission) and run them to the end."""
    requests = [Request(f"{tag}-{i}", list(p), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        arrival_index=i) for i, p in enumerate(prompts)]
    for r in requests:
        engine.add_request(r)
    while engine.has_unfinished():
        engine.step()
    engine.drain()
    return [list(r.output_token_ids) for r in requests], [r.kept_tokens for r in requests]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_tail_is_copied_by_each_request_that_takes_it_and_stays_as_it_was(overlap):
    """`first` leaves a tail of 2 tokens. In one call, `diverging` agrees with its first token only, `continuing`
    with both: each takes a copy of it and writes its own tokens into the copy, so a later call's `again` still
    finds the tokens the tail held (a request writing into the tail itself would have changed them)."""
    engine = _engine(64, 4, 64, 1.0, overlap=overlap)
    first = list(range(1, 11))
    assert _run_requests(engine, [first], "a", max_tokens=1)[1] == [0]  # its 10 tokens kept: 2 full blocks, a tail
    diverging, continuing = first[:9] + [50, 51, 52, 53], first + [7, 77, 78]  # (the first's outputs: not kept)
    copies = engine.scheduler.stats.num_block_copies
    out, kept = _run_requests(engine, [diverging, continuing], "b")
    assert kept == [9, 10] and engine.scheduler.stats.num_block_copies - copies == 2
    assert out == _run_requests(_engine(64, 4, 64, 1.0, overlap), [diverging, continuing], "b")[0]
    again = first + [9, 9, 9]
    out, kept = _run_requests(engine, [again], "c")
    assert out == _run_requests(_engine(64, 4, 64, 1.0, overlap), [again], "c")[0]
    assert kept == [10]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_member_whose_tail_alone_reaches_past_its_fork_point_takes_it_instead_of_its_parents_partial_block(overlap):
    """`first` leaves 2 full blocks and a tail of 2 tokens. The next call groups `continuing` (the first 10 tokens and
    more) and `diverging` under their shared 9 tokens: the prefix takes the 2 full blocks and its ninth token's KV
    from the tail; `continuing`'s kept full blocks end before its fork point, its tail past it, so it takes the
    parent's full blocks and a copy of the tail, not a copy of the parent's partial block, and computes from its
    eleventh token; `diverging` forks as planned."""
    engine = _engine(64, 4, 64, 1.0, overlap=overlap)
    first = list(range(1, 11))
    assert _call(engine, [first], [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)], "a")
    continuing, diverging = first + [7, 77], first[:9] + [50, 51, 52]
    params = [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)] * 2
    stats = engine.scheduler.stats
    kept, computed, copies = stats.kept_prefill_tokens, stats.prefill_tokens, stats.num_block_copies
    out = _call(engine, [continuing, diverging], params, "b")
    assert out == _call(_engine(64, 4, 64, 1.0, overlap), [continuing, diverging], params, "b")
    # the prefix takes its 2 full blocks and a copy of the tail's first token: all of it, ready at admission
    assert stats.kept_prefill_tokens - kept == 9 + 1  # the prefix's 9 tokens, the member's one past them
    assert stats.prefill_tokens - computed == 2 + 3  # the members' own
    # the prefix's and `continuing`'s copies of the tail; `diverging`'s of the prefix's partial block, made in the
    # same step from the tail (the runner gathers a step's sources at once: the prefix's copy is not made yet)
    assert stats.num_block_copies - copies == 3 and stats.num_prefixes_kept_whole == 1


def test_in_a_full_pool_the_tail_is_handed_out_as_its_own_copy():
    """Three blocks, all the first sequence's: its continuation takes the 2 full blocks, and the one free block left
    for the tail's copy is the tail itself, handed out as it is (nothing copied, nothing computed again)."""
    engine = _engine(3, 4, 64, 1.0, overlap=False)
    first = list(range(1, 11))
    one = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)]
    _call(engine, [first], one, "a")
    stats = engine.scheduler.stats
    kept, copies = stats.kept_prefill_tokens, stats.num_block_copies
    out = _call(engine, [first + [7]], one, "b")
    assert out == _call(_engine(3, 4, 64, 1.0, False), [first + [7]], one, "b")
    assert stats.kept_prefill_tokens - kept == 10 and stats.num_block_copies == copies


def test_a_tail_stays_findable_when_the_admission_taking_it_fails():
    """Five blocks, the first sequence's 3 kept, a tail of 2 tokens in the third. The next call's new prompt takes 2
    blocks; its continuation then finds the 2 full blocks and the tail, but the one block left for the rest (the tail
    itself) is admitted only when the new prompt ends: that failed admission allocated nothing, so the tail is still
    there, whole, for the admission that goes through."""
    engine = _engine(5, 4, 64, 4.0, overlap=False)
    first = list(range(1, 11))
    one = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)]
    _call(engine, [first], one, "a")
    stats = engine.scheduler.stats
    kept = stats.kept_prefill_tokens
    prompts = [list(range(100, 108)), first + [7, 7, 7]]
    out = _call(engine, prompts, one * 2, "b")
    assert out == _call(_engine(5, 4, 64, 4.0, False), prompts, one * 2, "b")
    assert stats.kept_prefill_tokens - kept == 10


def test_copies_of_a_step_that_schedules_no_token_go_with_the_next_batch_first():
    """A prefix ready at admission whose members could not start leaves a step of no tokens: its tail's copy is not
    lost with the empty batch but made before the next step (and a later member's copy from the prefix's block is
    made from the tail, as if in one batch)."""
    engine = _engine(16, 4, 64, 1.0, overlap=False)
    scheduler = engine.scheduler
    assert scheduler._make_batch(None, [], {5: 3}).num_seqs == 0
    engine.add_request(Request("r", [1, 2, 3], SamplingParams(temperature=0, max_tokens=1), arrival_index=0))
    batch = scheduler.schedule()
    assert batch.num_seqs == 1 and batch.block_copies == [(3, 5)]
    assert scheduler._unsent_copies == {}
    copies = {5: 3}  # (that batch's copies, destination -> source)

    def pairs():
        return [(source, destination) for destination, source in copies.items()]

    scheduler._add_copy(copies, (5, 9))
    assert pairs() == [(3, 5), (3, 9)]
    scheduler._add_copy(copies, (5, 3))  # (block 3 already holds what 5 will: nothing to copy)
    assert pairs() == [(3, 5), (3, 9)]
    scheduler._add_copy(copies, (7, 5))  # (block 5 handed out again since: the new copy alone)
    assert pairs() == [(3, 9), (7, 5)]


@pytest.mark.parametrize("chunked", [False, True])
def test_a_tail_taken_by_an_admission_that_fails_stays_findable(chunked):
    """The continuation takes its kept KV, tail included, then cannot start this step (without chunked prefill its
    rest does not fit what the new prompt ahead left of the budget): its blocks are freed, the tail's copy unmade,
    and the next step's admission takes the tail again."""
    engine = EngineCore(Scheduler(SchedulerConfig(max_num_batched_tokens=16, enable_chunked_prefill=chunked),
                                  KVCacheManager(64, 4, keep_finished=True), 512), AsyncPagedKVExecutor(4))
    first, kept = _run_requests(engine, [list(range(1, 10))], "a")  # 11 tokens kept: 2 full blocks, a tail of 3
    continued = list(range(1, 10)) + first[0] + [7, 7]
    out, kept = _run_requests(engine, [list(range(100, 114)), continued], "b")
    assert kept[1] == 11
    assert out == _run_requests(_engine(64, 4, 16, 1.0, False), [list(range(100, 114)), continued], "b")[0]
    assert engine.scheduler.kv.num_free_blocks == 64


def test_a_wanted_tail_is_handed_out_after_the_others():
    """As the wanted full blocks below: B's tail, freed before A's blocks, is queued last too."""
    engine = _engine(12, 4, 64, 1.0, overlap=False)
    b_prompt, a_prompt = list(range(1, 11)), list(range(101, 109))  # B: 2 full blocks and a tail of 2
    one = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)] * 2
    out = _call(engine, [b_prompt, a_prompt], one, "a")
    new, continued = list(range(200, 233)), b_prompt + out[0] + [7, 7]
    kept = engine.scheduler.stats.kept_prefill_tokens
    _call(engine, [new, continued], one, "b")
    assert engine.scheduler.stats.kept_prefill_tokens - kept == 10


def test_the_longest_agreeing_of_a_nodes_latest_tails_is_taken_and_a_record_owning_only_its_tail_is_kept():
    pool = BlockPool(2 * MAX_TAILS_PER_NODE + 8)
    cache = PrefixCache(4, pool.generations, pool.num_blocks, keep_tails=True)
    head = [1, 2, 3, 4]
    # records with the same full block and their own tails: of those starting with 5, the first and second are
    # pushed out of the latest MAX_TAILS_PER_NODE by the last two, the first's row of the ring by a shorter tail;
    # the one starting with 7 stays (tails with another first token are not in the same ring)
    fillers = [[5, 9, i % 3] for i in range(MAX_TAILS_PER_NODE - 5)]
    tails = [[5, 6, 7], [7], [5, 6], [5, 6, 7], [5, 8], [5, 6, 8], *fillers, [5], [5, 8, 3]]
    blocks = []
    for t in tails:
        table = pool.allocate(2)
        cache.record(head + t, [], 4 + len(t), table)
        pool.free(table)
        blocks.append(table[1])
    cache.match([0], 1)  # (indexes them)
    # of the latest, the one agreeing longest
    assert cache.match_tail(head + [5, 6, 8, 0], 7)[1] == (blocks[5], 3)
    assert cache.match_tail(head + [5, 6, 7, 0], 7)[1] == (blocks[3], 3)
    assert cache.match_tail(head + [5, 6, 7, 0], 6)[1][1] == 2  # at most max_tokens
    assert cache.match_tail(head + [5, 8, 3, 0], 7)[1] == (blocks[-1], 3)
    assert cache.match_tail(head + [7, 0], 5)[1] == (blocks[1], 1)  # its own ring: not pushed out
    assert cache.match_tail(head + [6, 0], 5)[1] is None  # none agrees on a first token
    assert cache.match_tail(head + [5, 99, 7, 0], 7)[1][1] == 1  # agreement is a leading run: [5, 6, 7] gives 1
    pool.allocate(len(pool.free_queue()))  # every block handed out again: none offered
    assert cache.match_tail(head + [5, 6, 8, 0], 7)[1] is None
    # compaction keeps a record owning only its tail (its full block taken over by later records)
    pool2 = BlockPool(2)
    cache2 = PrefixCache(4, pool2.generations, 2, keep_tails=True)
    table = pool2.allocate(2)
    prompt = list(range(10, 16))
    cache2.record(prompt, [], 6, table)
    pool2.free(table)
    for _ in range(4):
        cache2.record(prompt[:4], [], 4, table[:1])
    assert cache2.match_tail(prompt + [0], 6) == ([table[0]], (table[1], 2))


def test_blocks_a_later_call_will_take_are_handed_out_after_the_others():
    """The pool reuses its oldest free blocks first: B's, freed before A's, would go to the new prompt admitted
    ahead of B's continuation. Found wanted when the call is added, they are queued last, and A's go instead."""
    engine = _engine(12, 4, 64, 1.0, overlap=False)
    b_prompt, a_prompt = list(range(1, 9)), list(range(101, 109))
    one = [SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)] * 2
    out = _call(engine, [b_prompt, a_prompt], one, "a")  # B then A: B's 2 blocks freed first
    assert engine.scheduler.kv.pool.free_queue()[-4:-2] == engine.scheduler.kv.match(b_prompt + [0], 8)
    new, continued = list(range(200, 233)), b_prompt + out[0] + [7, 7]  # 33 tokens: 9 blocks; B's: 11
    kept = engine.scheduler.stats.kept_prefill_tokens
    _call(engine, [new, continued], one, "b")
    assert engine.scheduler.stats.kept_prefill_tokens - kept == 8


def test_aborted_requests_leave_nothing_and_a_failed_step_forgets_everything():
    engine = _engine(400, 4, 64, 1.0, overlap=False)
    prompts = [[10 + i] * 12 for i in range(4)]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True) for _ in prompts]
    _call(engine, prompts, params, "a", abort_after=(2, [0, 1]))  # 0 and 1 aborted, 2 and 3 finish
    kept = engine.scheduler.stats.kept_prefill_tokens
    _call(engine, prompts, params, "b")
    assert engine.scheduler.stats.kept_prefill_tokens - kept == 2 * 8  # prompts 2 and 3: 2 of their 3 blocks

    class Failing:
        def execute(self, batch):
            raise RuntimeError("device fault")

    engine.executor = Failing()
    engine.add_request(Request("x", [1] * 9, SamplingParams(max_tokens=2)))
    with pytest.raises(RuntimeError, match="device fault"):
        engine.step()
    assert engine.scheduler.kv.match(prompts[2] + [0], 12) == []


class _FailingAt(AsyncPagedKVExecutor):
    """Runs steps as the device would, but the `fail_at`-th submitted step never runs: its result raises."""

    def __init__(self, block_size, fail_at):
        super().__init__(block_size)
        self.fail_at, self.submitted = fail_at, 0

    def submit(self, batch):
        self.submitted += 1
        if self.submitted != self.fail_at:
            return super().submit(batch)

        class Failed:
            def result(self):
                raise RuntimeError("device fault")

        return Failed()


def _async_engine(executor, budget=64):
    kv = KVCacheManager(64, 4, keep_finished=True)
    return EngineCore(Scheduler(SchedulerConfig(max_num_batched_tokens=budget), kv, 512), executor,
                      async_scheduling=True)


def test_a_step_in_flight_that_fails_when_drained_forgets_what_its_requests_left():
    """A request stopped from outside (a stop string) while a step decodes it on a placeholder is recorded with
    that position; the step then fails when the engine is drained (`LLM._abort_rest`): nothing may be found."""
    engine = _async_engine(_FailingAt(4, fail_at=5))
    request = Request("r", list(range(1, 9)), SamplingParams(temperature=0, max_tokens=20))
    engine.add_request(request)
    for _ in range(4):  # submits steps 1-4 (collects 1-3); the 5th call submits step 5, which never runs
        engine.step()
    engine.step()
    assert request.num_computed_tokens == 12 and len(request.output_token_ids) == 4
    engine.finish_requests(["r"], "stop")
    assert engine.scheduler.kv.match(list(range(1, 9)) + request.output_token_ids + [0], 12)  # (recorded)
    with pytest.raises(RuntimeError, match="device fault"):
        engine.drain()
    assert engine.scheduler.kv.match(list(range(1, 9)) + request.output_token_ids + [0], 12) == []


def test_a_prefix_whose_last_chunk_failed_is_not_recorded_when_its_members_are_aborted():
    """The step completing a shared prefix fails; the caller aborts the members, which drops the prefix: its KV
    (never written) must not be recorded after the failure cleared the cache."""
    engine = _async_engine(_FailingAt(4, fail_at=3), budget=4)
    prefix = list(range(1, 13))
    members = [Request(f"m{i}", prefix + [50 + i], SamplingParams(temperature=0, max_tokens=3), arrival_index=i)
               for i in range(2)]
    for r in build_submission(plan_prefix_sharing([m.prompt_token_ids for m in members], mode="multi"), members,
                              ArrivalOrder(), lambda r: 3, "p-"):
        engine.add_request(r)
    with pytest.raises((RuntimeError, KeyError)):  # (the fake runner already fails the step after, reading the
        for _ in range(6):                         # prefix's unwritten slots: on a device it would read garbage)
            engine.step()
    engine.finish_requests(["m0", "m1"], "abort")
    assert not engine.scheduler.requests
    assert engine.scheduler.kv.match(prefix + [0], 12) == []


def test_a_request_admitted_again_counts_only_the_kept_tokens_it_took_this_time():
    engine = _engine(64, 4, 64, 1.0, overlap=False)
    prompt = list(range(1, 14))
    _call(engine, [prompt], [SamplingParams(temperature=0, max_tokens=3)], "a")
    request = Request("b", prompt + [7], SamplingParams(temperature=0, max_tokens=3))
    scheduler = engine.scheduler
    engine.add_request(request)
    engine.step()
    assert request.kept_tokens == 13 and scheduler._wanted_blocks == []  # 3 full blocks, 1 token of the tail
    scheduler._preempt(request)  # (its kept blocks back in the pool, then handed out to another table)
    scheduler.kv.allocate_slots("other", 4 * scheduler.kv.num_free_blocks)
    scheduler.kv.free("other")
    engine.step()
    assert request.status.value == "running" and request.kept_tokens == 0


def test_prompt_logprobs_requests_compute_their_whole_prompt():
    engine = _engine(400, 4, 64, 1.0, overlap=False)
    prompt = list(range(1, 14))
    _call(engine, [prompt], [SamplingParams(temperature=0, max_tokens=3)], "a")
    kept = engine.scheduler.stats.kept_prefill_tokens
    asking = Request("b", list(prompt), SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0))
    engine.add_request(asking)
    assert not asking.may_reuse_kept_kv and engine.scheduler.stats.kept_prefill_tokens == kept
    engine.finish_requests(["b"], "abort")
    _call(engine, [prompt], [SamplingParams(temperature=0, max_tokens=3)], "c")
    assert engine.scheduler.stats.kept_prefill_tokens == kept + 12


def test_without_keep_finished_nothing_is_found():
    kv = KVCacheManager(64, 4)
    engine = EngineCore(Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, 512), AsyncPagedKVExecutor(4))
    prompt = list(range(1, 14))
    for tag in "ab":
        _call(engine, [prompt], [SamplingParams(temperature=0, max_tokens=3)], tag)
    assert engine.scheduler.stats.kept_prefill_tokens == 0 and kv.cache is None
