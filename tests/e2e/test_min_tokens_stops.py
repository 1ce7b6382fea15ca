"""min_tokens against the stops it holds back: stop_token_ids and EOS, against transformers' min_new_tokens; a
grammar's end under min_tokens (mutation survivors of session 56's audit)."""

from __future__ import annotations

import pytest

from batchllm import SamplingParams

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_stop_token_ids_wait_for_min_tokens_as_transformers_min_new_tokens(default_llm, default_model_dir):
    """Greedy answers "The capital of France is Paris."; with " Paris" as a stop id and min_tokens past it, the id is
    banned until min_tokens (vLLM's rule) and the answer is transformers' greedy with min_new_tokens over the same
    stop ids (fp32, CPU: the same tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = default_llm.get_tokenizer()
    natural = default_llm.chat(QUESTION, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    paris = tokenizer.encode(" Paris", add_special_tokens=False)[0]
    at = natural.token_ids.index(paris)
    min_tokens = at + 4
    held = SamplingParams(temperature=0, max_tokens=24, min_tokens=min_tokens, stop_token_ids=[paris])
    answer = default_llm.chat(QUESTION, held, use_tqdm=False)[0].outputs[0]
    assert paris not in answer.token_ids[:min_tokens], answer.token_ids

    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    ends = [tokenizer.eos_token_id, paris]  # (the engine's EOS ids for SmolLM2: its tokenizer's alone)
    with torch.no_grad():
        expected = model.generate(ids, do_sample=False, max_new_tokens=24, min_new_tokens=min_tokens,
                                  eos_token_id=ends, pad_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    assert answer.token_ids == expected, (answer.token_ids, expected)
    assert answer.finish_reason == "stop" or len(answer.token_ids) == 24


def test_a_grammar_that_allows_only_its_end_ends_under_min_tokens(default_llm):
    """A choice grammar allows EOS alone once the choice is written: that EOS ends the answer even before
    min_tokens (a grammar wins over min_tokens, as in vLLM), with the choice as its whole text."""
    constrained = SamplingParams(temperature=0, max_tokens=20, min_tokens=12,
                                 structured_outputs={"choice": ["Paris", "Lyon"]})
    answer = default_llm.chat(QUESTION, constrained, use_tqdm=False)[0].outputs[0]
    assert answer.text in ("Paris", "Lyon") and answer.finish_reason == "stop", answer
