"""The scheduler/runner seam as columns: the running decodes of a step cross as one `DecodeRows` (ids, start
positions, tokens, sampling specs, prefix chains, table lengths, new table entries), not one ScheduledRequest
each, and a step's results come back to the output side as one `StepUpdates`. Both still read as the objects
they replace (`ScheduledBatch.requests`, iterating the updates), and the runner builds the same inputs from
either form."""

from __future__ import annotations

import numpy as np

from batchllm.core.step_updates import RequestUpdate, StepUpdates
from batchllm.outputs import DecodeRows, RunnerOutput, ScheduledBatch, ScheduledRequest
from batchllm.request import RequestStatus
from tests.unit.test_scheduler import make, req


def test_running_decodes_are_one_set_of_columns_with_the_table_entries_only_where_a_block_opened():
    engine, sched, ex = make(num_blocks=16, block_size=4, budget=64)
    engine.add_request(req("a", 7, max_tokens=6))
    engine.add_request(req("b", 8, max_tokens=6))
    engine.step()  # both prompts: a ends inside its second block, b on a block boundary
    engine.step()
    batch = ex.batches[-1]
    rows = batch.decodes
    assert batch.entries == [] and batch.num_seqs == 2 and batch.num_tokens == 2 and batch.num_sampling_rows == 2
    assert rows.request_ids == ["a", "b"] and rows.start_positions == [7, 8]
    assert rows.token_ids == [7, 8]  # each one's last output (EchoExecutor samples its position)
    assert rows.table_lengths == [2, 3]
    b_table = sched.kv.block_table("b")
    assert rows.new_blocks == [(1, [b_table[2]])]  # only b opened a block
    assert [(r.request_id, r.token_ids, r.start_position, r.block_ids, r.block_table_start)
            for r in batch.requests] == [("a", [7], 7, [], 2), ("b", [8], 8, [b_table[2]], 2)]
    assert all(r.sampling is rows.samplings[i] for i, r in enumerate(batch.requests))


def test_a_decode_that_cannot_open_a_block_preempts_from_the_back_of_the_whole_order():
    """6 blocks of 4: a and b (8-token prompts) take 2 blocks each and one more each at position 8; at
    position 12 the pool is empty, so a, first in order, takes b's (the last running entry) by preempting it."""
    engine, sched, ex = make(num_blocks=6, block_size=4, budget=64)
    a, b = req("a", 8, max_tokens=8), req("b", 8, max_tokens=8)
    engine.add_request(a)
    engine.add_request(b)
    while a.num_computed_tokens < 12:
        engine.step()
    batch = sched.schedule()
    assert batch.decodes.request_ids == ["a"] and batch.decodes.new_blocks == [(0, sched.kv.block_table("a")[3:])]
    assert b.status is RequestStatus.PREEMPTED and sched.stats.num_preemptions == 1 and b.num_computed_tokens == 0


def test_the_runner_builds_the_same_inputs_from_decode_rows_as_from_scheduled_requests(tiny_model_factory):
    from batchllm import LLM
    from batchllm.outputs import SamplingSpec

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=32,
              block_size=4)
    try:
        runner = llm.engine.runner
        greedy = SamplingSpec(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, num_logprobs=None)
        rows = DecodeRows(["a", "b"], [5, 9], [11, 12], [greedy, greedy], [(("p", 4),), ()], [2, 3],
                          [(0, [3, 4]), (1, [5, 6, 7])])
        prefill = ScheduledRequest("c", [1, 2, 3], 0, [8], 0, greedy, (("p", 4),))
        as_columns = ScheduledBatch([prefill], decodes=rows)
        as_objects = ScheduledBatch(as_columns.requests)
        assert [r.block_table_start for r in as_objects.requests] == [0, 0, 0]
        one, two = runner._host_inputs(as_columns), runner._host_inputs(as_objects)  # (start 0: tables replaced)
        for name in ("input_ids", "positions", "slots", "query_start_loc", "seq_lens", "block_tables",
                     "sample_indices", "sample_seqs"):
            assert np.array_equal(getattr(one, name), getattr(two, name)), name
        assert one.share_levels == two.share_levels == [([0, -1, 0], [4, 0, 4])]
        assert one.sample_ids == two.sample_ids == ["a", "b", "c"] and one.tables == two.tables
        assert one.slots.tolist() == [4 * 4 + 1, 7 * 4 + 1, 8 * 4, 8 * 4 + 1, 8 * 4 + 2]  # a: block 4, b: block 7
    finally:
        llm.shutdown()


def test_a_steps_updates_are_columns_that_read_as_request_updates():
    engine, sched, ex = make(budget=64)
    for rid in ("a", "b", "c"):
        engine.add_request(req(rid, 4, max_tokens=2))
    engine.step()
    batch = sched.schedule()
    sched.finish_requests(["b"], "abort")  # b ends while its step is in flight: its token is dropped
    updates = sched.update_from_output(batch, RunnerOutput({"a": 7, "b": 8, "c": 9}))
    assert isinstance(updates, StepUpdates)
    assert updates.request_ids == ["a", "c"] and updates.token_ids == [7, 9] and len(updates) == 2
    assert updates.ended == {"a": ("length", None), "c": ("length", None)}
    assert updates == [RequestUpdate("a", 7, None, "length", None), RequestUpdate("c", 9, None, "length", None)]



def test_requests_of_the_same_settings_share_one_sampling_spec_and_the_runner_reads_it_once():
    """Unseeded, unadjusted requests of equal settings get one SamplingSpec object (its prompt length is kept only
    where penalties or a grammar need it), so the runner tests a step's settings once (`_uniform`); a seeded
    sampling request keeps its own, while a greedy one's seed is dropped (it draws no noise), so the greedy rows
    of `batchllm run`, which seeds every request, share one too."""
    from batchllm.runner.model_runner import _uniform

    engine, sched, ex = make(budget=64)
    engine.add_request(req("a", 5, max_tokens=4))
    engine.add_request(req("b", 9, max_tokens=4))
    engine.add_request(req("g", 7, max_tokens=4, seed=5))
    engine.add_request(req("s", 6, max_tokens=4, seed=3, temperature=0.8))
    engine.step()
    engine.step()
    a, b, g, s = ex.batches[-1].decodes.samplings
    assert a is b is g and a.num_prompt_tokens == 0 and a.seed is None and s is not a and s.seed == 3
    assert _uniform([a, b, g]) is a and _uniform([a, b, s]) is None and _uniform([]) is None


def test_a_completion_reads_its_requests_output_list_and_keeps_its_own_once_a_token_is_left_out():
    """The facade's completion state reads the engine request's output list, which the scheduler writes (so a
    completion that reads no token as it comes costs nothing per token); a token its grammar refused is left
    out of the completion only."""
    from batchllm.output_processor import CompletionState
    from batchllm.sampling_params import SamplingParams

    outputs = [5, 6]
    state = CompletionState(0, SamplingParams(max_tokens=4), None, token_ids=outputs)
    assert not state.reads_every_token and state.token_ids is outputs
    assert state.append(6, None) is None and outputs == [5, 6]  # (the scheduler recorded it already)
    state.leave_out_last_token()
    assert state.token_ids == [5] and outputs == [5, 6]
    assert CompletionState(0, SamplingParams(max_tokens=4, logprobs=1), None, token_ids=[]).reads_every_token
    own = CompletionState(0, SamplingParams(max_tokens=4), None)
    own.append(3, None)
    assert own.token_ids == [3]
