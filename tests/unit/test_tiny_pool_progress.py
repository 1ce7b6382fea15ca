"""A batch always finishes, however small the KV pool (as long as each request and its prefixes fit, which
`add_request` checks): no step sequence repeats forever. A probe of the bulk-finish tests found one that did: the
only running request could not grow beside READY prefixes kept for waiting members, so it preempted itself,
was admitted again (the step was never empty, so the idle prefixes were never released) and stopped at the
same place, step after step. Such a step is now one where nothing could run (idle READY prefixes are
released first), and a preempted prefix waits behind the members of READY prefixes: a probe of a first fix
found two prefixes releasing each other for the pool, and a preempted nested prefix re-admitted ahead of the
members that could run."""

from __future__ import annotations

import random

import pytest

from batchllm.config import SchedulerConfig
from batchllm.core.engine_core import EngineCore
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.policies import ArrivalOrder, DecodeWeightedOrder, PrefillLengthOrder, expected_output_tokens
from batchllm.core.scheduler import Scheduler
from batchllm.core.work_units import build_submission
from batchllm.prefix import plan_prefix_sharing
from batchllm.request import Request
from batchllm.sampling_params import SamplingParams
from tests.unit.test_async_scheduling import STOP_IDS, AsyncPagedKVExecutor
from tests.unit.test_bulk_finish import nested_prompts, outputs
from tests.unit.test_prefix_scheduling import PagedKVExecutor


def case_engine(case, num_blocks, sharing):
    """An engine holding `case`'s requests in a pool of `num_blocks` (ValueError where one cannot fit it):
    (engine, requests)."""
    size = case["block_size"]
    executor = AsyncPagedKVExecutor(size) if case["async_scheduling"] else PagedKVExecutor(size)
    scheduler = Scheduler(case["config"], KVCacheManager(num_blocks, size), max_model_len=case["max_model_len"])
    engine = EngineCore(scheduler, executor, async_scheduling=case["async_scheduling"])
    return engine, add_case(engine, case, sharing)


def add_case(engine, case, sharing, tag=""):
    """`case`'s requests (ids `{tag}c-0`, ...) added to `engine` with their prefix plan (`sharing` off: none);
    the requests."""
    requests = [Request(f"{tag}c-{i}", list(p), params, arrival_index=i)
                for i, (p, params) in enumerate(zip(case["prompts"], case["params"]))]
    plan = plan_prefix_sharing(case["prompts"], mode=case["mode"], share=sharing)
    for r in build_submission(plan, requests, case["order"], lambda r: expected_output_tokens(r, case["max_model_len"]),
                              f"{tag}c-p-"):
        engine.add_request(r)
    return requests


def run_case(case, num_blocks, sharing=True):
    """`case` run in a pool of `num_blocks`, stopped where no request has finished for 10 x the context + 200
    steps: (outputs of its requests, the scheduler, whether every request finished). The runner's tokens are a
    function of the whole context it reads from the KV slots, so a wrong or missing KV changes them."""
    engine, requests = case_engine(case, num_blocks, sharing)
    steps = last_finish = 0
    left = len(engine.scheduler.requests)
    while engine.has_unfinished() and steps - last_finish <= 10 * case["max_model_len"] + 200:
        engine.step()
        steps += 1
        if len(engine.scheduler.requests) != left:
            left, last_finish = len(engine.scheduler.requests), steps
    engine.drain()
    return outputs(requests), engine.scheduler, not engine.has_unfinished()


def nested_case(seed: int):
    """The seed's nested prompts (`nested_prompts`) with random max_tokens and stop tokens, step budget and
    admission threshold, 4-token blocks, asynchronous scheduling on even seeds: (case, its tiny pool of 14-20
    blocks). A case is what `case_engine` builds an engine from."""
    rng = random.Random(1000 + seed)
    prompts = nested_prompts(rng)
    tiny = rng.choice([14, 16, 20])
    config = SchedulerConfig(max_num_batched_tokens=rng.choice([16, 32, 64]),
                             kv_admission_threshold=rng.choice([1.0, 4.0]))
    params = [SamplingParams(temperature=0, max_tokens=rng.randrange(1, 12),
                             stop_token_ids=STOP_IDS if rng.random() < 0.5 else None) for _ in prompts]
    return dict(prompts=prompts, params=params, block_size=4, max_model_len=512, config=config,
                async_scheduling=seed % 2 == 0, mode="multi", order=ArrivalOrder()), tiny


