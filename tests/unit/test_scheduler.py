"""Scheduler behaviour with a fake executor: budgets, chunking, mixing, preemption and resume."""

from __future__ import annotations

import pytest

from batchllm.config import SchedulerConfig
from batchllm.core.engine_core import EngineCore
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.scheduler import Scheduler
from batchllm.outputs import RunnerOutput, ScheduledBatch
from batchllm.request import Request
from batchllm.sampling_params import SamplingParams


class EchoExecutor:
    """Samples token = (position of the new token) % 1000; records every batch."""

    def __init__(self):
        self.batches: list[ScheduledBatch] = []

    def execute(self, batch):
        self.batches.append(batch)
        return RunnerOutput({r.request_id: (r.start_position + len(r.token_ids)) % 1000
                             for r in batch.requests if r.sampling is not None})


def make(num_blocks=64, block_size=4, budget=16, max_seqs=None, chunked=True, max_model_len=128, threshold=4.0):
    """threshold 4.0 overcommits the KV pool on purpose, so that preemption paths get exercised."""
    kv = KVCacheManager(num_blocks, block_size)
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, enable_chunked_prefill=chunked,
                             kv_admission_threshold=threshold)
    sched = Scheduler(config, kv, max_model_len)
    executor = EchoExecutor()
    return EngineCore(sched, executor), sched, executor


def req(rid, n_prompt, max_tokens=4, **kw):
    kw.setdefault("temperature", 0)
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def run_all(engine):
    finished = {}
    while engine.has_unfinished():
        for u in engine.step():
            if u.finish_reason:
                finished[u.request_id] = u.finish_reason
    return finished


def test_long_prompt_is_chunked_to_the_budget_and_samples_only_at_its_end():
    engine, sched, ex = make(budget=16)
    engine.add_request(req("a", 40, max_tokens=2))
    engine.step()
    engine.step()
    engine.step()
    chunks = [(b.requests[0].start_position, len(b.requests[0].token_ids), b.requests[0].sampling is not None)
              for b in ex.batches]
    assert chunks == [(0, 16, False), (16, 16, False), (32, 8, True)]
    assert sched.requests["a"].output_token_ids == [40]


def test_decode_tokens_come_first_and_prefill_fills_the_rest_of_the_step():
    engine, sched, ex = make(budget=10)
    engine.add_request(req("a", 3, max_tokens=10))
    engine.step()  # a: whole prompt
    engine.add_request(req("b", 30, max_tokens=2))
    engine.step()
    batch = ex.batches[-1]
    assert [(r.request_id, len(r.token_ids)) for r in batch.requests] == [("a", 1), ("b", 9)]
    assert batch.num_tokens == 10


def test_token_budget_is_never_exceeded():
    engine, sched, ex = make(budget=12, num_blocks=200)
    for i in range(10):
        engine.add_request(req(f"r{i}", 5 + 3 * i, max_tokens=6))
    run_all(engine)
    assert max(b.num_tokens for b in ex.batches) <= 12
    assert sum(b.num_tokens for b in ex.batches) == sum(5 + 3 * i + 6 - 1 for i in range(10))


def test_max_num_seqs_caps_running_requests():
    engine, sched, ex = make(budget=100, max_seqs=2)
    for i in range(4):
        engine.add_request(req(f"r{i}", 3))
    engine.step()
    assert [r.request_id for r in ex.batches[0].requests] == ["r0", "r1"]


def test_without_chunking_a_prompt_waits_for_a_step_with_room():
    engine, sched, ex = make(budget=32, chunked=False)
    engine.add_request(req("a", 20, max_tokens=3))
    engine.add_request(req("b", 20, max_tokens=3))
    engine.step()
    assert [r.request_id for r in ex.batches[0].requests] == ["a"]
    engine.step()  # a decodes (1) and b's whole prompt (20) fits now
    assert [(r.request_id, len(r.token_ids)) for r in ex.batches[1].requests] == [("a", 1), ("b", 20)]


