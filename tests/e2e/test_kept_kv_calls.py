"""KV kept from one call to the next on real models (fp32, CPU): a later call takes the blocks an earlier one left,
computes only the rest, and generates what transformers (and an engine without the cache) generates."""

from __future__ import annotations

import pytest

from batchllm import LLM, SamplingParams
from batchllm.sampling_params import BeamSearchParams
from tests.helpers import hf_greedy

pytestmark = pytest.mark.slow

_BUILT: list = []


@pytest.fixture(autouse=True)
def _shut_down_what_a_test_built():
    """Every LLM a test builds (`_llm`) is shut down when the test ends, as the suite's other tests do: its KV pool
    (GiBs reserved on the CPU) goes at once, not when the collector finds the LLM's reference cycle, and a later test
    in the same worker that forks (Ray's auto-init) is not refused memory."""
    yield
    while _BUILT:
        _BUILT.pop().shutdown()


def _llm(*args, **kwargs) -> LLM:
    _BUILT.append(LLM(*args, **kwargs))
    return _BUILT[-1]

SYSTEM = "You are a careful assistant who answers in one short sentence. " * 3
QUESTIONS = ["What is the capital of France?", "Name a large river.", "What colour is the sky?",
             "How many legs has a spider?"]


def _conversations(llm, first=None):
    """Round one's chats, or round two's: each of round one's answers, then a follow-up question."""
    chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    if first is None:
        return chats
    return [chat + [{"role": "assistant", "content": out.outputs[0].text},
                    {"role": "user", "content": "Why? Say it again in other words."}]
            for chat, out in zip(chats, first)]


