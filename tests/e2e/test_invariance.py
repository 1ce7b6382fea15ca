"""Greedy tokens do not depend on batching, chunking or preemption (SmolLM2, fp32, CPU)."""

from __future__ import annotations

import pytest

from batchllm import LLM, SamplingParams
from tests.e2e.prompts import CHAT_PROMPTS, RAW_PROMPTS

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=20)


@pytest.fixture(scope="module")
def prompts(default_llm):
    rendered = [default_llm.apply_chat_template(c) for c in CHAT_PROMPTS]
    return RAW_PROMPTS + rendered


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def reference(default_llm, prompts):
    return tokens(default_llm.generate(prompts, GREEDY, use_tqdm=False))


def test_batch_equals_single_calls(default_llm, prompts, reference):
    singles = [tokens(default_llm.generate(p, GREEDY, use_tqdm=False))[0] for p in prompts]
    assert singles == reference


def test_chunked_equals_unchunked_prefill(default_model_dir, prompts, reference):
    chunked = LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=2048,
                  max_num_batched_tokens=16)
    out = chunked.generate(prompts, GREEDY, use_tqdm=False)
    assert tokens(out) == reference
    assert chunked.last_stats["num_steps"] > 20
    whole = LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=2048,
                max_num_batched_tokens=2048, enable_chunked_prefill=False)
    assert tokens(whole.generate(prompts, GREEDY, use_tqdm=False)) == reference


def test_forced_preemption_gives_the_same_tokens(default_llm, default_model_dir, prompts, reference):
    lengths = [len(default_llm.tokenize_prompt(p).token_ids) + GREEDY.max_tokens for p in prompts]
    # Room for the longest request plus a little: far less than the batch needs at once.
    num_blocks = -(-max(lengths) // 16) + 4
    assert num_blocks * 16 < sum(lengths) // 2
    # Admission projects KV use exactly here and would avoid preemption: overcommit on purpose.
    # (Preemption with prefix sharing on: tests/e2e/test_prefix_sharing_e2e.py.)
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=512, prefix_sharing=False,
              block_size=16, num_kv_blocks=num_blocks, max_num_batched_tokens=256, kv_admission_threshold=4.0)
    out = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.last_stats["num_preemptions"] > 0, "the cache was meant to be too small for the batch"
    assert tokens(out) == reference
    assert llm.engine.core.scheduler.kv.num_free_blocks == num_blocks
