"""The reference backend on the GPU agrees with the CPU engine (fp32 greedy, tiny random models)."""

import pytest

from batchllm import LLM, SamplingParams
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_cuda_fp32_greedy_matches_cpu(name, tmp_path):
    model_dir = str(make_tiny_model(name, tmp_path))  # no tokenizer: the device has no default model
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 33, 90)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    cpu = LLM(model_dir, device="cpu", dtype="float32", max_num_batched_tokens=32, block_size=8,
              skip_tokenizer_init=True)
    gpu = LLM(model_dir, device="cuda", dtype="float32", max_num_batched_tokens=32, block_size=8,
              kv_cache_memory_gib=0.5, skip_tokenizer_init=True, attention_backend="torch")
    expect = [o.outputs[0].token_ids for o in cpu.generate(prompts, sp, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in gpu.generate(prompts, sp, use_tqdm=False)]
    assert got == expect
