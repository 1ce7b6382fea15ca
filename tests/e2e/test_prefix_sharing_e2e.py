"""Prefix sharing on SmolLM2 (fp32, CPU): same greedy tokens as without it, and the prefill the
engine counts is the plan's."""

from __future__ import annotations

import pytest

from batchllm import LLM, SamplingParams
from tests.e2e.prompts import LONG_TEXT

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=12)
INSTRUCTION = "You are a careful assistant. Read the document and answer the question briefly.\n\n"
DOCS = [LONG_TEXT, "The river Thames flows through London and has over two hundred bridges and tunnels. " * 3]
QUESTIONS = ["Who is mentioned?", "When did it start?", "What changed?", "Where did it happen?", "Why did it matter?"]


def batch():
    """Nested sharing: an instruction shared by all, a document shared by some, and two prompts
    that share only 3 tokens (less than one block)."""
    prompts = [INSTRUCTION + doc + "\nQuestion: " + q for doc in DOCS for q in QUESTIONS]
    prompts += ["Hello there, how are you?", "Hello there, what time is it?", "Unrelated prompt about cats."]
    return prompts


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def unshared(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", prefix_sharing=False, max_num_batched_tokens=256)
    out = llm.generate(batch(), GREEDY, use_tqdm=False)
    assert llm.last_stats["prefill_tokens_computed"] == llm.last_stats["prompt_tokens"]
    assert [o.num_cached_tokens for o in out] == [0] * len(out)
    return token_ids(out)


@pytest.mark.parametrize("mode", ["multi", "single"])
def test_sharing_gives_the_same_tokens_and_counts_the_planned_prefill(default_model_dir, unshared, mode):
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", plan_mode=mode, max_num_batched_tokens=256)
    out = llm.generate(batch(), GREEDY, use_tqdm=False)
    assert token_ids(out) == unshared
    s = llm.last_stats
    assert s["num_preemptions"] == 0
    assert s["prefill_tokens_computed"] == s["planned_prefill_tokens"]
    assert s["saving_ratio"] > 0.5
    assert s["num_groups"] >= 1 and s["max_sharing_degree"] >= 5
    assert llm.engine.core.scheduler.kv.num_free_blocks == llm.engine.kv_spec.num_blocks
    # each prompt's num_cached_tokens is the shared part it did not compute, as a prefix cache counts hits:
    # a question reads the instruction and its document, which the first question of each document computed
    # (and, planned in levels, the instruction the very first); the "Hello there" pair shares 3 tokens
    # (< one block, still shared), read by the second; the cats share nothing
    document = [len(llm.tokenizer(INSTRUCTION + doc + "\nQuestion:")["input_ids"]) for doc in DOCS]
    instruction = len(llm.tokenizer(INSTRUCTION)["input_ids"])
    cached = [o.num_cached_tokens for o in out]
    for i, doc_tokens in enumerate(document):
        first, rest = cached[5 * i], cached[5 * i + 1: 5 * i + 5]
        if i == 0 or mode == "single":  # (one level of sharing: each document's group computes the instruction)
            assert first == 0, cached
        else:
            assert instruction - 2 <= first < instruction + 5, (cached, instruction)
        assert all(doc_tokens - 2 <= c < doc_tokens + 5 for c in rest), (cached, document)
    assert cached[-1] == 0 and 0 == cached[-3] < cached[-2] < len(out[-2].prompt_token_ids)
    own = sum(len(o.prompt_token_ids) - c for o, c in zip(out, cached))
    assert own == s["prefill_tokens_computed"], "each shared prefix charged once: the sum is the prefill computed"


def test_group_larger_than_the_running_batch(default_model_dir, unshared):
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_num_seqs=3, max_num_batched_tokens=256)
    out = llm.generate(batch(), GREEDY, use_tqdm=False)
    assert token_ids(out) == unshared
    assert llm.last_stats["prefill_tokens_computed"] == llm.last_stats["planned_prefill_tokens"]


def test_forced_preemption_with_sharing(default_model_dir, unshared):
    # A pool of 36 blocks of 8 tokens, and admission overcommitted on purpose: members get preempted.
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", block_size=8, num_kv_blocks=36,
              kv_admission_threshold=4.0, max_num_batched_tokens=256)
    out = llm.generate(batch(), GREEDY, use_tqdm=False)
    s = llm.last_stats
    assert s["num_preemptions"] > 0
    assert token_ids(out) == unshared
    assert llm.engine.core.scheduler.kv.num_free_blocks == 36
    # what preemption computed again (prompts and outputs) is counted apart: the rest is the plan's prefill, and
    # sharing's saving is the plan's (it went negative where preemption recomputed more than sharing saved)
    assert s["recomputed_tokens"] > 0
    assert s["prefill_tokens_computed"] - s["recomputed_tokens"] == s["planned_prefill_tokens"]
    assert s["saving_ratio"] == pytest.approx(1 - s["planned_prefill_tokens"] / s["completion_prompt_tokens"])
    llm.shutdown()


def test_n_completions_share_their_prompt(default_llm):
    sp = SamplingParams(n=4, temperature=0.8, seed=1, max_tokens=8)
    out = default_llm.generate(INSTRUCTION + DOCS[0], sp, use_tqdm=False)
    s = default_llm.last_stats
    prompt_len = len(out[0].prompt_token_ids)
    assert s["prefill_tokens_computed"] == (prompt_len - 1) + 4
    assert out[0].num_cached_tokens == 0, "the prompt is computed once for the four: for this request, not cached"
    assert len(out[0].outputs) == 4
