"""Asynchronous scheduling: each step is scheduled and submitted before the previous step's tokens
are collected. With a fake runner that simulates the paged KV cache (and fills placeholders from
the step before, as the model runner does), the tokens must be exactly those of synchronous runs,
with sharing, preemption and stop tokens, and no decode is wasted on a request whose pending token
is bound to end it."""

from __future__ import annotations

import dataclasses
import random

import pytest

from batchllm.config import SchedulerConfig
from batchllm.core.engine_core import EngineCore
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.policies import ArrivalOrder
from batchllm.core.scheduler import Scheduler
from batchllm.core.work_units import build_submission
from batchllm.outputs import PLACEHOLDER_TOKEN_ID
from batchllm.prefix import PrefixPlan, plan_prefix_sharing
from batchllm.request import Request
from batchllm.sampling_params import SamplingParams
from tests.unit.test_prefix_scheduling import PagedKVExecutor, grouped_prompts


class _Collected:
    def __init__(self, output):
        self.output = output

    def result(self):
        return self.output


class AsyncPagedKVExecutor(PagedKVExecutor):
    """Runs each step when it is submitted (the device runs steps in order), after replacing a
    placeholder with the token the same request sampled in the step submitted just before."""

    def __init__(self, block_size):
        super().__init__(block_size)
        self.previous: dict[str, int] = {}
        self.placeholders = 0

    def submit(self, batch):
        resolved = []
        for r in batch.requests:
            assert PLACEHOLDER_TOKEN_ID not in r.token_ids[:-1], "only the last token can be pending"
            if r.token_ids[-1] == PLACEHOLDER_TOKEN_ID:
                assert r.request_id in self.previous, "a placeholder's token comes from the step just before"
                r = dataclasses.replace(r, token_ids=r.token_ids[:-1] + [self.previous[r.request_id]])
                self.placeholders += 1
            resolved.append(r)
        output = self.execute(dataclasses.replace(batch, entries=resolved, decodes=None))
        self.previous = dict(output.sampled_token_ids)
        return _Collected(output)

    def execute(self, batch):
        """Also honours banned tokens (stop ids below min_tokens): the next token up is taken."""
        output = super().execute(batch)
        for r in batch.requests:
            if r.sampling is not None:
                while output.sampled_token_ids[r.request_id] in r.sampling.banned_token_ids:
                    output.sampled_token_ids[r.request_id] = (output.sampled_token_ids[r.request_id] + 1) % 997
        return output


STOP_IDS = list(range(0, 997, 9))  # ~1 sampled token in 9 is a stop token


def run(prompts, *, overlap, sharing=True, num_blocks=200, block_size=4, budget=32, max_tokens=6, stop=False,
        min_tokens=0, threshold=1.0, check=None):
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, kv_admission_threshold=threshold), kv, 512)
    executor = AsyncPagedKVExecutor(block_size)
    engine = EngineCore(sched, executor, async_scheduling=overlap)
    per_prompt = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    requests = [
        Request(f"r{i}", list(p), SamplingParams(temperature=0, max_tokens=m, min_tokens=min(m, min_tokens),
                                                 stop_token_ids=STOP_IDS if stop else None), arrival_index=i)
        for i, (p, m) in enumerate(zip(prompts, per_prompt))
    ]
    plan = plan_prefix_sharing(prompts) if sharing else PrefixPlan.without_sharing([len(p) for p in prompts], "multi")
    for r in build_submission(plan, requests, ArrivalOrder(), lambda r: r.sampling_params.max_tokens, "t-"):
        engine.add_request(r)
    finished = {}
    steps = 0
    while engine.has_unfinished():
        for update in engine.step():
            if update.finish_reason is not None:
                finished[update.request_id] = update.finish_reason
        steps += 1
        assert steps < 5000, "the batch stopped making progress (livelock)"
        if check:
            check(sched)
    assert kv.num_free_blocks == num_blocks, "every block returns to the pool"
    assert sched.num_pending_outputs == 0
    outputs = {r.request_id: (r.output_token_ids, r.finish_reason) for r in requests}
    assert finished == {rid: reason for rid, (_, reason) in outputs.items()}, "one final update per request"
    return outputs, sched, executor