def test_preemption_frees_blocks_recomputes_and_finishes_with_the_same_tokens():
    # 6 blocks of 4 tokens = 24 slots; two requests of 8 prompt + 8 output tokens need 32.
    engine, sched, ex = make(num_blocks=6, block_size=4, budget=64)
    engine.add_request(req("a", 8, max_tokens=8))
    engine.add_request(req("b", 8, max_tokens=8))
    finished = run_all(engine)
    assert finished == {"a": "length", "b": "length"}
    assert sched.stats.num_preemptions >= 1
    # the preempted request's recompute covered its prompt and the outputs it already had
    recomputes = [r for b in ex.batches for r in b.requests if r.start_position == 0 and len(r.token_ids) > 8]
    assert recomputes, "a preempted request resumes by recomputing prompt + outputs"
    assert sched.kv.num_free_blocks == 6


def test_preempted_outputs_equal_unpreempted_outputs():
    outputs = {}
    for num_blocks in (6, 100):
        engine, sched, ex = make(num_blocks=num_blocks, block_size=4, budget=64)
        for rid in ("a", "b", "c"):
            engine.add_request(req(rid, 8, max_tokens=8))
        reqs = dict(sched.requests)
        run_all(engine)
        outputs[num_blocks] = {rid: r.output_token_ids for rid, r in reqs.items()}
    assert outputs[6] == outputs[100]


def test_kv_use_never_exceeds_the_pool_and_all_blocks_return():
    engine, sched, ex = make(num_blocks=10, block_size=4, budget=20)
    for i in range(8):
        engine.add_request(req(f"r{i}", 6 + i, max_tokens=10))
    run_all(engine)
    assert sched.stats.peak_used_blocks <= 10
    assert sched.kv.num_free_blocks == 10
    assert not sched.requests


def test_finished_requests_are_reported_to_the_runner_once():
    engine, sched, ex = make()
    engine.add_request(req("a", 3, max_tokens=1))
    engine.add_request(req("b", 3, max_tokens=3))
    run_all(engine)
    reported = [rid for b in ex.batches for rid in b.finished_request_ids]
    assert reported == ["a"]  # b finished in the last step; no later batch carries it


def test_stop_token_and_eos_and_min_tokens():
    engine, sched, ex = make()
    # EchoExecutor samples the position: prompt of 3 -> tokens 3, 4, 5, ...
    r = Request("eos", [1, 2, 3], SamplingParams(temperature=0, max_tokens=10), eos_token_ids=frozenset({5}),
                model_eos_token_id=5)
    # an EOS id beside the tokenizer's (generation_config's): vLLM makes it a stop token, so it is the reason
    x = Request("extra-eos", [1, 2, 3], SamplingParams(temperature=0, max_tokens=10),
                eos_token_ids=frozenset({2, 5}), model_eos_token_id=2)
    s = Request("stop", [1, 2, 3], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[4]))
    m = Request("min", [1, 2, 3], SamplingParams(temperature=0, max_tokens=10, min_tokens=4),
                eos_token_ids=frozenset({5}))
    ign = Request("ign", [1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                  eos_token_ids=frozenset({5}))
    for request in (r, s, m, ign, x):
        engine.add_request(request)
    assert run_all(engine) == {"eos": "stop", "stop": "stop", "min": "length", "ign": "length", "extra-eos": "stop"}
    assert r.output_token_ids == [3, 4, 5] and r.stop_reason is None
    assert x.output_token_ids == [3, 4, 5] and x.stop_reason == 5
    assert s.output_token_ids == [3, 4] and s.stop_reason == 4
    assert m.output_token_ids == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]  # EOS at 5 came before min_tokens
    assert ign.output_token_ids == [3, 4, 5, 6]
    # while below min_tokens the runner is told to ban EOS
    m_specs = [r.sampling for b in ex.batches for r in b.requests if r.request_id == "min" and r.sampling]
    assert m_specs[0].banned_token_ids == (5,) and m_specs[4].banned_token_ids == ()


def test_context_length_ends_generation():
    engine, sched, ex = make(max_model_len=10)
    engine.add_request(req("a", 7, max_tokens=None))
    assert run_all(engine) == {"a": "length"}


