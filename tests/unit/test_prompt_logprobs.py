"""Prompt logprobs through the scheduler (torch-free), with a fake runner whose logprobs depend on
the whole context of each row: a row computed from the wrong KV, asked twice, lost, or handed to
the wrong member changes (or breaks) the assembled lists. Sharing on, off, nested, preempted and
released prefixes must all give the same lists, each row asked of the runner exactly once."""

from __future__ import annotations

import random

import pytest

from batchllm.config import SchedulerConfig
from batchllm.core import prompt_logprobs
from batchllm.core.engine_core import EngineCore
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.policies import ArrivalOrder
from batchllm.core.scheduler import Scheduler
from batchllm.core.work_units import build_submission
from batchllm.outputs import PromptLogprobsRows, PromptLogprobsSpec, RunnerOutput, ScheduledBatch, ScheduledRequest
from batchllm.prefix import PrefixPlan, plan_prefix_sharing
from batchllm.request import Request
from batchllm.sampling_params import SamplingParams
from tests.unit.test_prefix_scheduling import PagedKVExecutor

VOCAB = 400


def fake_logprob(context: tuple[int, ...], token: int) -> float:
    """A deterministic 'distribution' over VOCAB tokens given the context up to and including the row."""
    return -float((hash(context) * 31 + token * 17) % 1009) / 100.0


class PromptLogprobsExecutor(PagedKVExecutor):
    """PagedKVExecutor that also answers PromptLogprobsSpecs from the context it reads back."""

    def __init__(self, block_size):
        super().__init__(block_size)
        self.asked: list[tuple[str, int]] = []

    def execute(self, batch):
        output = super().execute(batch)  # writes this step's KV first
        answers = {}
        for r in batch.requests:
            spec = r.prompt_logprobs
            if spec is None:
                continue
            table = self.tables[r.request_id]
            full = [self.slots[(table[p // self.bs], p % self.bs)] for p in range(r.start_position + len(r.token_ids))]
            tops, top_lps, target_lps, ranks = [], [], [], []
            for i, targets in enumerate(spec.targets):
                p = r.start_position + spec.row_start + i
                self.asked.append((r.request_id, p))
                lps = [fake_logprob(tuple(full[:p + 1]), t) for t in range(VOCAB)]
                order = sorted(range(VOCAB), key=lambda t: -lps[t])[:spec.num_top]
                tops.append(order)
                top_lps.append([lps[t] for t in order])
                target_lps.append([lps[t] for t in targets])
                ranks.append([1 + sum(x > lps[t] for x in lps) for t in targets])
            answers[r.request_id] = PromptLogprobsRows(tops, top_lps, target_lps, ranks)
        return RunnerOutput(output.sampled_token_ids, prompt_logprobs=answers)


def run(prompts, ks, *, sharing, num_blocks=200, block_size=4, budget=32, max_tokens=3, threshold=1.0):
    kv = KVCacheManager(num_blocks, block_size)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, kv_admission_threshold=threshold), kv,
                      max_model_len=512)
    executor = PromptLogprobsExecutor(block_size)
    engine = EngineCore(sched, executor)
    requests = [Request(f"r{i}", list(p), SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=k),
                        arrival_index=i) for i, (p, k) in enumerate(zip(prompts, ks))]
    plan = (plan_prefix_sharing(prompts) if sharing else PrefixPlan.without_sharing([len(p) for p in prompts]))
    for r in build_submission(plan, requests, ArrivalOrder(), lambda r: max_tokens, "t-"):
        engine.add_request(r)
    got: dict[str, list] = {}
    steps = 0
    while engine.has_unfinished():
        for update in engine.step():
            if update.prompt_logprobs is not None:
                assert update.request_id not in got, "prompt logprobs are handed over once"
                got[update.request_id] = update.prompt_logprobs
        steps += 1
        assert steps < 5000
    assert len(executor.asked) == len(set(executor.asked)), "no row is asked of the runner twice"
    return got, sched, executor, plan


def expected(prompt, k):
    out = []
    for j in range(1, len(prompt)):
        lps = [fake_logprob(tuple(prompt[:j]), t) for t in range(VOCAB)]
        order = sorted(range(VOCAB), key=lambda t: -lps[t])[:k]
        rank = 1 + sum(x > lps[prompt[j]] for x in lps)
        out.append((lps[prompt[j]], rank, order, [lps[t] for t in order]))
    return out


def as_tuples(entries):
    return [(e.sampled_logprob, e.sampled_rank, e.top_token_ids, e.top_logprobs) for e in entries]


def grouped(rng, groups=2, members=3, prefix_len=13):
    prompts = []
    for _ in range(groups):
        prefix = [rng.randrange(VOCAB) for _ in range(prefix_len)]
        prompts += [prefix + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 9))] for _ in range(members)]
    return prompts


@pytest.mark.parametrize("sharing", [True, False])
def test_each_request_gets_its_own_prompt_logprobs_with_its_own_k(sharing):
    rng = random.Random(1)
    prompts = grouped(rng) + [[7], [8, 9]]
    ks = [2, None, 5, 0, 3, 1, 4, 2]
    got, sched, ex, plan = run(prompts, ks, sharing=sharing, budget=6)  # chunks of 6: every prompt spans chunks
    assert set(got) == {f"r{i}" for i, k in enumerate(ks) if k is not None}
    for i, (p, k) in enumerate(zip(prompts, ks)):
        if k is not None:
            assert as_tuples(got[f"r{i}"]) == expected(p, k)
    if sharing:
        assert plan.groups
        prefix_rows = [pos for rid, pos in ex.asked if rid.startswith("t-g")]
        asking = [g for g in plan.groups if any(ks[p] is not None for p in plan.prompts_under(g.group_id))]
        own = [g.prefix_len - (plan.groups[g.parent].prefix_len if g.parent is not None else 0) for g in asking]
        assert len(prefix_rows) == sum(own), "each prefix row asked once"
    # rows 0..P-2 of each asking request, nothing for the one that did not ask
    assert not any(rid == "r1" for rid, _ in ex.asked)