def random_prompts(seed):
    rng = random.Random(seed)
    prompts = grouped_prompts(rng, groups=rng.randrange(1, 4), members=rng.randrange(2, 6),
                              prefix_len=rng.randrange(1, 14))
    return prompts + [[rng.randrange(1, 500) for _ in range(rng.randrange(2, 12))] for _ in range(3)], rng


@pytest.mark.parametrize("seed", range(10))
def test_async_gives_the_tokens_of_sync_with_sharing_stops_and_preemption(seed):
    prompts, rng = random_prompts(seed)
    max_tokens = [rng.randrange(1, 9) for _ in prompts]
    small = dict(num_blocks=24, threshold=4.0)  # overcommitted: preemption while steps are in flight
    for settings in (dict(), small, dict(min_tokens=3)):
        base, _, _ = run(prompts, overlap=False, max_tokens=max_tokens, stop=True, **settings)
        out, sched, executor = run(prompts, overlap=True, max_tokens=max_tokens, stop=True, **settings)
        assert out == base
        assert executor.placeholders > 0, "decodes were scheduled before their input tokens were known"


def test_preempted_request_keeps_the_token_of_its_step_in_flight(monkeypatch):
    preempted_pending = []
    original = Scheduler._preempt

    def preempt(self, request):
        preempted_pending.append(request.num_pending_tokens)
        original(self, request)

    monkeypatch.setattr(Scheduler, "_preempt", preempt)
    for seed in range(6):
        prompts, _ = random_prompts(seed)
        base, _, _ = run(prompts, overlap=False, sharing=False, num_blocks=14, threshold=4.0, max_tokens=8)
        out, sched, _ = run(prompts, overlap=True, sharing=False, num_blocks=14, threshold=4.0, max_tokens=8)
        assert out == base
        assert sched.stats.num_preemptions > 0
    assert any(preempted_pending), "some request was preempted while its sampled token was still in flight"


def test_no_decode_is_scheduled_past_max_tokens():
    prompts, _ = random_prompts(3)
    max_tokens = [1 + i % 5 for i in range(len(prompts))]
    base, sync_sched, _ = run(prompts, overlap=False, max_tokens=max_tokens)
    out, sched, _ = run(prompts, overlap=True, max_tokens=max_tokens)
    assert out == base
    assert sched.stats.decode_tokens == sync_sched.stats.decode_tokens == sum(m - 1 for m in max_tokens)
    assert sched.stats.prefill_tokens == sync_sched.stats.prefill_tokens


def test_a_request_ending_on_a_stop_token_wastes_at_most_one_decode():
    prompts, rng = random_prompts(4)
    base, sync_sched, _ = run(prompts, overlap=False, max_tokens=12, stop=True)
    out, sched, _ = run(prompts, overlap=True, max_tokens=12, stop=True)
    assert out == base
    stopped = sum(1 for _, reason in out.values() if reason == "stop")
    assert stopped > 0
    wasted = sched.stats.decode_tokens - sync_sched.stats.decode_tokens
    assert 0 <= wasted <= stopped


def test_abort_while_a_step_is_in_flight_drops_its_token_and_frees_its_blocks():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32), kv, 512)
    engine = EngineCore(sched, AsyncPagedKVExecutor(4), async_scheduling=True)
    for i in range(3):
        engine.add_request(Request(f"r{i}", list(range(1, 6 + i)), SamplingParams(temperature=0, max_tokens=10)))
    assert engine.step() == []  # step 1 submitted, nothing collected yet
    updates = engine.step()  # step 2 submitted (decodes on placeholders), step 1 collected
    assert sorted(u.request_id for u in updates) == ["r0", "r1", "r2"]
    engine.finish_requests(["r1"], "abort")
    updates = engine.step()  # step 2's token of r1 is dropped
    assert "r1" not in {u.request_id for u in updates}
    while engine.has_unfinished():
        engine.step()
    assert kv.num_free_blocks == 64
    assert sched.num_pending_outputs == 0