def test_the_context_ends_before_max_tokens_and_ignore_eos_keeps_stop_token_ids():
    """The finish check runs only for tokens in stop_token_set or at max_output_tokens: both limits
    and a stop id under ignore_eos must still end requests."""
    engine, sched, ex = make(max_model_len=10)
    ctx = req("ctx", 7, max_tokens=20)
    ign = Request("ign", [1, 2, 3], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, stop_token_ids=[6]),
                  eos_token_ids=frozenset({4}))
    for x in (ctx, ign):
        engine.add_request(x)
    assert (ctx.max_output_tokens, ign.max_output_tokens) == (3, 6)
    assert ign.stop_token_set == frozenset({6})
    assert run_all(engine) == {"ctx": "length", "ign": "stop"}
    assert len(ctx.output_token_ids) == 3
    assert ign.output_token_ids == [3, 4, 5, 6] and ign.stop_reason == 6


def test_bad_requests_are_refused_with_a_reason():
    engine, sched, ex = make(num_blocks=2, block_size=4, max_model_len=100)
    with pytest.raises(ValueError, match="empty prompt"):
        engine.add_request(Request("e", [], SamplingParams()))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(req("long", 100))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(req("big", 5, max_tokens=50))
    engine.add_request(req("ok", 3, max_tokens=2))
    with pytest.raises(ValueError, match="duplicate"):
        engine.add_request(req("ok", 3))


def test_finish_from_outside_frees_blocks_and_is_reported():
    engine, sched, ex = make()
    engine.add_request(req("a", 5, max_tokens=50))
    engine.step()
    engine.finish_requests(["a"], "stop", "###")
    assert not engine.has_unfinished()
    assert sched.kv.num_free_blocks == 64
    engine.add_request(req("b", 3, max_tokens=1))
    engine.step()
    assert ex.batches[-1].finished_request_ids == ["a"]


def test_block_tables_travel_as_diffs():
    engine, sched, ex = make(block_size=4, budget=64)
    engine.add_request(req("a", 6, max_tokens=6))  # 6 + 6 tokens: 2 blocks, a 3rd at position 8
    run_all(engine)
    sent = [(r.block_table_start, r.block_ids) for b in ex.batches for r in b.requests]
    assert sent[0] == (0, [0, 1])  # the whole table on admission
    assert all(ids == [] for start, ids in sent[1:3])  # decodes within the blocks send nothing
    assert (2, [2]) in sent  # the block for position 8 arrives once, when it is allocated


def test_runner_block_tables_apply_diffs_reuse_rows_and_widen():
    from batchllm.runner.model_runner import _BlockTables

    t = _BlockTables(max_width=1000)
    t.update("a", 0, [5, 6])
    assert t.lists["a"] == [5, 6]
    t.update("a", 2, [9])
    assert t.lists["a"] == [5, 6, 9]
    t.update("b", 0, list(range(100, 200)))  # wider than the initial 64 columns
    assert t.gather(["b", "a"], 3).tolist() == [[100, 101, 102], [5, 6, 9]]
    with pytest.raises(RuntimeError, match="scheduler sent from 1"):
        t.update("a", 1, [7])
    t.update("a", 0, [1])  # a fresh table after preemption replaces the old one
    assert t.gather(["a"], 1).tolist() == [[1]] and t.lists["a"] == [1]
    t.drop("a")
    t.update("c", 0, [3])
    assert t.gather(["c"], 1).tolist() == [[3]]
    for i in range(200):  # more rows than the initial capacity
        t.update(f"r{i}", 0, [i])
    assert t.gather(["r199", "b"], 1).tolist() == [[199], [100]]


