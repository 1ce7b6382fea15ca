"""Shared prefixes in the scheduler, with a fake runner that simulates a paged KV cache.

`PagedKVExecutor` reads each request's context back through its block table before writing its
new tokens, and samples a token that depends on the whole context. A block shared wrongly, a
missing copy-on-write, or a block freed while still in use changes the tokens, so "same tokens
with sharing on and off" checks the block bookkeeping itself.
"""

from __future__ import annotations

import random

import pytest

from batchllm.config import SchedulerConfig
from batchllm.core.engine_core import EngineCore
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.policies import ArrivalOrder, DecodeWeightedOrder, PrefillLengthOrder, WorkUnit
from batchllm.core.scheduler import Scheduler
from batchllm.core.work_units import build_submission
from batchllm.outputs import RunnerOutput
from batchllm.prefix import PrefixGroup, PrefixPlan, plan_prefix_sharing
from batchllm.request import Request
from batchllm.sampling_params import SamplingParams


class PagedKVExecutor:
    def __init__(self, block_size):
        self.bs = block_size
        self.slots = {}
        self.batches = []
        self.tables = {}  # rebuilt from the scheduler's diffs, as the real runner does

    def execute(self, batch):
        self.batches.append(batch)
        for rid in batch.finished_request_ids:
            self.tables.pop(rid, None)
        # as the runner copies (`ModelRunner._copy_blocks`): every source gathered, then every destination written
        # whole (a slot the source never held is unwritten in the copy too)
        gathered = [(dst, [self.slots.get((src, off)) for off in range(self.bs)]) for src, dst in batch.block_copies]
        for dst, values in gathered:
            for off, value in enumerate(values):
                if value is None:
                    self.slots.pop((dst, off), None)
                else:
                    self.slots[(dst, off)] = value
        out = {}
        group_kv = {}
        for r in batch.requests:
            bs = self.bs
            if r.block_table_start == 0:
                self.tables[r.request_id] = list(r.block_ids)
            else:
                assert len(self.tables[r.request_id]) == r.block_table_start, "diffs arrive in order"
                self.tables[r.request_id] += r.block_ids
            table = self.tables[r.request_id]
            context = [self.slots[(table[p // bs], p % bs)] for p in range(r.start_position)]
            for prefix_id, length in r.shared_prefixes:  # the runner may read these keys through any member's table
                assert length <= r.start_position, "shared positions are computed before a member runs"
                shared = context[:length]
                assert group_kv.setdefault(prefix_id, shared) == shared, "members hold the same shared KV"
            for j, t in enumerate(r.token_ids):
                p = r.start_position + j
                self.slots[(table[p // bs], p % bs)] = t
            if r.sampling is not None:
                full = context + r.token_ids
                out[r.request_id] = (sum(t * (i + 1) for i, t in enumerate(full)) + 7) % 997
        return RunnerOutput(out)


def run(prompts, *, sharing, num_blocks=200, block_size=4, budget=32, max_tokens=5, max_seqs=None,
        threshold=1.0, mode="multi", order=None, check=None):
    kv = KVCacheManager(num_blocks, block_size)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, kv_admission_threshold=threshold)
    sched = Scheduler(config, kv, max_model_len=512)
    executor = PagedKVExecutor(block_size)
    engine = EngineCore(sched, executor)
    per_prompt = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    requests = [Request(f"r{i}", list(p), SamplingParams(temperature=0, max_tokens=m), arrival_index=i)
                for i, (p, m) in enumerate(zip(prompts, per_prompt))]
    if isinstance(sharing, PrefixPlan):
        plan = sharing
    elif sharing:
        plan = plan_prefix_sharing(prompts, mode=mode)
    else:
        plan = PrefixPlan.without_sharing([len(p) for p in prompts], mode)
    for r in build_submission(plan, requests, order or ArrivalOrder(), lambda r: r.sampling_params.max_tokens, "t-"):
        engine.add_request(r)
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        assert steps < 5000, "the batch stopped making progress (livelock)"
        if check:
            check(sched)
    assert kv.num_free_blocks == num_blocks, "every block returns to the pool"
    assert sched.stats.peak_used_blocks <= num_blocks
    return {r.request_id: r.output_token_ids for r in requests}, sched, executor, plan


def grouped_prompts(rng, groups=3, members=4, prefix_len=10, suffix_len=(1, 9)):
    prompts = []
    for _g in range(groups):
        prefix = [rng.randrange(1, 500) for _ in range(prefix_len)]
        for _ in range(members):
            prompts.append(prefix + [rng.randrange(1, 500) for _ in range(rng.randrange(*suffix_len))])
    rng.shuffle(prompts)
    return prompts


def test_prefix_is_computed_once_then_members_fork_with_copy_on_write():
    prefix = list(range(1, 11))  # 10 tokens: 2 full blocks of 4 + 2 tokens in a partial block
    prompts = [prefix + [50 + i, 60 + i, 70 + i] for i in range(3)]
    out, sched, ex, plan = run(prompts, sharing=True, budget=64)
    first = ex.batches[0]
    assert [(r.request_id, r.start_position, len(r.token_ids), r.sampling) for r in first.requests] == [
        ("t-g0", 0, 10, None)]
    second = ex.batches[1]
    assert [(r.start_position, len(r.token_ids)) for r in second.requests] == [(10, 3)] * 3
    prefix_blocks = first.requests[0].block_ids
    for r in second.requests:
        assert r.block_ids[:2] == prefix_blocks[:2], "full prefix blocks are shared"
        assert r.block_ids[2] != prefix_blocks[2], "the partial block is each member's own copy"
    assert sorted(src for src, _ in second.block_copies) == [prefix_blocks[2]] * 3
    assert sched.stats.prefill_tokens == plan.prefill_tokens == 10 + 3 * 3
    unshared, *_ = run(prompts, sharing=False)
    assert out == unshared


def test_prefix_blocks_live_exactly_until_the_last_member_finishes():
    prefix = list(range(1, 9))  # exactly 2 blocks
    prompts = [prefix + [40 + i] * (i + 1) for i in range(3)]
    seen = []

    def check(sched):
        node = [r for r in sched.requests.values() if r.is_prefix]
        members = [r for r in sched.requests.values() if not r.is_prefix]
        seen.append((len(node), len(members)))
        if members:
            assert node, "a prefix block was freed while a member still lives"
            blocks = sched.kv.block_table(node[0].request_id)
            assert all(sched.kv.pool.ref_count(b) >= 1 for b in blocks)
        else:
            assert not node, "the prefix outlived its last member"

    # different max_tokens per member: they finish at different steps
    run(prompts, sharing=True, max_tokens=[2, 5, 9], check=check)
    assert (1, 3) in seen and (1, 1) in seen and seen[-1] == (0, 0)


@pytest.mark.parametrize("seed", range(12))
def test_sharing_on_and_off_give_the_same_tokens(seed):
    rng = random.Random(seed)
    prompts = grouped_prompts(rng, groups=rng.randrange(1, 4), members=rng.randrange(2, 6),
                              prefix_len=rng.randrange(1, 14))
    prompts += [[rng.randrange(1, 500) for _ in range(rng.randrange(2, 12))] for _ in range(3)]
    base, *_ = run(prompts, sharing=False)
    for mode in ("single", "multi"):
        shared, sched, _, plan = run(prompts, sharing=True, mode=mode)
        assert shared == base
        assert sched.stats.prefill_tokens == plan.prefill_tokens


def test_nested_groups_share_each_level_once():
    instruction = list(range(1, 7))  # 6 tokens shared by everyone
    docs = [[100 + d] * 5 for d in range(2)]  # each document shared by 3 prompts
    prompts = [instruction + docs[d] + [200 + 10 * d + q] * 2 for d in range(2) for q in range(3)]
    out, sched, ex, plan = run(prompts, sharing=True, mode="multi")
    assert sorted((g.prefix_len, g.parent is None) for g in plan.groups) == [(6, True), (11, False), (11, False)]
    assert sched.stats.prefill_tokens == 6 + 2 * 5 + 6 * 2
    base, *_ = run(prompts, sharing=False)
    assert out == base


def test_group_larger_than_the_running_batch():
    rng = random.Random(5)
    prompts = grouped_prompts(rng, groups=1, members=9)
    base, *_ = run(prompts, sharing=False, max_seqs=2)
    out, sched, ex, plan = run(prompts, sharing=True, max_seqs=2)
    assert out == base
    assert max(sum(1 for r in b.requests) for b in ex.batches) <= 2
    assert sched.stats.prefill_tokens == plan.prefill_tokens


@pytest.mark.parametrize("seed", range(8))
def test_forced_preemption_with_groups_keeps_tokens_and_frees_everything(seed):
    rng = random.Random(100 + seed)
    prompts = grouped_prompts(rng, groups=3, members=4, prefix_len=9)
    base, *_ = run(prompts, sharing=False)
    # 14 blocks of 4 tokens for 12 requests of ~25 tokens each: heavy preemption, overcommitted admission
    out, sched, _, _ = run(prompts, sharing=True, num_blocks=14, max_tokens=8, threshold=4.0)
    again, *_ = run(prompts, sharing=False, num_blocks=14, max_tokens=8, threshold=4.0)
    full, *_ = run(prompts, sharing=False, max_tokens=8)
    assert out == again == full
    assert sched.stats.num_preemptions > 0


def test_prompts_sharing_less_than_a_block():
    prompts = [[7, 8, 9 + i, 20 + i, 30] for i in range(4)] + [[7, 8, 100, 101]]
    base, *_ = run(prompts, sharing=False, block_size=16)
    out, sched, ex, plan = run(prompts, sharing=True, block_size=16)
    assert plan.groups and plan.groups[0].prefix_len == 2
    assert out == base
    assert sched.stats.num_block_copies == 5  # every member copies the single partial block


def test_memory_admission_keeps_projected_use_within_the_pool():
    rng = random.Random(9)
    prompts = grouped_prompts(rng, groups=4, members=5, prefix_len=12)

    def check(sched):
        assert sched.admission.projected_blocks <= sched.admission.capacity or len(sched.running) <= 1
        assert sched.kv.pool.num_used_blocks <= sched.kv.pool.num_blocks

    out, sched, _, _ = run(prompts, sharing=True, num_blocks=40, max_tokens=6, check=check)
    assert sched.stats.num_preemptions == 0, "exact projections (ignore_eos-like fake) never overcommit"


def test_orders_of_work_units():
    small_decode_heavy = WorkUnit(first_arrival=2, prefill_tokens=100, expected_decode_tokens=800)
    big_prefill = WorkUnit(first_arrival=0, prefill_tokens=5000, expected_decode_tokens=1600)
    medium = WorkUnit(first_arrival=1, prefill_tokens=1000, expected_decode_tokens=100)
    units = [big_prefill, medium, small_decode_heavy]
    assert sorted(units, key=ArrivalOrder().sort_key) == [big_prefill, medium, small_decode_heavy]
    assert sorted(units, key=PrefillLengthOrder().sort_key) == [small_decode_heavy, medium, big_prefill]
    # decode per prefill token: 8.0, 0.32, 0.1
    assert sorted(units, key=DecodeWeightedOrder().sort_key) == [small_decode_heavy, big_prefill, medium]


def test_idle_prefixes_are_released_for_a_member_that_needs_the_pool():
    """Regression: released prefixes used to be requeued ahead of the blocked member, recomputed
    at once and released again, forever."""
    long_member = [1, 2] + list(range(100, 158))  # 60 tokens: 15 blocks of 4 (+1 for output)
    prompts = [long_member, [1, 2, 3, 4]]
    for g in range(3):
        head = [200 + g] * 5
        prompts += [head + [300 + g, 301], head + [310 + g, 311, 312]]
    base, *_ = run(prompts, sharing=False, num_blocks=20, max_tokens=4)
    out, sched, _, _ = run(prompts, sharing=True, num_blocks=20, max_tokens=4)
    assert out == base


def test_nested_idle_prefixes_do_not_livelock_a_long_member():
    """Regression (the e2e forced-preemption hang): an instruction shared by all, two nested
    groups, and a long member directly under the instruction that needs most of the pool."""
    instruction = [1, 2, 3]
    long_member = instruction + list(range(100, 157))  # 60 tokens
    prompts = [long_member]
    for g in range(2):
        doc = [200 + g] * 6
        prompts += [instruction + doc + [300 + g, 301], instruction + doc + [310 + g, 311, 312]]
    base, *_ = run(prompts, sharing=False, num_blocks=20, max_tokens=4)
    out, sched, _, plan = run(prompts, sharing=True, num_blocks=20, max_tokens=4, order=PrefillLengthOrder())
    assert any(g.parent is not None for g in plan.groups)
    assert out == base


def test_nested_groups_under_memory_pressure_compute_each_prefix_once():
    """Regression (the snippet workload: 8,000 requests took 105k steps and recomputed 150x the
    plan): many one-token top-level prefixes, each over nested groups whose prefixes are bigger
    than the pool holds at once. Admitting a prefix without its members' memory filled the pool
    with READY prefixes whose members could not follow; they were released and recomputed."""
    rng = random.Random(0)
    prompts = []
    for top in range(6):
        for _ in range(4):
            prefix = [top + 1] + [rng.randrange(1000, 5000) for _ in range(40)]
            for m in range(rng.randint(1, 4)):
                prompts.append(prefix + [100 + m] + [rng.randrange(1000, 5000) for _ in range(6)])
    rng.shuffle(prompts)
    base, *_ = run(prompts, sharing=False, num_blocks=100, budget=64, max_tokens=5)
    out, sched, _, plan = run(prompts, sharing=True, num_blocks=100, budget=64, max_tokens=5)
    assert any(g.parent is not None for g in plan.groups), "the plan nests groups"
    assert out == base
    assert sched.stats.num_prefix_releases == 0
    assert sched.stats.prefill_tokens == plan.summary()["prefill_tokens"], "every prefix computed exactly once"


@pytest.mark.parametrize("num_blocks", [8, 10, 12, 20])
def test_a_group_larger_than_the_pool_works_its_nested_groups_depth_first(num_blocks):
    """Regression (a probe's batch of n=2 requests sharing an instruction never finished in a 14-block cache):
    a top-level group whose nested groups together exceed the pool, admitted because nothing else ran. Its
    nested prefixes queued ahead of their own members: they filled the pool, were released to unblock it,
    and were computed again, forever. Depth first, each nested group's members run before its siblings.
    Then (154, 95, 93 prefill tokens in 8, 10, 12 blocks for a plan of 62) siblings admitted in the same
    step still outgrew the pool and were recomputed: a sibling now starts only where its group is projected
    to fit beside the open ones (one at a time here, two in 20 blocks)."""
    base = list(range(1, 13))
    prompts = [base + [100 + 3 * j, 101 + 3 * j, 102 + 3 * j, 200 + 2 * j + m] for j in range(10) for m in range(2)]
    open_nested = []

    def check(s):
        open_nested.append(sum(p.is_prefix and p.parent is not None for p in s.running + s.ready_prefixes))

    unshared, *_ = run(prompts, sharing=False, num_blocks=num_blocks, max_tokens=7, budget=64)
    out, sched, _, plan = run(prompts, sharing=True, num_blocks=num_blocks, max_tokens=7, budget=64, check=check)
    assert sum(g.parent is not None for g in plan.groups) == 10
    assert out == unshared
    assert sched.stats.num_prefix_releases == 0, "no prefix is computed twice"
    recomputed = sched.stats.prefill_tokens - plan.summary()["prefill_tokens"]
    if num_blocks >= 10:  # a nested group (base 3 blocks, its prefix 1, two members of 3) fits whole
        assert recomputed == 0
    else:  # its second member is preempted once at most: its suffix token and 6 outputs again
        assert recomputed <= 10 * (1 + 6)
    assert max(open_nested) == (2 if num_blocks >= 20 else 1), "as many nested groups as are projected to fit"


def test_a_step_emptied_by_preemption_admits_the_ready_members():
    """Regression: the one running request (31 tokens, plus 6 outputs, in a pool of 12 blocks of 4)
    could not grow beside a READY prefix kept for its waiting members, preempted itself, and the
    step, which admits nothing after a preemption, came out empty: the engine stopped with work
    pending. The members of the READY prefix must run instead."""
    rng = random.Random(2)
    prompts = []
    for _ in range(4):
        prefix = [rng.randrange(400) for _ in range(17)]
        prompts += [prefix + [rng.randrange(400) for _ in range(rng.randrange(1, 9))] for _ in range(2)]
    prompts.append([1] + [rng.randrange(400) for _ in range(30)])
    base, *_ = run(prompts, sharing=False, max_tokens=6)
    out, sched, _, _ = run(prompts, sharing=True, num_blocks=12, threshold=4.0, max_tokens=6)
    assert sched.stats.num_preemptions > 0
    assert out == base


@pytest.mark.parametrize("steps", [0, 3])
def test_a_nested_submission_cut_part_way_is_aborted_whole(steps):
    """Regression: an interrupt while `LLM._submit` added a plan with nested groups left a nested prefix whose
    members were never added; abort_requests_of finished its parent first (in submission order), then the
    nested prefix, whose parent, its last live member gone, was finished a second time: KeyError, raised
    over the interrupt, and the call's requests stayed for the next call. Every cut point of the submission
    must abort cleanly, leaving the other call's requests to run."""
    rng = random.Random(3)
    prompts = []
    for top in range(3):
        base = [top + 1] + [rng.randrange(1000, 5000) for _ in range(9)]
        for _g in range(3):
            nested = base + [rng.randrange(1000, 5000) for _ in range(6)]
            prompts += [nested + [rng.randrange(1000, 5000) for _ in range(3)] for _ in range(2)]
    plan = plan_prefix_sharing(prompts, mode="multi")
    assert any(g.parent is not None for g in plan.groups)

    def submission(call):
        requests = [Request(f"{call}-{i}", list(p), SamplingParams(temperature=0, max_tokens=3), arrival_index=i)
                    for i, p in enumerate(prompts)]
        return list(build_submission(plan, requests, ArrivalOrder(), lambda r: 3, f"{call}-p-"))

    for cut in range(1, len(submission("c")) + 1):
        kv = KVCacheManager(400, 4)
        sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32), kv, max_model_len=512)
        engine = EngineCore(sched, PagedKVExecutor(4))
        other = submission("d")
        for r in other + submission("c")[:cut]:
            engine.add_request(r)
        for _ in range(steps):
            engine.step()
        sched.abort_requests_of("c-")
        assert not [rid for rid in sched.requests if rid.startswith("c-")]
        while engine.has_unfinished():
            engine.step()
        assert kv.num_free_blocks == 400
        assert all(r.finish_reason == "length" for r in other if not r.is_prefix)


def test_a_member_needing_the_whole_pool_shares_a_prefix_that_ends_on_a_block_boundary():
    """A prefix ending on a block boundary costs its members nothing beyond their own worst case (they share
    every block of it): such a member whose prompt and max_tokens fill the whole pool is taken, where one
    block per prefix level was charged and it was refused ("may need 9 KV blocks"), so that LLM ran every such
    member unshared (a chat batch without max_tokens recomputed its whole system prompt per line). It runs
    beside its siblings within the pool (`run` checks the peak), no block copied, outputs as unshared."""
    prompts = [list(range(1, 9)) + [50 + i, 60 + i] for i in range(3)]  # an 8-token prefix: 2 blocks of 4
    plan = PrefixPlan("multi", [PrefixGroup(0, 8, None, [0, 1, 2])], [], [len(p) for p in prompts])
    kv = KVCacheManager(8, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32), kv, max_model_len=512)
    requests = [Request(f"r{i}", p, SamplingParams(max_tokens=22)) for i, p in enumerate(prompts)]
    build_submission(plan, requests, ArrivalOrder(), lambda r: 22, "t-")  # (sets their parent)
    assert [sched.kv_blocks_needed(r) for r in requests] == [8, 8, 8], "10 + 22 tokens: the whole pool"
    partial = Request("p", list(range(1, 8)), SamplingParams(max_tokens=1), is_prefix=True)
    requests[0].parent = partial
    assert sched.kv_blocks_needed(requests[0]) == 9, "a 7-token prefix keeps its partial block: one more"
    shared, sched, ex, _ = run(prompts, sharing=plan, num_blocks=8, max_tokens=22)
    unshared, *_ = run(prompts, sharing=False, num_blocks=8, max_tokens=22)
    assert shared == unshared
    assert not any(b.block_copies for b in ex.batches)


@pytest.mark.parametrize("prefix_len", [10, 8])
def test_a_member_is_charged_the_blocks_it_holds_beside_its_prefix(prefix_len, monkeypatch):
    """Regression: a member's charge was its tokens past the fork point in blocks plus one for the copy of the
    prefix's partial block, which is already one of those blocks when the fork point is inside a block, and
    needed by no one when it ends on a boundary: one block too many either way, so groups that fit were taken for
    larger than the pool. The charge is now the most blocks the member holds beside its prefix's full blocks."""
    prefix = list(range(1, prefix_len + 1))
    prompts = [prefix + [50 + i, 60 + i, 70 + i] for i in range(3)]
    held, charged = {}, {}
    allocate = KVCacheManager.allocate_slots

    def allocate_and_record(kv, request_id, total_tokens):
        ok = allocate(kv, request_id, total_tokens)
        if request_id.startswith("r"):
            held[request_id] = max(held.get(request_id, 0), len(kv.block_table(request_id)) - prefix_len // 4)
        return ok

    def check(sched):
        charged.update((r.request_id, r.projected_blocks) for r in sched.running if not r.is_prefix)

    monkeypatch.setattr(KVCacheManager, "allocate_slots", allocate_and_record)
    out, *_ = run(prompts, sharing=True, num_blocks=40, max_tokens=7, budget=64, check=check)
    assert charged == held == {f"r{i}": 3 for i in range(3)}  # 13 or 11 tokens and 7 outputs: 5 blocks, 2 shared
    unshared, *_ = run(prompts, sharing=False, num_blocks=40, max_tokens=7, budget=64)
    assert out == unshared