def test_engine_waits_for_the_step_in_flight_when_nothing_else_can_run():
    kv = KVCacheManager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32), kv, 512)
    engine = EngineCore(sched, AsyncPagedKVExecutor(4), async_scheduling=True)
    engine.add_request(Request("only", [1, 2, 3], SamplingParams(temperature=0, max_tokens=1)))
    assert engine.step() == []
    # its one token is pending and ends it: nothing to schedule, so the step collects instead
    [update] = engine.step()
    assert update.request_id == "only" and update.finish_reason == "length"
    assert not engine.has_unfinished()
    assert len(engine.step_log) == 1


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("stop", [False, True], ids=["length", "stop-ids"])
def test_requests_that_fit_the_pool_exactly_run_as_in_a_larger_pool(overlap, stop):
    """A request of prompt P and max_tokens M writes P + M - 1 tokens: its last token is sampled, never fed back.
    The worst case counted P + M, so at an exact block multiple (10 + 11 tokens, 20 written: 5 blocks of 4) it
    was refused ("may need 6 KV blocks but the cache has 5") and admission charged it one block too many. It now
    runs in a pool of exactly its blocks, one at a time or beside a prefix that ends on a block boundary, with
    placeholders and stop ids (a wasted decode is never past the last token), and the fake runner, which writes
    every token through the block table, never writes past the blocks (an IndexError there)."""
    rng = random.Random(0)
    shared = [rng.randrange(1, 500) for _ in range(8)]  # 2 whole blocks
    prompts = [shared + [rng.randrange(1, 500) for _ in range(2)] for _ in range(3)] + [list(range(1, 11))]
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=32), KVCacheManager(5, 4), 512)
    assert sched.kv_blocks_needed(Request("x", prompts[-1], SamplingParams(max_tokens=11))) == 5
    for sharing in (False, True):
        exact, *_ = run(prompts, overlap=overlap, sharing=sharing, num_blocks=5, max_tokens=11, stop=stop,
                        min_tokens=3)
        roomy, *_ = run(prompts, overlap=overlap, sharing=sharing, num_blocks=50, max_tokens=11, stop=stop,
                        min_tokens=3)
        assert exact == roomy
        assert stop or all(len(tokens) == 11 for tokens, _ in exact.values())
    with pytest.raises(ValueError, match="may need 6 KV blocks but the cache has 5"):
        run(prompts[-1:], overlap=overlap, num_blocks=5, max_tokens=12)


def test_admission_charges_the_tokens_a_request_writes():
    """Two requests writing 20 tokens each (10 + 11, the last never written) are 5 blocks each: both start at once
    in a pool of 10 (each was charged 6, so the second waited for the first to finish)."""
    _, _, executor = run([list(range(1, 11)), list(range(21, 31))], overlap=False, sharing=False, num_blocks=10,
                         max_tokens=11)
    assert [r.request_id for r in executor.batches[0].requests] == ["r0", "r1"]


class _Interrupt(KeyboardInterrupt):
    """Ctrl-C, raised by `_interrupt_at`."""


