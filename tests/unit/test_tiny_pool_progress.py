"""A batch always finishes, however small the KV pool (as long as each request and its prefixes fit, which
`add_request` checks): no step sequence repeats forever. A probe of the bulk-finish tests found one that did: the
only running request could not grow beside READY prefixes kept for waiting members, so it preempted itself,
was admitted again (the step was never empty, so the idle prefixes were never released) and stopped at the
same place, step after step."""

from __future__ import annotations

import random

import pytest

from batchllm.config import SchedulerConfig
from batchllm.core.engine_core import EngineCore
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.policies import ArrivalOrder
from batchllm.core.scheduler import Scheduler
from batchllm.core.work_units import build_submission
from batchllm.prefix import plan_prefix_sharing
from batchllm.request import Request
from batchllm.sampling_params import SamplingParams
from tests.unit.test_async_scheduling import STOP_IDS, AsyncPagedKVExecutor
from tests.unit.test_bulk_finish import nested_prompts, outputs
from tests.unit.test_prefix_scheduling import PagedKVExecutor

STEP_CAP = 3000  # the largest batch below takes ~300 steps in its smallest pool


def run_batch(seed: int, num_blocks: int | None, sharing: bool = True):
    """The seed's nested prompts (random step budget, admission threshold, max_tokens and stop tokens) through an
    engine whose pool has `num_blocks` blocks of 4 tokens (None: the seed's tiny pool of 14-20); returns the
    outputs, the scheduler and whether the batch finished within STEP_CAP steps. The runner's tokens are a
    function of the whole context it reads from the KV slots, so a wrong or missing KV changes them."""
    rng = random.Random(1000 + seed)
    prompts = nested_prompts(rng)
    tiny = rng.choice([14, 16, 20])
    config = SchedulerConfig(max_num_batched_tokens=rng.choice([16, 32, 64]),
                             kv_admission_threshold=rng.choice([1.0, 4.0]))
    async_scheduling = seed % 2 == 0
    executor = AsyncPagedKVExecutor(4) if async_scheduling else PagedKVExecutor(4)
    scheduler = Scheduler(config, KVCacheManager(num_blocks or tiny, 4), max_model_len=512)
    engine = EngineCore(scheduler, executor, async_scheduling=async_scheduling)
    requests = [Request(f"c-{i}", list(p), SamplingParams(
        temperature=0, max_tokens=rng.randrange(1, 12), stop_token_ids=STOP_IDS if rng.random() < 0.5 else None),
        arrival_index=i) for i, p in enumerate(prompts)]
    plan = plan_prefix_sharing(prompts, mode="multi", share=sharing)
    submission = list(build_submission(plan, requests, ArrivalOrder(), lambda r: r.sampling_params.max_tokens, "c-p-"))
    for r in submission:
        engine.add_request(r)
    for _ in range(STEP_CAP):
        if not engine.has_unfinished():
            break
        engine.step()
    engine.drain()
    return outputs(submission), scheduler, not engine.has_unfinished()


@pytest.mark.parametrize("seeds", [range(0, 100), range(100, 200)])
def test_every_batch_finishes_in_a_tiny_pool_with_the_tokens_of_a_large_one(seeds):
    """Over seeds of nested groups in pools of 14-20 blocks (seed 10 stalled before), synchronous and
    asynchronous: every request ends, with exactly the tokens a 400-block pool without sharing gives."""
    for seed in seeds:
        reference, _, finished = run_batch(seed, 400, sharing=False)
        assert finished, seed
        out, _, finished = run_batch(seed, None)
        assert finished, f"seed {seed}: the batch did not finish within {STEP_CAP} steps"
        assert out == reference, seed


def test_the_stalled_batch_releases_a_prefix_instead_of_preempting_its_only_running_request():
    """Seed 10's batch (16 blocks, asynchronous, threshold 4): it finishes by releasing idle READY prefixes
    (recomputed later), and finishes with fewer preemptions than the steps it used to loop through."""
    out, scheduler, finished = run_batch(10, None)
    assert finished
    assert scheduler.stats.num_prefix_releases > 0
    assert scheduler.stats.num_preemptions < 100
