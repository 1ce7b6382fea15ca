"""LLM.shutdown: the engine is dropped (its memory can be reused by the next LLM in the process) and
the LLM refuses further work with a message instead of failing somewhere inside."""

import pytest

from batchllm import LLM, SamplingParams


def test_generate_after_shutdown_is_a_named_error(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), skip_tokenizer_init=True, kv_cache_memory_gib=0.05)
    params = SamplingParams(temperature=0, max_tokens=2)
    assert len(llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)[0].outputs[0].token_ids) == 2
    llm.shutdown()
    assert llm.engine is None
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