def test_no_prompt_logprobs_means_no_specs():
    rng = random.Random(2)
    prompts = grouped(rng)
    got, _, ex, _ = run(prompts, [None] * len(prompts), sharing=True)
    assert got == {} and ex.asked == []
    assert all(r.prompt_logprobs is None for b in ex.batches for r in b.requests)


def test_nested_groups_and_members_that_end_right_after_the_prefix():
    # an instruction shared by all, two documents shared by some; members whose suffix is one token
    # (their every row but none is in the prefixes above them)
    instruction = [1, 2, 3, 4, 5]
    prompts = []
    for doc in ([10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25, 26]):
        prompts += [instruction + doc + [30], instruction + doc + [31, 32], instruction + doc + [33, 34, 35]]
    ks = [1, 2, 0, 3, None, 1]
    got, _, _, plan = run(prompts, ks, sharing=True, budget=5)
    assert any(g.parent is not None for g in plan.groups)
    for i, (p, k) in enumerate(zip(prompts, ks)):
        if k is not None:
            assert as_tuples(got[f"r{i}"]) == expected(p, k)


def test_preemption_and_released_prefixes_neither_lose_nor_repeat_rows():
    rng = random.Random(3)
    prompts = grouped(rng, groups=3, members=3, prefix_len=17) + [[1] + [rng.randrange(VOCAB) for _ in range(40)]]
    ks = [2] * len(prompts)
    base, *_ = run(prompts, ks, sharing=False)
    got, sched, _, _ = run(prompts, ks, sharing=True, num_blocks=20, threshold=4.0, max_tokens=6)
    assert sched.stats.num_preemptions > 0
    got_no_pressure, *_ = run(prompts, ks, sharing=True, max_tokens=6)
    for rid in base:
        assert as_tuples(got[rid]) == as_tuples(base[rid]) == as_tuples(got_no_pressure[rid])


def test_released_prefixes_keep_their_rows():
    # a pool of 12 blocks, overcommitted: READY prefixes are released to unblock the batch and
    # recomputed later; their rows are not asked again (the executor asserts it) nor lost
    rng = random.Random(1)
    prompts = grouped(rng, groups=4, members=2, prefix_len=17) + [[1] + [rng.randrange(VOCAB) for _ in range(30)]]
    ks = [1] * len(prompts)
    got, sched, _, _ = run(prompts, ks, sharing=True, num_blocks=12, threshold=4.0, max_tokens=6)
    base, *_ = run(prompts, ks, sharing=False, max_tokens=6)
    assert sched.stats.num_prefix_releases > 0
    assert {rid: as_tuples(v) for rid, v in got.items()} == {rid: as_tuples(v) for rid, v in base.items()}


def test_spec_watermark_and_fork_targets():
    prefix = Request("g", [5, 6, 7], SamplingParams(max_tokens=1, prompt_logprobs=2), is_prefix=True)
    members = [Request(f"m{i}", [5, 6, 7, t, 9], SamplingParams(prompt_logprobs=k), parent=prefix)
               for i, (t, k) in enumerate([(40, 1), (30, None), (40, 3), (20, 0)])]
    prefix.pending_members = list(members)
    first = prompt_logprobs.spec_for_chunk(prefix, 0, 2)
    assert (first.num_top, first.row_start, first.targets) == (2, 0, [(6,), (7,)])
    last = prompt_logprobs.spec_for_chunk(prefix, 2, 1)
    assert last.targets == [(20, 40)]  # the asking members' next tokens, each once (30 did not ask)
    assert prompt_logprobs.spec_for_chunk(prefix, 0, 3) is None  # recomputed after a release: asks nothing
    member = members[0]
    assert prompt_logprobs.spec_for_chunk(member, 3, 2).targets == [(9,)]  # row 4 (the last token) samples


def test_a_missing_row_is_an_error_that_names_it():
    r = Request("r", [1, 2, 3], SamplingParams(prompt_logprobs=1))
    prompt_logprobs.record(r, PromptLogprobsSpec(1, 0, [(2,)]), 0, PromptLogprobsRows([[2]], [[-0.1]], [[-0.1]], [[1]]))
    with pytest.raises(RuntimeError, match="position 2 were never computed"):
        prompt_logprobs.assemble(r)


def test_prompt_logprob_rows_reach_tensor_parallel_followers():
    from batchllm.parallel.step_channel import decode_batch, encode_batch

    spec = PromptLogprobsSpec(3, 1, [(5,), (6, 7)])
    batch = ScheduledBatch([ScheduledRequest("a", [1, 2, 3], 0, [4], 0, None, (), spec),
                            ScheduledRequest("b", [8], 3, [], 1, None)])
    a, b = decode_batch(encode_batch(batch)).requests
    assert (a.prompt_logprobs.row_start, a.prompt_logprobs.num_rows) == (1, 2)
    assert b.prompt_logprobs is None
