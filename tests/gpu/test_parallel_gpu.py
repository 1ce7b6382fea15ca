"""Tensor and data parallelism on 2 GPUs (NCCL): the same greedy tokens as one GPU in float32, with
the Triton attention, prefix groups, decode CUDA graphs and asynchronous scheduling on."""

import pytest
import torch

from batchllm import LLM
from tests.gpu.test_cuda_graphs import workload
from tests.helpers import make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (nvidia-h200-x2)")]


@pytest.fixture(scope="module", params=["llama", "qwen2-untied", "qwen3"])
def tiny_dir(request, tmp_path_factory):
    return str(make_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))


def run(model_dir, **parallel):
    llm = LLM(model_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=64,
              kv_cache_memory_gib=1, **parallel)
    try:
        prompts, params = workload()
        outs = llm.generate(prompts, params, use_tqdm=False)
        graph_steps = 0 if llm.engine is None else llm.engine.runner.num_graph_steps
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs], graph_steps
    finally:
        llm.shutdown()


def test_tensor_parallel_two_gpus_matches_one(tiny_dir):
    one, _ = run(tiny_dir)
    two, graph_steps = run(tiny_dir, tensor_parallel_size=2)
    assert graph_steps > 0  # decode graphs with the all-reduces inside were used
    assert two == one


def test_data_parallel_two_gpus_matches_one(tiny_dir):
    one, _ = run(tiny_dir)
    two, _ = run(tiny_dir, data_parallel_size=2)
    assert two == one
