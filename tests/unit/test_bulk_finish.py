"""Ending many requests at once (stopping a job, an interrupt part-way through a submission) is done in
bulk: the scheduler's state afterwards is exactly what `_finish` on each request in turn left, and the
queues are filtered once each instead of once per request (that was quadratic: 147 s to stop a job with
100k lines left)."""

from __future__ import annotations

import copy
import random
from contextlib import nullcontext

import pytest

from batchllm.config import SchedulerConfig
from batchllm.core.engine_core import EngineCore
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.policies import ArrivalOrder
from batchllm.core.scheduler import Scheduler
from batchllm.core.work_units import build_submission
from batchllm.prefix import plan_prefix_sharing
from batchllm.request import Request, RequestStatus
from batchllm.sampling_params import SamplingParams
from tests.unit.test_async_scheduling import AsyncPagedKVExecutor
from tests.unit.test_prefix_scheduling import PagedKVExecutor


def nested_prompts(rng, tops=4, groups=3, members=3):
    """Top-level prefixes over nested groups over members: every queue of the scheduler gets used."""
    prompts = []
    for top in range(tops):
        base = [top + 1] + [rng.randrange(1000, 5000) for _ in range(rng.randrange(3, 12))]
        for _ in range(groups):
            nested = base + [rng.randrange(1000, 5000) for _ in range(rng.randrange(2, 20))]
            for _ in range(rng.randint(1, members)):
                prompts.append(nested + [rng.randrange(1000, 5000) for _ in range(rng.randrange(1, 6))])
    prompts += [[rng.randrange(1000, 5000) for _ in range(rng.randrange(2, 30))] for _ in range(6)]
    rng.shuffle(prompts)
    return prompts


def engine_with(prompts, rng, num_blocks, async_scheduling=False, calls=("c",), cut=None):
    """An engine with one submission per call (ids `{call}-{i}`, prefixes `{call}-p-...`, as `LLM._submit`
    numbers them); the last call's cut after its first `cut` entries (an interrupt part-way)."""
    kv = KVCacheManager(num_blocks, 4)
    config = SchedulerConfig(max_num_batched_tokens=rng.choice([16, 32, 64]),
                             kv_admission_threshold=rng.choice([1.0, 4.0]))
    sched = Scheduler(config, kv, max_model_len=512)
    executor = AsyncPagedKVExecutor(4) if async_scheduling else PagedKVExecutor(4)
    engine = EngineCore(sched, executor, async_scheduling=async_scheduling)
    everything = []
    for n, call in enumerate(calls):
        requests = [Request(f"{call}-{i}", list(p), SamplingParams(temperature=0, max_tokens=rng.randrange(1, 9)),
                            arrival_index=i) for i, p in enumerate(prompts)]
        plan = plan_prefix_sharing(prompts, mode="multi")
        submission = list(build_submission(plan, requests, ArrivalOrder(), lambda r: r.sampling_params.max_tokens,
                                           f"{call}-p-"))
        if n == len(calls) - 1 and cut is not None:
            submission = submission[:cut]
        for r in submission:
            engine.add_request(r)
        everything += submission
    return engine, everything


def state(engine, everything):
    """All the scheduler's state that finishing touches, by request id (comparable across copies)."""
    s = engine.scheduler
    ids = lambda queue: [r.request_id for r in queue]  # noqa: E731
    per_request = {r.request_id: (r.status, r.finish_reason, r.stop_reason, r.num_live_members, ids(r.pending_members),
                                  r.projected_blocks, r.num_computed_tokens, r.num_blocks_sent) for r in everything}
    return dict(running=ids(s.running), waiting=ids(s.waiting), ready_members=ids(s.ready_members),
                ready_prefixes=ids(s.ready_prefixes), requests=list(s.requests),
                finished=list(s._finished_since_last_step),
                projected=s.admission.projected_blocks, tables=dict(s.kv._tables), free=s.kv.pool.free_queue(),
                refs=list(s.kv.pool._ref_counts), stats=s.stats, pending_outputs=s.num_pending_outputs,
                per_request=per_request)


def one_by_one(sched, request_ids, reason):
    """The old finish_requests: `_finish` (with its `_unlink`) on each request in turn."""
    for request_id in request_ids:
        request = sched.requests.get(request_id)
        if request is not None and not request.is_prefix:
            sched._finish(request, reason, None)


def one_by_one_of(sched, id_prefix):
    """abort_requests_of before it finished in bulk."""
    ours = [r for rid, r in sched.requests.items() if rid.startswith(id_prefix)]
    for request in [r for r in ours if not r.is_prefix] + [r for r in reversed(ours) if r.is_prefix]:
        if request.request_id in sched.requests:
            sched._finish(request, "abort", None)


def outputs(everything):
    return {r.request_id: (list(r.output_token_ids), r.finish_reason) for r in everything if not r.is_prefix}


def run_out(engine):
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        engine.step()
    engine.drain()
    assert not engine.has_unfinished()
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.pool.num_blocks