def _interrupt_at(engine, where, at):
    """Make the `at`-th call at `where` raise `_Interrupt`: "execute" (a step run on the CPU, or submitted), "result"
    (the host waiting for a submitted step's tokens: asynchronous engines only), "update" (recording a step's
    tokens), "ending" (recording a step's tokens, right after one of them ended its request) or "schedule" (the end
    of scheduling a step, after its outputs count as pending). Returns the set of finished requests the batches the
    executor got named (filled as steps run)."""
    calls, told = [0], set()

    def tick():
        calls[0] += 1
        if calls[0] == at:
            raise _Interrupt

    executor, scheduler = engine.executor, engine.scheduler
    name = "submit" if engine.async_scheduling else "execute"
    run = getattr(executor, name)

    def runs(batch):
        if where == "execute":
            tick()  # (the runner never gets this batch)
        told.update(batch.finished_request_ids)
        return run(batch)
    setattr(executor, name, runs)
    if where == "result":
        submit = executor.submit

        def submitted(batch):
            pending = submit(batch)

            class Waited:
                def result(self):
                    tick()
                    return pending.result()
            return Waited()
        executor.submit = submitted
    elif where == "update":
        update = scheduler.update_from_output
        scheduler.update_from_output = lambda batch, output: (tick(), update(batch, output))[1]
    elif where == "ending":
        update, finish, recording = scheduler.update_from_output, scheduler._finish, [False]

        def recorded(batch, output):
            recording[0] = True
            try:
                return update(batch, output)
            finally:
                recording[0] = False

        def finished(request, *args, **kwargs):
            finish(request, *args, **kwargs)
            if recording[0]:
                tick()
        scheduler.update_from_output, scheduler._finish = recorded, finished
    elif where == "schedule":
        record = scheduler._record_step
        scheduler._record_step = lambda copies: (record(copies), tick())[0]
    return told


@pytest.mark.parametrize("where", ["execute", "result", "update", "ending", "schedule"])
def test_a_step_interrupted_anywhere_leaves_the_engine_clean_for_the_next_batch(where):
    """An interrupt (or an error) at any point of a step, asynchronous while the next step may already be submitted:
    the caller aborts the requests and drains (as `LLM._abort_rest` does); no token may stay counted as pending,
    or a later batch on a tiny pool, which needs idle prefixes released, stops with "empty step with work pending".
    The same batch then runs on the interrupted engine to the tokens it gets on a fresh one, and by then the runner
    has heard of every request of the first batch, though the batch naming some never reached it. (While the pending
    count was left as it was, seed 4's next batch stopped so after an interrupt at any of the four points; an
    interrupt right after a request ended in recording left it in the running queue, freed, for the next batch.)
    Waits are also interrupted where a step that scheduled nothing collects the step in flight (`EngineCore._step`).
    """
    from tests.unit.test_bulk_finish import outputs  # (both import this module)
    from tests.unit.test_tiny_pool_progress import add_case, case_engine, nested_case, run_case

    waits_of_empty_steps = 0
    for seed in range(8):
        case, tiny = nested_case(seed)
        if where == "result" and not case["async_scheduling"]:
            continue
        expected, _, finished = run_case(case, tiny)
        assert finished
        for at in (2, 4, 7, 8, 11, 14) if where == "result" else (2, 4, 7):
            engine, requests = case_engine(case, tiny, sharing=True)
            first = set(engine.scheduler.requests)  # (members and prefixes)
            told = _interrupt_at(engine, where, at)
            with pytest.raises(_Interrupt):
                while engine.has_unfinished():
                    scheduled = engine.scheduler.stats.num_steps
                    engine.step()
            waits_of_empty_steps += engine.scheduler.stats.num_steps == scheduled  # (no batch made: `_record_step`)
            engine.finish_requests([r.request_id for r in requests if r.finish_reason is None], "abort")
            engine.drain()
            assert engine.scheduler.num_pending_outputs == 0, (seed, at)
            assert engine.scheduler.kv.num_free_blocks == tiny, (seed, at)
            assert not engine.scheduler.running and not engine.scheduler.waiting, (seed, at)
            again = add_case(engine, case, sharing=True, tag="again-")
            for _ in range(5000):  # (a bound: the batch must finish, not stall)
                if not engine.has_unfinished():
                    break
                engine.step()
            assert not engine.has_unfinished(), (seed, at)
            assert first <= told, "the runner hears of every request that ended (and drops its state)"
            assert {rid.removeprefix("again-"): out for rid, out in outputs(again).items()} == expected, (seed, at)
    assert where != "result" or waits_of_empty_steps, "some interrupted wait is an empty step's collection"