@pytest.mark.parametrize("seeds", [range(0, 100), range(100, 200)])
def test_every_batch_finishes_in_a_tiny_pool_with_the_tokens_of_a_large_one(seeds):
    """Over seeds of nested groups in pools of 14-20 blocks (seed 10 stalled before), synchronous and
    asynchronous: every request ends, with exactly the tokens a 400-block pool without sharing gives."""
    for seed in seeds:
        case, tiny = nested_case(seed)
        reference, _, finished = run_case(case, 400, sharing=False)
        assert finished, seed
        out, _, finished = run_case(case, tiny)
        assert finished, f"seed {seed}: the batch stopped finishing requests"
        assert out == reference, seed


def test_the_stalled_batch_releases_idle_prefixes_when_its_only_running_request_preempts_itself():
    """Seed 10's batch (16 blocks, asynchronous, threshold 4): a step whose one runnable request preempted
    itself is treated as a step where nothing could run: the idle READY prefixes (but its own) are released
    (recomputed later) before it is admitted again, so it finishes, with a handful of preemptions instead of
    one per step forever."""
    case, tiny = nested_case(10)
    _, scheduler, finished = run_case(case, tiny)
    assert finished
    assert scheduler.stats.num_prefix_releases > 0
    assert scheduler.stats.num_preemptions < 100


def small_case(prompts, max_tokens, block_size, mode="multi", order=None):
    """`prompts` with their `max_tokens` (greedy), blocks of `block_size` tokens, two-token steps, threshold 4,
    synchronous scheduling: a case for `run_case`."""
    return dict(prompts=prompts, params=[SamplingParams(temperature=0, max_tokens=m) for m in max_tokens],
                block_size=block_size, max_model_len=max(map(len, prompts)) + 8,
                config=SchedulerConfig(max_num_batched_tokens=2, kv_admission_threshold=4.0), async_scheduling=False,
                mode=mode, order=order or ArrivalOrder())


def test_two_prefixes_do_not_release_each_other_forever():
    """A probe's batch (31 one-token blocks): a 26-token prefix took the pool while a 6-token prefix's members
    waited; blocked alone, it released that READY prefix, which was admitted again before the long prefix's
    members and released it in turn, 248 times and on. A prefix that cannot grow is preempted instead, and the
    waiting members run and free the pool."""
    short = [1, 2325, 1442, 3131, 3995, 4752]
    long = short + list(range(2000, 2020))
    prompts = [[3261], short + [3991], long + [4809], short + [2852], long + [2223]]
    max_tokens = [1, 2, 1, 1, 5]  # (the last needs 27 + 5 - 1 = 31 blocks: the whole pool)
    reference, _, finished = run_case(small_case(prompts, max_tokens, 1, "single"), 1000, sharing=False)
    assert finished
    out, scheduler, finished = run_case(small_case(prompts, max_tokens, 1, "single", DecodeWeightedOrder()), 31)
    assert finished, f"prefix releases {scheduler.stats.num_prefix_releases}"
    assert out == reference
    assert scheduler.stats.num_prefix_releases == 0


def test_a_nested_prefix_that_cannot_grow_does_not_stop_its_batch():
    """A probe's batch (12 blocks of 3 tokens, nested groups): a nested prefix that could not grow preempted
    itself to the front of `ready_members`, was admitted again ahead of the members that could run, and stopped at
    the same place (188 preemptions and on; under the first fix, prefixes released each other instead). The
    release before admission ends it; that the preempted prefix also waits behind those members (the back of its
    queue) is what case 2636 below needs."""
    shared = list(range(3000, 3022))
    other = [1] + list(range(4000, 4009))
    prompts = [[2] + shared + [2431], [2] + shared + [2323], [2, 2239] + shared + [4179, 1652, 1571, 4913, 2431],
               other + [3051], other + [3643]]
    max_tokens = [1, 1, 1, 2, 1]
    reference, _, finished = run_case(small_case(prompts, max_tokens, 3), 1000, sharing=False)
    assert finished
    out, scheduler, finished = run_case(small_case(prompts, max_tokens, 3), 12)
    assert finished, f"preemptions {scheduler.stats.num_preemptions}"
    assert out == reference