@pytest.mark.parametrize("seed", range(40))
def test_finishing_many_requests_in_bulk_leaves_the_state_finishing_them_one_by_one_leaves(seed):
    rng = random.Random(seed)
    engine, everything = engine_with(nested_prompts(rng), rng, num_blocks=rng.choice([24, 40, 200]),
                                     async_scheduling=rng.random() < 0.5)
    for _ in range(rng.randrange(0, 25)):
        if engine.has_unfinished():
            engine.step()
    chosen = [r.request_id for r in everything]
    if seed % 4:  # a random part of the batch in a random order, prefixes' ids, unknown and repeated ids among them
        chosen = rng.sample(chosen, rng.randrange(1, len(chosen))) + ["nope", chosen[0]]
        rng.shuffle(chosen)
    bulk, bulk_all = copy.deepcopy((engine, everything))
    bulk.finish_requests(chosen, "abort")
    one_by_one(engine.scheduler, chosen, "abort")
    assert state(bulk, bulk_all) == state(engine, everything)
    run_out(bulk)
    run_out(engine)
    assert outputs(bulk_all) == outputs(everything)


@pytest.mark.parametrize("seed", range(20))
def test_aborting_a_calls_requests_in_bulk_leaves_the_state_aborting_them_one_by_one_leaves(seed):
    """abort_requests_of: a call submitted part-way (an interrupt) beside another call's requests."""
    rng = random.Random(100 + seed)
    prompts = nested_prompts(rng)
    engine, everything = engine_with(prompts, rng, num_blocks=rng.choice([24, 40, 200]), calls=("d", "c"),
                                     cut=rng.randrange(1, 2 * len(prompts)))
    for _ in range(rng.randrange(0, 25)):
        if engine.has_unfinished():
            engine.step()
    bulk, bulk_all = copy.deepcopy((engine, everything))
    bulk.scheduler.abort_requests_of("c-")
    one_by_one_of(engine.scheduler, "c-")
    assert state(bulk, bulk_all) == state(engine, everything)
    run_out(bulk)
    run_out(engine)
    assert outputs(bulk_all) == outputs(everything)


def test_a_bulk_finish_filters_each_queue_once_whatever_the_number_of_requests(monkeypatch):
    """Not a timing test: a bulk finish never takes the per-request `_unlink` (membership tests and
    `remove` on the queues, O(queue) each) and looks at each queued request a bounded number of times."""
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 5000) for _ in range(rng.randrange(2, 8))] for _ in range(3000)]
    prompts += [[9, 9, 9, 9, 9, i, i + 1] for i in range(500)]  # one group: members pending, then READY members
    engine, everything = engine_with(prompts, rng, num_blocks=400)
    for _ in range(3):
        engine.step()
    s = engine.scheduler
    assert len(s.waiting) > 1000 and s.running

    def per_request(*_args):
        raise AssertionError("a bulk finish took the per-request _unlink")

    monkeypatch.setattr(Scheduler, "_unlink", per_request)
    looks = 0

    class Counted(str):
        def __hash__(self):  # every `in gone` test on a queued request's id
            nonlocal looks
            looks += 1
            return str.__hash__(self)

    queued = list(s.running) + list(s.waiting) + list(s.ready_members) + list(s.ready_prefixes)
    for r in queued:
        r.request_id = Counted(r.request_id)
    s.requests = {r.request_id: r for r in s.requests.values()}
    engine.finish_requests([r.request_id for r in everything], "abort")
    assert not s.requests and not s.waiting and not s.running and not s.ready_members and not s.ready_prefixes
    assert looks <= 4 * (len(queued) + len(everything))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_requests_ending_in_a_step_leave_running_in_one_pass(monkeypatch, async_scheduling):
    """The requests a step ends (EOS, max_tokens) are finished in bulk too: `running` is filtered once per
    step, not searched and shifted once per ended request (quadratic in a step where thousands end together,
    as a batch of equal max_tokens does). Every request ends, none through the per-request `_unlink`, and the
    outputs are those of the same engine state run with it."""
    rng = random.Random(11)
    engine, everything = engine_with(nested_prompts(rng), rng, num_blocks=200, async_scheduling=async_scheduling)
    reference, reference_all = copy.deepcopy((engine, everything))
    run_out(reference)

    def per_request(*_args):
        raise AssertionError("a request ending in a step took the per-request _unlink")

    monkeypatch.setattr(Scheduler, "_unlink", per_request)
    run_out(engine)
    ended = [r for r in everything if not r.is_prefix]
    assert all(r.finish_reason == "length" for r in ended)
    assert outputs(everything) == outputs(reference_all)


