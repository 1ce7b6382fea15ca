"""Several engine processes on one GPU: where each rank runs, the memory part each is given, and
how an automatically sized KV cache counts its own memory and the others' (no GPU needed)."""

from pathlib import Path

import pytest
import torch

from batchllm.options import engine_config
from batchllm.parallel.data_parallel import _worker_configs
from batchllm.runner.model_runner import ACTIVATION_RESERVE, engine_share, kv_cache_budget

GIB = 2**30


def test_num_engines_and_tensor_parallel_refused():
    config = engine_config(data_parallel_size=3, engines_per_gpu=2)
    assert config.parallel.num_engines == 6
    with pytest.raises(ValueError, match="engines_per_gpu > 1 .* tensor_parallel_size > 1"):
        engine_config(engines_per_gpu=2, tensor_parallel_size=2)


@pytest.mark.parametrize("engines", [1, 2, 3])
@pytest.mark.parametrize("order", ["in turn", "interleaved"])
def test_engines_sizing_their_caches_at_once_get_equal_parts(engines, order):
    """Replays engines on one 140 GiB card, each loading 2 GiB of weights and then sizing its KV
    from the free memory it reads: in turn (each after the others allocated) or interleaved (all
    loaded, none allocated yet). Either way each gets its part less the reserve and its own, and
    all of them together stay inside the utilization with every reserve kept."""
    total, utilization, own = 140 * GIB, 0.9, 2 * GIB + 0.5 * GIB
    share = engine_share(utilization, engines)
    used = 0
    if order == "interleaved":
        used = engines * own
    sizes = []
    for _ in range(engines):
        if order == "in turn":
            used += own
        kv = kv_cache_budget(share, total - used, total, own)
        sizes.append(kv)
        used += kv
    assert sizes == [int((share - ACTIVATION_RESERVE) * total - own)] * engines
    assert used + engines * ACTIVATION_RESERVE * total <= utilization * total + 1


def test_other_processes_count_only_through_free_memory():
    total, own = 100 * GIB, 1 * GIB
    alone = kv_cache_budget(0.9, total - own, total, own)
    assert alone == int(0.8 * total - own)
    # another process holding 5 GiB leaves enough free: this engine still takes its whole part
    assert kv_cache_budget(0.9, total - own - 5 * GIB, total, own) == alone
    # one holding 60 GiB: the cache takes what is free less the reserve
    assert kv_cache_budget(0.9, total - own - 60 * GIB, total, own) == int(39 * GIB - 0.1 * total)
    assert kv_cache_budget(0.9, 5 * GIB, total, own) == 0  # nothing left beyond the reserve


def test_too_many_engines_per_gpu_is_named():
    assert engine_share(0.9, 2) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="engines_per_gpu 9 gives each engine 0.100 of the GPU"):
        engine_share(0.9, 9)


def test_worker_configs_place_ranks_and_split_memory_per_gpu():
    config = engine_config(data_parallel_size=2, engines_per_gpu=2, gpu_memory_utilization=0.8)
    configs = _worker_configs(config, Path("/m"), torch.device("cuda", 1))
    assert [c.model.device for c in configs] == ["cuda:1", "cuda:1", "cuda:2", "cuda:2"]
    assert [c.cache.gpu_memory_utilization for c in configs] == pytest.approx([0.4] * 4)
    assert all(c.parallel.num_engines == 1 and c.model.model == "/m" for c in configs)
    cpu = _worker_configs(engine_config(engines_per_gpu=3), Path("/m"), torch.device("cpu"))
    assert [c.model.device for c in cpu] == ["cpu"] * 3
    assert {c.cache.gpu_memory_utilization for c in cpu} == {0.9}


def test_plan_kv_cache_counts_this_process_and_the_free_memory(monkeypatch):
    """On a (pretended) 100 GiB card: the cache takes the engine's part less torch's reserved
    memory and the context allowance, and never more than the free memory less the reserve."""
    from batchllm.config import CacheConfig
    from batchllm.models.spec import read_model_spec
    from batchllm.runner.model_runner import CUDA_CONTEXT_BYTES, plan_kv_cache

    spec = read_model_spec(Path(__file__).parents[2] / "benchmarks" / "configs" / "smollm2-135m")
    total, reserved = 100 * GIB, 3 * GIB
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    cache = CacheConfig(gpu_memory_utilization=0.5, block_size=16)
    for free, expected in ((90 * GIB, 0.4 * total - reserved - CUDA_CONTEXT_BYTES), (30 * GIB, 20 * GIB)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, total))
        plan = plan_kv_cache(spec, cache, torch.bfloat16, torch.device("cuda", 0))
        assert plan.num_blocks == int(expected) // plan.bytes_per_block
