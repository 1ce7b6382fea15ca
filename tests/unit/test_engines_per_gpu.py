"""Several engine processes on one GPU: where each rank runs, the memory share each is given, and
that engines sharing a GPU build one after another (no GPU needed: the workers are stand-ins)."""

import json
import time
from pathlib import Path

import pytest
import torch

from batchllm.options import engine_config
from batchllm.parallel.data_parallel import DataParallelEngine, _worker_configs, await_build_turn, serve_jobs
from batchllm.runner.model_runner import ACTIVATION_RESERVE, shared_gpu_utilization

GIB = 2**30


def test_num_engines_and_tensor_parallel_refused():
    config = engine_config(data_parallel_size=3, engines_per_gpu=2)
    assert config.parallel.num_engines == 6
    with pytest.raises(ValueError, match="engines_per_gpu > 1 .* tensor_parallel_size > 1"):
        engine_config(engines_per_gpu=2, tensor_parallel_size=2)


@pytest.mark.parametrize("engines", [2, 3, 4])
@pytest.mark.parametrize("weights_gib", [0.3, 16.0])
def test_engines_built_one_after_another_get_equal_shares(engines, weights_gib):
    """Replays plan_kv_cache's budget on a 140 GiB card: each slot, seeing the memory of the
    engines built before it, gets the same KV size, and all of them together leave every engine
    its activation reserve inside gpu_memory_utilization."""
    total, utilization, context = 140 * GIB, 0.9, 0.5 * GIB
    used, kv_sizes = 0.0, []
    for slot in range(engines):
        used += context + weights_gib * GIB  # this engine's CUDA context and weights, before it sizes its KV
        share = shared_gpu_utilization(utilization, slot, engines)
        kv = (share - ACTIVATION_RESERVE) * total - used  # the budget plan_kv_cache computes
        kv_sizes.append(kv)
        used += kv
    assert max(kv_sizes) - min(kv_sizes) < 1e-6 * total
    expected = (utilization / engines - ACTIVATION_RESERVE) * total - context - weights_gib * GIB
    assert kv_sizes[0] == pytest.approx(expected)
    assert used + engines * ACTIVATION_RESERVE * total == pytest.approx(utilization * total)


def test_too_many_engines_per_gpu_is_named():
    with pytest.raises(ValueError, match="engines_per_gpu 9 gives each engine 0.100 of the GPU"):
        shared_gpu_utilization(0.9, 0, 9)


def test_worker_configs_place_ranks_and_chain_builds_per_gpu():
    config = engine_config(data_parallel_size=2, engines_per_gpu=2, gpu_memory_utilization=0.8)
    configs, builds_after = _worker_configs(config, Path("/m"), torch.device("cuda", 1))
    assert [c.model.device for c in configs] == ["cuda:1", "cuda:1", "cuda:2", "cuda:2"]
    assert [c.cache.gpu_memory_utilization for c in configs] == pytest.approx([0.4, 0.7, 0.4, 0.7])
    assert builds_after == {0: 1, 2: 3}  # each GPU's second engine waits for its first
    assert all(c.parallel.num_engines == 1 and c.model.model == "/m" for c in configs)


@pytest.mark.parametrize("device,options", [
    ("cuda", dict(kv_cache_memory_gib=4)),  # a given KV size needs no free-memory reading
    ("cuda", dict(num_kv_blocks=100)),
    ("cpu", {}),
])
def test_worker_configs_build_at_once_when_memory_is_not_read(device, options):
    config = engine_config(engines_per_gpu=3, **options)
    configs, builds_after = _worker_configs(config, Path("/m"), torch.device(device, 0))
    assert builds_after == {}
    assert {c.cache.gpu_memory_utilization for c in configs} == {config.cache.gpu_memory_utilization}
    assert len(configs) == 3 and len({c.model.device for c in configs}) == 1


class _Idle:
    """A stand-in engine: runs no job, records nothing."""

    last_stats: dict = {}

    def shutdown(self) -> None:
        pass


def _recording_worker(rank, size, config, conn):
    """Records when it was let build and when it was ready (a file per rank, in the model path)."""
    if not await_build_turn(conn):
        return
    allowed = time.time()
    time.sleep(0.3)  # "building"
    (Path(config.model.model) / f"rank{rank}.json").write_text(json.dumps([allowed, time.time()]))
    conn.send(("ready",))
    serve_jobs(_Idle(), conn)


def test_engines_sharing_a_gpu_build_one_after_another(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = engine_config(data_parallel_size=2, engines_per_gpu=2)
    engine = DataParallelEngine(config, tmp_path, torch.device("cuda", 0), 64, worker_main=_recording_worker)
    engine.shutdown()
    times = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert times[1][0] >= times[0][1] and times[3][0] >= times[2][1]  # second on a GPU after the first is ready
    assert times[2][0] < times[0][1] and times[0][0] < times[2][1]  # the two GPUs' first engines build together


def test_a_worker_told_to_stop_before_its_turn_exits_quietly():
    import multiprocessing as mp

    parent, child = mp.Pipe()
    parent.send(None)
    assert await_build_turn(child) is False
    parent.close()
    assert await_build_turn(child) is False  # the parent went away
