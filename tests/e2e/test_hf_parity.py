"""Greedy parity with HF transformers (fp32, CPU): token-for-token identical outputs."""

from __future__ import annotations

import pytest

from batchllm import LLM, SamplingParams
from tests.e2e.prompts import CHAT_PROMPTS, RAW_PROMPTS
from tests.helpers import TINY_CONFIGS, hf_greedy

pytestmark = pytest.mark.slow

MAX_NEW = 24
CHUNK = 64  # prefill token budget: the long prompts need several steps


def test_smollm2_matches_transformers_in_one_batched_call(default_model_dir):
    llm = LLM(str(default_model_dir), dtype="float32", device="cpu", max_num_batched_tokens=CHUNK, block_size=16)
    tok = llm.get_tokenizer()
    prompts = [llm.tokenize_prompt(p).token_ids for p in RAW_PROMPTS]
    prompts += [llm.tokenize_prompt(llm.apply_chat_template(c)).token_ids for c in CHAT_PROMPTS]
    assert len(prompts) >= 8
    assert max(len(p) for p in prompts) > CHUNK, "one prompt must be longer than the prefill chunk"
    assert max(len(p) for p in prompts) > 3 * 16, "prompts must span several KV blocks"

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    expected = hf_greedy(default_model_dir, prompts, MAX_NEW)
    for i, (out, ref) in enumerate(zip(outs, expected)):
        assert out.outputs[0].token_ids == ref, \
            f"prompt {i}: {tok.decode(out.outputs[0].token_ids)!r} != {tok.decode(ref)!r}"
        reason = "stop" if ref[-1] in llm.eos_token_ids else "length"
        assert out.outputs[0].finish_reason == reason
    # The chat answer that every user checks first.
    assert outs[4].outputs[0].text == "The capital of France is Paris."


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_random_tiny_models_match_transformers(name, tiny_model_factory):
    model_dir = tiny_model_factory(name)
    llm = LLM(model_dir, dtype="float32", device="cpu", max_num_batched_tokens=48, block_size=8)
    prompts = [list(range(5, 5 + n)) for n in (3, 17, 70)] + [[7] * 40, [100, 2000, 30000, 45000]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    expected = hf_greedy(model_dir, prompts, 16, stop_at_eos=False)
    for i, (out, ref) in enumerate(zip(outs, expected)):
        assert out.outputs[0].token_ids == ref, f"{name} prompt {i}"
