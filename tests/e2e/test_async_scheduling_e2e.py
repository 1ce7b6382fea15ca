"""Asynchronous scheduling through the real model runner (SmolLM2, fp32, CPU): placeholder tokens
filled on the device side, results read back a step later, and every output identical to the
synchronous engine's (whose greedy tokens tests/e2e/test_hf_parity.py checks against HF)."""

from __future__ import annotations

import pytest

from batchllm import LLM, SamplingParams
from tests.e2e.prompts import CHAT_PROMPTS, RAW_PROMPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def async_llm(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=2048, async_scheduling=True,
              max_num_batched_tokens=96)
    assert llm.engine.core.async_scheduling
    return llm


def assert_same_outputs(got, expected):
    """Tokens, text, ends and logprob entries equal; logprob values to 1e-4 (the steps are composed
    differently, and fp32 matmuls of other shapes round differently)."""
    for o, e in zip(got, expected, strict=True):
        for c, d in zip(o.outputs, e.outputs, strict=True):
            assert (c.token_ids, c.text, c.finish_reason, c.stop_reason) == (d.token_ids, d.text, d.finish_reason,
                                                                            d.stop_reason)
            assert (c.logprobs is None) == (d.logprobs is None)
            for entry, ref in zip(c.logprobs or [], d.logprobs or [], strict=True):
                assert {t: (lp.rank, lp.decoded_token) for t, lp in entry.items()} == {
                    t: (lp.rank, lp.decoded_token) for t, lp in ref.items()}
                assert [lp.logprob for lp in entry.values()] == pytest.approx([lp.logprob for lp in ref.values()],
                                                                               abs=1e-4)


def test_greedy_tokens_and_stops_match_the_synchronous_engine(default_llm, async_llm):
    prompts = RAW_PROMPTS + [default_llm.apply_chat_template(c) for c in CHAT_PROMPTS]
    greedy = SamplingParams(temperature=0, max_tokens=24)
    expected = default_llm.generate(prompts, greedy, use_tqdm=False)
    got = async_llm.generate(prompts, greedy, use_tqdm=False)
    assert_same_outputs(got, expected)
    assert {o.outputs[0].finish_reason for o in got} == {"stop", "length"}, "some answers end on EOS"
    stats = async_llm.last_stats
    # EOS is seen a step late: each request that stopped may have computed one decode more
    stopped = sum(o.outputs[0].finish_reason == "stop" for o in got)
    assert stats["decode_tokens"] - default_llm.last_stats["decode_tokens"] in range(stopped + 1)


def test_seeded_sampling_logprobs_stop_strings_and_min_tokens_match(default_llm, async_llm):
    prompts = ["Once upon a time, in a small village by the sea,", "The sky is", RAW_PROMPTS[0]]
    params = [
        SamplingParams(n=2, temperature=0.9, top_p=0.9, seed=3, max_tokens=16, logprobs=2),
        SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=20, stop=[".", ","], min_tokens=4),
        SamplingParams(temperature=0, max_tokens=12, logprobs=0, stop=["\n"]),
    ]
    expected = default_llm.generate(prompts, params, use_tqdm=False)
    got = async_llm.generate(prompts, params, use_tqdm=False)
    assert_same_outputs(got, expected)
    assert got[1].outputs[0].finish_reason == "stop" and len(got[1].outputs[0].token_ids) >= 4