def test_requests_ending_in_a_step_leave_the_state_ending_them_one_by_one_leaves():
    """Step for step, an engine whose steps end requests in bulk and a copy that ends each one with its own
    `_unlink` (the code before) hold the same state (`state`), over small pools (preemptions with a token in flight)
    and stop tokens; the ends cover running requests, preempted ones and READY prefixes dropped with their last
    member."""
    from tests.unit.test_async_scheduling import STOP_IDS

    ended_as: set = set()
    finish = Scheduler._finish
    for seed in range(40):
        rng = random.Random(1000 + seed)
        prompts = nested_prompts(rng)
        kv = KVCacheManager(rng.choice([14, 16, 20]), 4)
        config = SchedulerConfig(max_num_batched_tokens=rng.choice([16, 32, 64]),
                                 kv_admission_threshold=rng.choice([1.0, 4.0]))
        async_scheduling = seed % 2 == 0
        executor = AsyncPagedKVExecutor(4) if async_scheduling else PagedKVExecutor(4)
        engine = EngineCore(Scheduler(config, kv, max_model_len=512), executor, async_scheduling=async_scheduling)
        requests = [Request(f"c-{i}", list(p), SamplingParams(
            temperature=0, max_tokens=rng.randrange(1, 12), stop_token_ids=STOP_IDS if rng.random() < 0.5 else None),
            arrival_index=i) for i, p in enumerate(prompts)]
        submission = list(build_submission(plan_prefix_sharing(prompts, mode="multi"), requests, ArrivalOrder(),
                                           lambda r: r.sampling_params.max_tokens, "c-p-"))
        for r in submission:
            engine.add_request(r)
        old, old_all = copy.deepcopy((engine, submission))

        def one_by_one(request, reason, stop_reason, gone=None, keep=False, _scheduler=old.scheduler):
            return finish(_scheduler, request, reason, stop_reason, None, keep)  # (its own _unlink, as before)

        def noted(request, reason, stop_reason, gone=None, keep=False, _scheduler=engine.scheduler):
            ended_as.add((request.status, request.is_prefix))
            return finish(_scheduler, request, reason, stop_reason, gone, keep)

        old.scheduler._finish, engine.scheduler._finish = one_by_one, noted
        for _ in range(3000):
            if not engine.has_unfinished():
                break
            engine.step()
            old.step()
            assert state(engine, submission) == state(old, old_all), seed
        engine.drain()
        old.drain()
        assert state(engine, submission) == state(old, old_all), seed
        assert not engine.has_unfinished(), seed  # (seed 10 looped forever before: test_tiny_pool_progress.py)
    assert {(RequestStatus.RUNNING, False), (RequestStatus.PREEMPTED, False), (RequestStatus.READY, True)} <= ended_as


class _Interrupt(KeyboardInterrupt):
    """Ctrl-C inside a bulk finish."""


def interrupt_after_finishing(sched, count):
    """Make the bulk finishes of `sched` raise `_Interrupt` once `count` requests were ended by their loop (each
    `_finish` whole: with the parents it drops)."""
    finish, depth, ended = sched._finish, [0], [0]

    def finishing(*args, **kwargs):
        depth[0] += 1
        try:
            finish(*args, **kwargs)
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            ended[0] += 1
            if ended[0] == count:
                raise _Interrupt
    sched._finish = finishing


@pytest.mark.parametrize("seed", range(16))
def test_a_bulk_finish_interrupted_part_way_leaves_the_state_of_the_requests_it_ended(seed):
    """Ctrl-C inside `finish_requests` or `abort_requests_of` (a second interrupt while `LLM` aborts a call): the
    requests already ended leave their queues all the same (`Scheduler._finishing_in_bulk`), so the state is that of
    ending just those one by one; ending the rest afterwards runs both engines to the same outputs."""
    rng = random.Random(300 + seed)
    prompts = nested_prompts(rng)
    aborting = seed % 2 == 1
    engine, everything = engine_with(prompts, rng, num_blocks=rng.choice([24, 40, 200]),
                                     async_scheduling=rng.random() < 0.5, calls=("d", "c"))
    for _ in range(rng.randrange(0, 25)):
        if engine.has_unfinished():
            engine.step()
    chosen = [r.request_id for r in everything if r.request_id.startswith("c-")]
    rng.shuffle(chosen)
    bulk, bulk_all = copy.deepcopy((engine, everything))
    ours = [r for r in everything if r.request_id.startswith("c-") and r.request_id in engine.scheduler.requests]
    members = [r.request_id for r in ours if not r.is_prefix]
    count = rng.randrange(1, len(members) + 1) if members else 1
    interrupt_after_finishing(bulk.scheduler, count)
    with pytest.raises(_Interrupt) if members else nullcontext():
        if aborting:
            bulk.scheduler.abort_requests_of("c-")
        else:
            bulk.scheduler.finish_requests(chosen, "abort")
    del bulk.scheduler._finish
    order = members if aborting else [i for i in chosen if i in set(members)]
    one_by_one(engine.scheduler, order[:count], "abort")
    assert state(bulk, bulk_all) == state(engine, everything)
    for e in (bulk, engine):
        e.scheduler.abort_requests_of("c-")
    assert state(bulk, bulk_all) == state(engine, everything)
    run_out(bulk)
    run_out(engine)
    assert outputs(bulk_all) == outputs(everything)