def fuzz_prompts(rng):
    """A probe's batch generator: nested groups over one to four top-level prefixes, plain prompts, and (by
    chance) one large group or duplicated prompts."""
    prompts = []
    for top in range(rng.randint(1, 4)):
        base = [top + 1] + [rng.randrange(1000, 5000) for _ in range(rng.randrange(1, 14))]
        for _ in range(rng.randint(1, 4)):
            nested = base + [rng.randrange(1000, 5000) for _ in range(rng.randrange(1, 14))]
            for _ in range(rng.randint(1, 4)):
                prompts.append(nested + [rng.randrange(1000, 5000) for _ in range(rng.randrange(1, 8))])
    prompts += [[rng.randrange(1000, 5000) for _ in range(rng.randrange(1, 20))] for _ in range(rng.randint(0, 5))]
    kind = rng.random()
    if kind < 0.3:
        base = [99] + [rng.randrange(1000, 5000) for _ in range(rng.randrange(1, 30))]
        prompts += [base + [rng.randrange(1000, 5000) for _ in range(rng.randrange(0, 6))]
                    for _ in range(rng.randint(5, 30))]
    if kind > 0.6:
        prompts += [list(p) for p in rng.sample(prompts, min(len(prompts), rng.randint(1, 6)))]
    prompts = [p for p in prompts if p]
    rng.shuffle(prompts)
    return prompts


def fuzz_case(seed):
    """The probe's case `seed`: its prompts, per-request sampling (max_tokens, stop ids, min_tokens, repetition
    penalty) and engine settings (block size, context, step budget, chunking, threshold, max_num_seqs,
    asynchronous scheduling, plan mode, group order, blocks added to the smallest pool accepted)."""
    rng = random.Random(seed)
    prompts = fuzz_prompts(rng)
    block_size = rng.choice([1, 2, 3, 4, 8, 16])
    longest = max(len(p) for p in prompts)
    max_model_len = rng.choice([longest + 1, longest + 2, longest + 5, longest + 20, 512])
    chunk = rng.random() < 0.85
    budget = rng.choice([1, 2, 3, 8, 16, 64]) if chunk else max(max_model_len, rng.choice([max_model_len,
                                                                                             2 * max_model_len]))
    params = []
    for _ in prompts:
        max_tokens = rng.choice([None, 1, 2, 5, 12, 30]) if rng.random() < 0.95 else None
        stop = rng.random() < 0.4
        min_tokens = rng.choice([0, 0, 0, 2]) if (max_tokens is None or max_tokens >= 2) else 0
        params.append(SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=min_tokens,
                                     stop_token_ids=STOP_IDS if stop else None,
                                     repetition_penalty=1.0 if rng.random() < 0.8 else 1.1))
    config = SchedulerConfig(max_num_batched_tokens=budget, kv_admission_threshold=rng.choice([0.5, 1.0, 2.0, 4.0]),
                             max_num_seqs=rng.choice([None, None, 1, 2, 5]), enable_chunked_prefill=chunk)
    async_scheduling = rng.random() < 0.5
    mode = rng.choice(["multi", "multi", "single"])
    order = rng.choice([ArrivalOrder, PrefillLengthOrder, DecodeWeightedOrder])()
    return dict(prompts=prompts, params=params, block_size=block_size, max_model_len=max_model_len, config=config,
                async_scheduling=async_scheduling, mode=mode, order=order, extra=rng.choice([0, 0, 1, 2, 5]))


def smallest_pool(case):
    """The fewest blocks whose pool `add_request` accepts every request of `case` into, with sharing."""
    num_blocks = 1
    while True:
        try:
            case_engine(case, num_blocks, True)
            return num_blocks
        except ValueError:
            num_blocks += 1


@pytest.mark.parametrize("seed", [2044, 2404, 2424, 2636])
def test_the_probes_stalled_cases_finish_with_the_tokens_of_a_large_pool(seed):
    """The probe's fuzzed cases that ran forever (2404 and 2424 before the first fix, 2044 and 2404 with it,
    2636 with a preempted prefix requeued ahead of the READY prefixes' members: two sibling prefixes released
    each other) finish in the smallest pool accepted (plus the case's extra blocks), with a large pool's tokens wherever
    max_tokens bounds the request (an unbounded one stops at the context, which the pool does not change)."""
    case = fuzz_case(seed)
    reference, _, finished = run_case(case, 4000, sharing=False)
    assert finished
    out, _, finished = run_case(case, smallest_pool(case) + case["extra"])
    assert finished, seed
    assert out == reference