def test_stopping_early_leaves_the_engine_clean(async_llm):
    stream = async_llm.iter_generate([async_llm.tokenize_prompt(p) for p in RAW_PROMPTS],
                                     [SamplingParams(temperature=0, max_tokens=8 + 4 * i)
                                      for i in range(len(RAW_PROMPTS))],
                                     use_tqdm=False)
    next(stream)
    stream.close()  # a step is in flight: it is collected and its tokens dropped
    assert not async_llm.engine.core.has_unfinished()
    kv = async_llm.engine.core.scheduler.kv
    assert kv.num_free_blocks == kv.pool.num_blocks
    again = async_llm.generate(RAW_PROMPTS[0], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    assert len(again[0].outputs[0].token_ids) == 5


@pytest.mark.parametrize("where, at", [("wait", 3), ("wait", 9), ("submit", 5)])
def test_a_call_interrupted_mid_step_leaves_the_engine_as_a_fresh_one(tmp_path_factory, monkeypatch, where, at):
    """Through `LLM` and the real runner on the CPU (the engine-core test interrupts a fake executor): see
    `tests.helpers.interrupted_call_case`. On session 60's start, each case left tokens counted as pending."""
    from tests.helpers import interrupted_call_case, make_tiny_model

    model = make_tiny_model("llama", tmp_path_factory.mktemp("interrupted"))
    interrupted_call_case(str(model), "cpu", where, at, monkeypatch)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_second_interrupt_inside_a_calls_clean_up_leaves_the_next_call_whole(tmp_path_factory, async_scheduling):
    """Ctrl-C twice: the first at a step, the second while `LLM` aborts the call's requests. The clean-up stops
    part-way, leaving requests in the engine; the next call aborts them before it starts (`LLM._abort_leftovers`)
    and generates what it generates on a clean engine. (Before, every later call on that LLM failed with a
    KeyError: its steps ran the leftovers, which it has no state for.)"""
    from batchllm import LLM
    from tests.helpers import make_tiny_model

    model = make_tiny_model("llama", tmp_path_factory.mktemp("twice"))
    llm = LLM(str(model), device="cpu", dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=64,
              block_size=16, async_scheduling=async_scheduling)
    try:
        prompts = [{"prompt_token_ids": list(range(10, 60)) + [100 + i] * (i + 1)} for i in range(6)]
        params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        core = llm.engine.core
        step, scheduler = core.step, core.scheduler
        finish, steps, finishes = scheduler._finish, [0], [0]

        def finishing(*args, **kwargs):  # the clean-up's: the second Ctrl-C after its second request
            finish(*args, **kwargs)
            finishes[0] += 1
            if finishes[0] == 2:
                raise KeyboardInterrupt("second")

        def stepping():
            steps[0] += 1
            if steps[0] == 4:
                scheduler._finish = finishing
                raise KeyboardInterrupt("first")
            return step()

        core.step = stepping
        with pytest.raises(KeyboardInterrupt, match="second"):
            llm.generate(prompts, params, use_tqdm=False)
        core.step = step
        del scheduler._finish
        assert core.has_unfinished()  # (what the clean-up left)
        again = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == expected
        assert not core.has_unfinished() and scheduler.num_pending_outputs == 0
    finally:
        llm.shutdown()


def test_ctrl_c_while_a_call_drops_a_suspended_one_leaves_the_llm_usable(tmp_path_factory):
    """A call that starts while another is suspended drops it (`LLM._take_over`); Ctrl-C inside that drop left the
    new call registered as running, and every later call was refused ("another generate call is running on this
    LLM"). The next call now runs, aborting what the drop left (`_abort_leftovers`), and gives a fresh run's tokens."""
    from batchllm import LLM
    from tests.helpers import make_tiny_model

    model = make_tiny_model("llama", tmp_path_factory.mktemp("takeover"))
    llm = LLM(str(model), device="cpu", dtype="float32", skip_tokenizer_init=True, max_model_len=256,
              num_kv_blocks=64)
    try:
        prompts = [{"prompt_token_ids": [10 + i, 11, 12, 13]} for i in range(8)]
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        first = llm.iter_generate([llm.tokenize_prompt(p) for p in prompts],
                                  [SamplingParams(temperature=0, max_tokens=2 if i == 0 else 60, ignore_eos=True)
                                   for i in range(8)], use_tqdm=False)
        next(first)  # (suspended: its other requests still in the engine)
        core = llm.engine.core
        finish = core.finish_requests

        def interrupted(*args, **kwargs):
            core.finish_requests = finish
            raise KeyboardInterrupt("while dropping the suspended call")

        core.finish_requests = interrupted
        with pytest.raises(KeyboardInterrupt):
            llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == expected
    finally:
        llm.shutdown()