def test_runner_inputs_name_a_request_whose_table_disagrees_with_the_scheduler(tiny_model_factory):
    """A step that sends no table entries leaves the runner's table as it is: if the scheduler's count of
    sent entries disagrees with what the runner holds, the step fails naming the request (it would
    otherwise read another request's KV blocks)."""
    from batchllm import LLM
    from batchllm.outputs import ScheduledRequest

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=16,
              block_size=4)
    try:
        runner = llm.engine.runner
        step = runner._host_inputs(ScheduledBatch([ScheduledRequest("a", [5, 6, 7, 8, 9], 0, [3, 7], 0, None),
                                                   ScheduledRequest("b", [5, 6], 0, [2], 0, None)]))
        assert step.block_tables.tolist() == [[3, 7], [2, 0]] and step.slots.tolist() == [12, 13, 14, 15, 28, 8, 9]
        step = runner._host_inputs(ScheduledBatch([ScheduledRequest("a", [10], 5, [], 2, None)]))  # nothing new
        assert step.slots.tolist() == [29]
        with pytest.raises(RuntimeError, match="b: runner holds 1 blocks, scheduler's table has 2"):
            runner._host_inputs(ScheduledBatch([ScheduledRequest("a", [11], 6, [], 2, None),
                                                ScheduledRequest("b", [10], 4, [], 2, None)]))
    finally:
        llm.shutdown()


def test_a_step_output_missing_a_sampling_rows_token_is_refused():
    """The scheduler walks the output's tokens (one per sampling row, in batch order): an output with one
    too few fails by name instead of leaving a request waiting for a token that never comes."""
    engine, sched, ex = make(budget=64)
    engine.add_request(req("a", 6))
    engine.add_request(req("b", 6))
    batch = sched.schedule()
    assert batch.num_sampling_rows == 2
    output = ex.execute(batch)
    del output.sampled_token_ids["b"]
    with pytest.raises(RuntimeError, match="sampled 1 tokens for 2 sampling rows"):
        sched.update_from_output(batch, output)


def test_a_scheduler_without_a_resolved_step_budget_is_refused_by_name():
    """SchedulerConfig's default budget is None (the engine picks the device's); a Scheduler built
    on it directly would fail at its first step with a TypeError, so it is refused up front."""
    with pytest.raises(ValueError, match="max_num_batched_tokens is None"):
        Scheduler(SchedulerConfig(), KVCacheManager(8, 4), 64)


