"""The benchmarks' stand-ins for an engine run the real submission path: `dp_overhead.py`'s stub LLM (an
`LLM` without a model) broke silently when `LLM._submit` came to read attributes the stub did not set."""

from __future__ import annotations

import numpy as np

from tests.helpers import benchmark_module


def test_dp_overhead_stub_plans_and_answers_every_prompt(tmp_path, monkeypatch):
    from batchllm.bench import shared_prefix_workload
    from batchllm.inputs import TokenizedPrompt
    from batchllm.options import engine_config
    from batchllm.sampling_params import SamplingParams

    module = benchmark_module("dp_overhead")
    monkeypatch.setenv(module._TIMINGS, str(tmp_path))  # (where the stub leaves its phase timings)
    stub = module._NoModelLLM(0, engine_config(device="cpu", max_model_len=64), 3)
    work = shared_prefix_workload(16, 4, 4, 8, 3, vocab=30000)
    prompts = [TokenizedPrompt(list(p), None, np.asarray(p, dtype=np.int32)) for p in work.prompts]
    results = list(stub.iter_generate(prompts, [SamplingParams(max_tokens=3)] * len(prompts)))
    assert sorted(index for index, _ in results) == list(range(len(prompts)))
    assert all(len(output.outputs[0].token_ids) == 3 for _, output in results)