def test_a_second_round_of_chats_takes_the_first_rounds_kv_and_answers_as_without_it(default_model_dir):
    params = SamplingParams(temperature=0, max_tokens=16)
    llm = _llm(str(default_model_dir), dtype="float32", device="cpu", block_size=16, max_num_batched_tokens=512)
    first = llm.chat(_conversations(llm), params, use_tqdm=False)
    second = llm.chat(_conversations(llm, first), params, use_tqdm=False)
    stats = llm.last_stats
    fresh = _llm(str(default_model_dir), dtype="float32", device="cpu", block_size=16, max_num_batched_tokens=512)
    expected = fresh.chat(_conversations(fresh, first), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in second] == [o.outputs[0].token_ids for o in expected]
    # each second-round prompt starts with its first-round prompt: at least that prompt's full blocks are cached
    # (the system prompt's by the plan, the rest kept from the first round)
    kept = stats["kept_prefill_tokens"]
    assert stats["prefill_tokens_computed"] == fresh.last_stats["prefill_tokens_computed"] - kept
    assert all(o.num_cached_tokens >= len(f.prompt_token_ids) // 16 * 16 for o, f in zip(second, first))
    planned = [o.num_cached_tokens for o in expected]  # (the plan's sharing alone)
    assert sum(o.num_cached_tokens for o in second) - sum(planned) == kept > 0


def test_continuations_match_transformers_greedy(tiny_model_factory):
    """Token prompts continued with their own outputs and new tokens: the tokens transformers generates for the
    continued prompts, with and without an earlier call's KV (and an engine of other settings in between)."""
    model = tiny_model_factory("llama")
    llm = _llm(model, device="cpu", dtype="float32", max_model_len=256, block_size=16)
    base = [[(7 * i + 3 * j) % 300 + 10 for j in range(40 + 9 * i)] for i in range(4)]
    first = llm.generate([{"prompt_token_ids": p} for p in base], SamplingParams(temperature=0, max_tokens=20,
                                                                                 ignore_eos=True), use_tqdm=False)
    continued = [p + list(o.outputs[0].token_ids) + [11, 12, 13] for p, o in zip(base, first)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    second = llm.generate([{"prompt_token_ids": p} for p in continued], params, use_tqdm=False)
    # each takes all of its first sequence (prompt, outputs but the last): full blocks and the partial last one
    assert [o.num_cached_tokens for o in second] == [len(p) + 19 for p in base]
    assert llm.last_stats["kept_prefill_tokens"] == sum(len(p) + 19 for p in base)
    assert [list(o.outputs[0].token_ids) for o in second] == hf_greedy(model, continued, 8, stop_at_eos=False)
    # vLLM's skip_reading_prefix_cache (refused here before): the same continuations take none of the kept KV
    skipped = llm.generate([{"prompt_token_ids": p} for p in continued],
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, skip_reading_prefix_cache=True),
                           use_tqdm=False)
    assert llm.last_stats["kept_prefill_tokens"] == 0 and [o.num_cached_tokens for o in skipped] == [0] * 4
    assert [o.outputs[0].token_ids for o in skipped] == [o.outputs[0].token_ids for o in second]


def test_a_prompt_list_changed_in_place_after_its_call_is_not_mistaken_for_the_kv(tiny_model_factory):
    """A caller extends the prompt list an output gave back (the next turn) before the next call: the KV kept is
    found by the tokens it was computed for, not by the list's new contents."""
    model = tiny_model_factory("llama")
    llm = _llm(model, device="cpu", dtype="float32", max_model_len=256, block_size=16)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    out = llm.generate([[(5 * j) % 97 + 3 for j in range(40)]], params, use_tqdm=False)[0]
    turn = out.prompt_token_ids
    turn[20:] = [7] * 30  # (the list the engine computed: its KV is for the old tokens from 20 on)
    got = llm.generate([{"prompt_token_ids": turn}], params, use_tqdm=False)[0]
    assert llm.last_stats["kept_prefill_tokens"] == 16  # the first block: its tokens are unchanged
    assert list(got.outputs[0].token_ids) == hf_greedy(model, [list(turn)], 12, stop_at_eos=False)[0]


def test_beam_search_steps_compute_only_the_new_tokens(tiny_model_factory):
    """Every beam-search step is a call over the live beams: with the KV of the step before kept, the prompt is
    computed once, not once a step (same beams either way)."""
    model = tiny_model_factory("llama")
    prompts = [{"prompt_token_ids": [(5 * j + i) % 200 + 3 for j in range(70)]} for i in range(2)]
    params = BeamSearchParams(beam_width=2, max_tokens=6)
    results = {}
    for caching in (True, False):
        llm = _llm(model, device="cpu", dtype="float32", max_model_len=256, block_size=16,
                  enable_prefix_caching=caching)
        outputs = llm.beam_search(prompts, params)
        results[caching] = ([[s.tokens for s in o.sequences] for o in outputs],
                            llm.engine.core.scheduler.stats.prefill_tokens)
    assert results[True][0] == results[False][0]
    assert results[True][1] < results[False][1] / 3, results


def _count_steps_of_each_call(llm) -> list[tuple[int, int, int]]:
    """From now on, each `llm.generate` call appends (its prompts, its engine steps, its prefill tokens computed)
    to the list returned."""
    stats, calls, generate = llm.engine.core.scheduler.stats, [], llm.generate

    def counted(prompts, *args, **kwargs):
        before = stats.num_steps, stats.prefill_tokens
        outputs = generate(prompts, *args, **kwargs)
        calls.append((len(prompts), stats.num_steps - before[0], stats.prefill_tokens - before[1]))
        return outputs

    llm.generate = counted
    return calls


def test_each_beam_step_after_the_first_is_one_engine_step_of_the_beams_new_tokens(tiny_model_factory):
    """Prompts sharing their only full block, with wide beams: each step after the first computes one token per
    live beam, in one engine step. Their tails had pushed each other out of one ring of 16 per node: several engine
    steps and up to 2x the tokens. The beams are those without the cache."""
    model = tiny_model_factory("llama")
    block_size = 16
    prompts = [{"prompt_token_ids": [7] * 16 + [(3 * j + n) % 200 + 3 for j in range(n - 16)]} for n in (18, 20, 23)]
    params = BeamSearchParams(beam_width=10, max_tokens=5, ignore_eos=True)
    results = {}
    for caching in (True, False):
        llm = _llm(model, device="cpu", dtype="float32", max_model_len=256, block_size=block_size,
                   enable_prefix_caching=caching)
        calls = _count_steps_of_each_call(llm)
        results[caching] = [[s.tokens for s in o.sequences] for o in llm.beam_search(prompts, params)]
        if caching:
            assert all(steps == 1 and computed == beams for beams, steps, computed in calls[1:]), calls
    assert results[True] == results[False]


def test_a_reset_while_a_call_is_suspended_keeps_nothing_that_call_computed(tiny_model_factory):
    """reset_prefix_cache() while a call is suspended (`iter_generate`), after new weights: what that call's requests
    recorded as they finished had been found by the next call (79 tokens computed with the old weights, other
    tokens). The cache is now cleared as the next call starts: it computes everything, as a fresh engine does."""
    import torch

    def scaled(model):
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.dim() == 2:
                    parameter.mul_(1.5)

    options = dict(skip_tokenizer_init=True, device="cpu", dtype="float32", max_model_len=256, block_size=16,
                   num_kv_blocks=64)
    short, long = (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (1, 30))
    after = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    model = tiny_model_factory("llama")
    fresh = _llm(model, **options)
    fresh.apply_model(scaled)
    for reset in (False, True):
        llm = _llm(model, **options)
        prompts, params = llm._validate([{"prompt_token_ids": list(range(100, 140))},
                                         {"prompt_token_ids": list(range(300, 350))}], [short, long])
        call = llm.iter_generate(prompts, params, use_tqdm=False)
        next(call)  # the short prompt's answer; the long one still runs: the call is suspended
        if reset:
            llm.apply_model(scaled)
            assert llm.reset_prefix_cache() is True
        (_, output), = list(call)
        follow = [{"prompt_token_ids": list(range(300, 350)) + list(output.outputs[0].token_ids) + [7, 8, 9]}]
        got = llm.generate(follow, after, use_tqdm=False)[0].outputs[0].token_ids
        if not reset:
            assert llm.last_stats["kept_prefill_tokens"] >= 64, "(the test's case: the long answer's KV is kept)"
            continue
        assert llm.last_stats["kept_prefill_tokens"] == 0
        assert got == fresh.generate(follow, after, use_tqdm=False)[0].outputs[0].token_ids


def test_seeded_samples_of_a_repeated_call_are_the_same(tiny_model_factory):
    model = tiny_model_factory("llama")
    llm = _llm(model, device="cpu", dtype="float32", max_model_len=256, block_size=16)
    prompts = [{"prompt_token_ids": [(3 * j + i) % 200 + 3 for j in range(50)]} for i in range(3)]
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=10, n=3, seed=7)
    first = llm.generate(prompts, params, use_tqdm=False)
    again = llm.generate(prompts, params, use_tqdm=False)
    assert llm.last_stats["kept_prefill_tokens"] > 0
    assert [[c.token_ids for c in o.outputs] for o in again] == [[c.token_ids for c in o.outputs] for o in first]