def test_without_max_tokens_a_request_runs_to_what_the_cache_holds_when_that_is_less_than_the_context(
        tiny_model_factory):
    """max_tokens None (vLLM's: up to the context; OpenAI Batch lines without one) asked for the whole
    context, so with a cache smaller than the context every such request was refused ("may need 256
    tokens of KV cache, but the cache holds 64"). It now stops with "length" where the cache is full, at the
    same length whatever else runs: members that could share a prefix then run unshared (review: the limit
    depended on the sharing, so n > 1 got shorter answers than n = 1)."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=4,
              block_size=16)
    params = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    try:
        alone = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0]
        siblings = llm.generate([list(range(5, 25)) + [30], list(range(5, 25)) + [31]], params, use_tqdm=False)
        three = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=None, temperature=0.8, seed=1, n=3,
                                                         ignore_eos=True), use_tqdm=False)[0]
        with pytest.raises(ValueError, match=r"but the cache holds 64; raise num_kv_blocks \(--num-kv-blocks, now 4\)"):
            llm.generate([list(range(5, 70))], params, use_tqdm=False)
    finally:
        llm.shutdown()
    # the cache's 64 entries hold every token but the last, which is never written (`kv_tokens_written`)
    assert (len(alone.token_ids), alone.finish_reason) == (64 - 3 + 1, "length")
    assert [len(o.outputs[0].token_ids) for o in siblings] == [64 - 21 + 1, 64 - 21 + 1]
    assert [len(c.token_ids) for c in three.outputs] == [64 - 3 + 1] * 3


def test_without_max_tokens_in_a_small_cache_members_still_share_their_prefix_to_its_last_full_block(
        tiny_model_factory, caplog):
    """Members without max_tokens may fill the whole cache, which left no room for a copy of their prefix's
    partial last block: every one was planned unshared, silently (a 100-line chat batch computed 78,040 prompt
    tokens for an ideal 4,112). Their prefix is now cut back to its last block boundary (40 tokens to 32) and
    shared: each member computes at most block_size - 1 tokens more, the outputs are those of an unshared run,
    and the warning says so once per LLM, naming the members and what to change."""
    from batchllm import LLM

    shared = list(range(5, 45))  # 40 tokens: 2 full blocks of 16 and 8 more
    prompts = [shared + [50 + i, 60 + i, 70 + i] for i in range(4)]
    params = SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)
    outputs, stats = {}, {}
    for sharing in (True, False):
        llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=8,
                  block_size=16, prefix_sharing=sharing)
        try:
            with caplog.at_level("WARNING", logger="batchllm"):
                outputs[sharing] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
                stats[sharing] = llm.last_stats
                llm.generate(prompts[:2], params, use_tqdm=False)
        finally:
            llm.shutdown()
    assert outputs[True] == outputs[False] and [len(t) for t in outputs[True]] == [128 - 43 + 1] * 4
    assert stats[True]["planned_prefill_tokens"] == 32 + 4 * 11 and stats[True]["num_groups"] == 1
    assert stats[False]["planned_prefill_tokens"] == 4 * 43
    assert stats[True]["num_block_copies"] == 0
    warnings = [r.getMessage() for r in caplog.records if "last full block" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("4 of 4 requests") and "--num-kv-blocks, now 8" in warnings[0]
    assert "give them a max_tokens or raise num_kv_blocks" in warnings[0]
    caplog.clear()  # (members with a max_tokens that fills the cache: the advice was to give them one anyway)
    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=8,
              block_size=16)
    try:
        with caplog.at_level("WARNING", logger="batchllm"):
            llm.generate(prompts, SamplingParams(max_tokens=128 - 43 + 1, temperature=0, ignore_eos=True),
                         use_tqdm=False)
    finally:
        llm.shutdown()
    [bounded] = [r.getMessage() for r in caplog.records if "last full block" in r.getMessage()]
    assert "To share whole prefixes, raise num_kv_blocks" in bounded


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "async"])
def test_a_request_that_fits_the_kv_cache_exactly_runs_as_in_a_larger_cache(tiny_model_factory, overlap):
    """A prompt of 30 tokens with max_tokens 35 writes 64 tokens of KV (its last token is never written): it fits
    a cache of 4 blocks of 16 exactly, where it was refused ("may need 65 tokens of KV cache, but the cache holds
    64"). Its tokens are those of a cache 4 times larger; one token more is still refused, naming 65."""
    from batchllm import LLM

    prompts = [list(range(5, 35)), list(range(40, 70))]
    params = SamplingParams(max_tokens=35, temperature=0, ignore_eos=True)
    outputs = {}
    for blocks in (4, 16):
        llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=blocks,
                  block_size=16, async_scheduling=overlap)
        try:
            assert llm.kv_cache_problem(30, params) is None
            outputs[blocks] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            if blocks == 4:
                with pytest.raises(ValueError, match=r"may need 65 tokens of KV cache, but the cache holds 64"):
                    llm.generate(prompts[:1], SamplingParams(max_tokens=36), use_tqdm=False)
        finally:
            llm.shutdown()
    assert outputs[4] == outputs[16] and [len(t) for t in outputs[4]] == [35, 35]


def test_a_step_that_preempts_admits_no_new_work_beside_its_running_requests():
    """Admitting right after a preemption would only thrash (the admitted request takes the blocks the preempted
    one gave back, and is preempted in turn): a step that preempted and still runs something admits nothing."""
    engine, sched, ex = make(num_blocks=12, block_size=4, budget=16)
    for i in range(6):
        engine.add_request(req(f"r{i}", 12 + i % 3, max_tokens=16))
    checked = 0
    while engine.has_unfinished():
        preemptions_before = sched.stats.num_preemptions
        engine.step()
        starts = {r.request_id: r.start_position for r in ex.batches[-1].requests}
        if sched.stats.num_preemptions > preemptions_before and any(starts.values()):
            checked += 1  # (a request starting at 0 is admitted: a new one, or the preempted one again)
            assert all(starts.values()), starts
    assert checked >= 1, "the pool is small enough to preempt beside running work"
