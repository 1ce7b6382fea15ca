"""Two engine processes on one GPU (`engines_per_gpu=2`): the same greedy tokens as one engine in
float32, and KV caches sized at once from the card's memory that come out equal and stay inside
gpu_memory_utilization with each engine's activation reserve."""

import os

import pytest
import torch

from batchllm import LLM
from batchllm.config import ACTIVATION_RESERVE
from tests.gpu.test_cuda_graphs import workload
from tests.helpers import make_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(model_dir, **options):
    llm = LLM(model_dir, device="cuda", dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=64,
              **options)
    try:
        prompts, params = workload()
        outs = llm.generate(prompts, params, use_tqdm=False)
        free = torch.cuda.mem_get_info()[0]  # with the engines still built
        return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs], dict(llm.last_stats), free
    finally:
        llm.shutdown()


def test_two_engines_on_one_gpu_match_one_and_split_its_memory(tmp_path):
    model_dir = str(make_tiny_model("llama", tmp_path))
    one, _, _ = _run(model_dir, kv_cache_memory_gib=1)
    utilization = 0.5
    free_before, total = torch.cuda.mem_get_info()  # what this process (and anything else) holds stays held
    two, stats, free_during = _run(model_dir, engines_per_gpu=2, gpu_memory_utilization=utilization)
    assert two == one
    ranks = stats["ranks"]
    assert stats["num_engines"] == 2 and all(r["num_requests"] > 0 for r in ranks)
    kv_bytes = [r["kv_cache_gib"] * 2**30 for r in ranks]
    # equal parts, sized at once by the two engines, each counting its own memory (not this process's)
    assert abs(kv_bytes[0] - kv_bytes[1]) <= 0.01 * max(kv_bytes)
    # each engine's KV is most of its part (a tiny model's weights and context are small) ...
    assert all(0.5 * (utilization / 2 - ACTIVATION_RESERVE) * total < b for b in kv_bytes)
    # ... and what the two engine processes really hold on the card, after running, is inside the
    # utilization (their contexts, weights, caches, graphs and activations)
    assert free_before - free_during <= utilization * total


@pytest.mark.skipif((os.cpu_count() or 1) < 4, reason="batchllm run takes one engine on a host of under 4 cores")
def test_run_takes_two_engines_per_gpu_for_a_small_model(tmp_path):
    from batchllm.cli import _engine_processes
    from batchllm.options import engine_config

    model_dir = str(make_tiny_model("llama", tmp_path))
    config, workers, _ = _engine_processes(engine_config(model=model_dir, skip_tokenizer_init=True,
                                                      max_num_batched_tokens=64))
    try:
        assert config.parallel.engines_per_gpu == 2 and workers.size == 2
        workers.wait_ready()
        assert sorted(workers.start_times) == [0, 1]
    finally:
        workers.shutdown()


def test_resolving_a_cuda_model_leaves_torch_cuda_uninitialized(tmp_path):
    """What `batchllm run`'s data-parallel parent does before spawning its workers (`resolve_model`,
    the step budget from the device's memory) starts no torch CUDA state; the driver's memory is
    torch's."""
    import subprocess
    import sys

    model_dir = make_tiny_model("llama", tmp_path)
    code = ("import torch; from batchllm.engine import resolve_model; from batchllm.options import engine_config; "
            "from batchllm.parallel.data_parallel import cuda_total_memory; "
            f"facts = resolve_model(engine_config(model={str(model_dir)!r}, device='cuda')); "
            "assert facts.scheduler.max_num_batched_tokens > 0; "
            "assert not torch.cuda.is_initialized(), 'resolve_model initialized CUDA'; "
            "assert cuda_total_memory(0) == torch.cuda.get_device_properties(0).total_memory")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
