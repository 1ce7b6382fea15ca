"""bfloat16 and float16 run on the CPU too, and stay close to float32."""

import pytest

from batchllm import LLM, SamplingParams

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runs_and_agrees_with_float32_at_first(dtype, tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (4, 40)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5)
    full = LLM(model_dir, device="cpu", dtype="float32").generate(prompts, sp, use_tqdm=False)
    llm = LLM(model_dir, device="cpu", dtype=dtype)
    assert llm.engine.kv_spec.bytes_per_block == llm.model_spec.kv_bytes_per_token * 16 * 2  # 2-byte KV
    half = llm.generate(prompts, sp, use_tqdm=False)
    for a, b in zip(half, full):
        a, b = a.outputs[0], b.outputs[0]
        assert len(a.token_ids) == 8
        assert a.token_ids[0] in b.logprobs[0], "the first token is among float32's top 5"
