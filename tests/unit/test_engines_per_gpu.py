"""Several engine processes on one GPU: where each rank runs, the memory part each is given, and
how an automatically sized KV cache counts its own memory and the others' (no GPU needed)."""

import os
from pathlib import Path

import pytest
import torch

from batchllm.options import engine_config
from batchllm.parallel.data_parallel import rank_config
from batchllm.runner.model_runner import engine_share, kv_cache_budget

GIB = 2**30
RESERVE = 3 * GIB  # an activation reserve, as `activation_profile` measures one


def test_num_engines_and_tensor_parallel_refused():
    config = engine_config(data_parallel_size=3, engines_per_gpu=2)
    assert config.parallel.num_engines == 6
    with pytest.raises(ValueError, match="engines_per_gpu > 1 .* tensor_parallel_size > 1"):
        engine_config(engines_per_gpu=2, tensor_parallel_size=2)


@pytest.mark.parametrize("engines", [1, 2, 3])
@pytest.mark.parametrize("order", ["in turn", "interleaved"])
def test_engines_sizing_their_caches_at_once_get_equal_parts(engines, order):
    """Replays engines on one 140 GiB card with engine accounting, each loading 2 GiB of weights
    and then sizing its KV from the free memory it reads: in turn (each after the others
    allocated) or interleaved (all loaded, none allocated yet). Either way each gets its part less
    its reserve and its own, and all together stay inside the utilization with every reserve kept."""
    total, utilization, own = 140 * GIB, 0.9, 2 * GIB + 0.5 * GIB
    share = engine_share(utilization, engines)
    used = engines * own if order == "interleaved" else 0
    sizes = []
    for _ in range(engines):
        if order == "in turn":
            used += own
        kv = kv_cache_budget(share, total - used, total, "engine", own, RESERVE)
        sizes.append(kv)
        used += kv
    assert sizes == [int(share * total - RESERVE - own)] * engines
    assert used + engines * RESERVE <= utilization * total + 1


def test_card_accounting_counts_every_process_engine_accounting_only_its_own(caplog):
    total, own = 100 * GIB, 1 * GIB
    for other in (0, 5 * GIB):  # memory another process holds on the card
        free = total - own - other
        assert kv_cache_budget(0.9, free, total, "card", own, RESERVE) == int(0.9 * total - RESERVE - own - other)
        assert kv_cache_budget(0.9, free, total, "engine", own, RESERVE) == int(0.9 * total - RESERVE - own)
    assert not caplog.records
    # another process holding 60 GiB: the engine's cache takes what is free less the reserve, and says why
    free = total - own - 60 * GIB
    assert kv_cache_budget(0.9, free, total, "engine", own, RESERVE) == 39 * GIB - RESERVE
    assert "held to the GPU's free memory" in caplog.text
    assert kv_cache_budget(0.9, free, total, "card", own, RESERVE) == int(0.9 * total - RESERVE - own - 60 * GIB)
    assert kv_cache_budget(0.9, 2 * GIB, total, "engine", own, RESERVE) == 0  # nothing left beyond the reserve


def test_too_many_engines_per_gpu_is_named():
    assert engine_share(0.9, 2) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="engines_per_gpu 9 gives each engine 0.100 of the GPU"):
        engine_share(0.9, 9)


def test_rank_configs_place_ranks_and_split_memory_per_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    config = engine_config(model="/m", device="cuda:1", data_parallel_size=2, engines_per_gpu=2,
                           gpu_memory_utilization=0.8)
    configs = [rank_config(config, rank) for rank in range(4)]
    assert [c.model.device for c in configs] == ["cuda:1", "cuda:1", "cuda:2", "cuda:2"]
    assert [c.cache.gpu_memory_utilization for c in configs] == pytest.approx([0.4] * 4)
    assert {c.cache.gpu_memory_accounting for c in configs} == {"engine"}
    assert all(c.parallel.num_engines == 1 and c.model.model == "/m" for c in configs)
    with pytest.raises(ValueError, match=r"data_parallel_size 3 x tensor_parallel_size 1 needs GPUs 1..3, but 3"):
        rank_config(engine_config(device="cuda:1", data_parallel_size=3, engines_per_gpu=2), 0)
    # one engine per GPU, or a KV size given (each engine's): the memory settings stay as they are
    for options in (dict(data_parallel_size=2), dict(engines_per_gpu=9, kv_cache_memory_gib=4)):
        cache = rank_config(engine_config(device="cuda", **options), 1).cache
        assert (cache.gpu_memory_utilization, cache.gpu_memory_accounting) == (0.9, "card")
    cpu = [rank_config(engine_config(device="cpu", engines_per_gpu=3), rank) for rank in range(3)]
    assert [c.model.device for c in cpu] == ["cpu"] * 3
    assert {c.cache.gpu_memory_utilization for c in cpu} == {0.9}


def test_plan_kv_cache_counts_what_its_accounting_says(monkeypatch):
    """On a (pretended) 100 GiB card where this process's torch holds 3 GiB: card accounting takes
    the part less everything in use; engine accounting the part less its own (+ the context
    allowance), held to the free memory less the reserve."""
    from batchllm.config import CacheConfig
    from batchllm.models.spec import read_model_spec
    from batchllm.runner.model_runner import CUDA_CONTEXT_BYTES, plan_kv_cache

    spec = read_model_spec(Path(__file__).parents[2] / "benchmarks" / "configs" / "smollm2-135m")
    total, reserved = 100 * GIB, 3 * GIB
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    own = reserved + CUDA_CONTEXT_BYTES
    for accounting, free, expected in (("card", 90 * GIB, 0.4 * total - 10 * GIB),
                                       ("engine", 90 * GIB, 0.4 * total - own),
                                       ("engine", 30 * GIB, 20 * GIB)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, total))
        cache = CacheConfig(gpu_memory_utilization=0.5, gpu_memory_accounting=accounting, block_size=16)
        plan = plan_kv_cache(spec, cache, torch.bfloat16, torch.device("cuda", 0))
        assert plan.num_blocks == int(expected) // plan.bytes_per_block, accounting


def _spec(name):
    from batchllm.models.spec import read_model_spec

    return read_model_spec(Path(__file__).parents[2] / "benchmarks" / "configs" / name)


@pytest.mark.parametrize("processes, available, expected", [(2, 16, 8), (3, 16, 5), (4, 2, 1), (1, 2, 2)])
def test_engine_processes_split_the_threads_they_share(processes, available, expected):
    """Each of several engine processes (data-parallel ranks, engines sharing a GPU, tensor-parallel
    ranks) takes an equal share of the threads, at least one; a user's OMP_NUM_THREADS stands."""
    from batchllm.parallel.data_parallel import engine_threads, usable_cores

    assert engine_threads(processes, available, environ={}) == expected
    assert engine_threads(processes, available, environ={"OMP_NUM_THREADS": "3"}) is None
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)


def test_num_parameters_from_the_shapes():
    assert _spec("smollm2-135m").num_parameters == pytest.approx(134.5e6, rel=0.01)  # tied embeddings
    assert _spec("qwen2.5-0.5b").num_parameters == pytest.approx(494e6, rel=0.01)  # tied embeddings
    assert _spec("llama-3.2-1b").num_parameters == pytest.approx(1.236e9, rel=0.01)
    assert _spec("llama-3.1-8b").num_parameters == pytest.approx(8.03e9, rel=0.01)  # its own LM head


def test_run_takes_two_engines_per_gpu_only_for_a_small_model_on_a_gpu_with_cores_to_spare():
    from batchllm.parallel.data_parallel import auto_engines_per_gpu

    small, large = _spec("smollm2-135m").num_parameters, _spec("llama-3.2-1b").num_parameters
    one_gpu, no_gpu = (lambda: 1), (lambda: 0)

    def auto(params=small, gpus=one_gpu, cores=16, **options):
        return auto_engines_per_gpu(engine_config(**options), params, gpus, cores)

    assert auto() == 2
    assert auto(params=_spec("smollm2-360m").num_parameters) == 2
    assert auto(params=_spec("qwen2.5-0.5b").num_parameters) == 2
    assert auto(params=596_000_000) == 1  # a Qwen3-0.6B: not measured
    assert auto(params=large) == 1
    assert auto(gpus=no_gpu) == 1
    assert auto(cores=2) == 1  # each engine's host work needs a core
    assert auto(device="cpu") == 1
    # where the user's other options would change meaning: one engine, as they asked before
    for options in (dict(data_parallel_size=2), dict(tensor_parallel_size=2), dict(kv_cache_memory_gib=100),
                    dict(num_kv_blocks=1000), dict(gpu_memory_utilization=0.2)):
        assert auto(**options) == 1, options
    assert auto(gpu_memory_utilization=0.5) == 2


def _never() -> int:
    raise AssertionError("the CUDA driver was asked although the answer was already 1")


def test_the_cuda_driver_is_asked_only_when_it_decides():
    from batchllm.parallel.data_parallel import auto_engines_per_gpu

    large = _spec("llama-3.1-8b").num_parameters
    assert auto_engines_per_gpu(engine_config(), large, _never, 16) == 1


def test_cuda_devices_are_counted_without_torch():
    import subprocess
    import sys

    code = ("import sys; from batchllm.parallel.data_parallel import cuda_device_count; n = cuda_device_count(); "
            "assert 'torch' not in sys.modules; import torch; "
            "assert torch.version.cuda is None or n == torch.cuda.device_count(), n")  # a CPU torch sees none
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


class FakeDriver:
    """libcuda's three calls `cuda_total_memory` makes, over devices of these sizes."""

    def __init__(self, sizes):
        self.sizes = sizes

    def cuDeviceGet(self, device, ordinal):  # noqa: N802 - the driver's names
        if ordinal >= len(self.sizes):
            return 101  # CUDA_ERROR_INVALID_DEVICE
        device._obj.value = ordinal
        return 0

    def cuDeviceTotalMem_v2(self, total, device):  # noqa: N802
        total._obj.value = self.sizes[device.value]
        return 0


def test_device_memory_is_asked_of_the_driver_and_of_torch_only_without_one(monkeypatch):
    """The step budget's device memory comes from the driver (no torch CUDA state in `batchllm run`'s
    parent); without a driver answer, from torch."""
    from batchllm import engine
    from batchllm.parallel import data_parallel

    monkeypatch.setattr(data_parallel, "cuda_driver", lambda: FakeDriver([141 * GIB, 80 * GIB]))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: pytest.fail("torch was asked"))
    assert data_parallel.cuda_total_memory(1) == 80 * GIB and data_parallel.cuda_total_memory(2) is None
    assert engine.device_total_memory(torch.device("cuda", 1)) == 80 * GIB
    assert engine.device_total_memory(torch.device("cuda")) == 141 * GIB  # torch's device 0 until one is chosen
    monkeypatch.setattr(data_parallel, "cuda_driver", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"total_memory": 24 * GIB}))
    assert data_parallel.cuda_total_memory(0) is None
    assert engine.device_total_memory(torch.device("cuda", 0)) == 24 * GIB


def test_run_without_a_gpu_keeps_one_engine_in_process(tiny_model_factory, monkeypatch):
    from batchllm.cli import _engine_processes
    from batchllm.parallel import data_parallel

    monkeypatch.setattr(data_parallel, "cuda_device_count", lambda: 0)  # as on a machine without a GPU
    config, workers, _ = _engine_processes(engine_config(model=tiny_model_factory("llama")))
    assert workers is None and config.parallel.engines_per_gpu == 1
    given, workers, _ = _engine_processes(engine_config(model=tiny_model_factory("llama"), device="cpu",
                                                     engines_per_gpu=2))
    try:  # a given count is kept, and its workers are spawned at once
        assert given.parallel.engines_per_gpu == 2 and workers.size == 2
        workers.wait_ready()
    finally:
        workers.shutdown()


def test_too_few_gpus_are_named_before_any_worker_starts(monkeypatch):
    """resolve_model (run by LLM and `run` in the parent) checks the GPU count, as the workers do."""
    from batchllm.config import ParallelConfig
    from batchllm.engine import check_gpu_count

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpu_count(ParallelConfig(data_parallel_size=2, engines_per_gpu=3), torch.device("cuda", 0))  # shared GPUs
    with pytest.raises(ValueError, match=r"data_parallel_size 2 x tensor_parallel_size 1 needs GPUs 1..2, but 2"):
        check_gpu_count(ParallelConfig(data_parallel_size=2), torch.device("cuda", 1))
    check_gpu_count(ParallelConfig(data_parallel_size=8), torch.device("cpu"))  # nothing to count on the CPU


def _builds_forever(rank, size, config, conn):
    """A worker stand-in that never gets its engine built (and never reads its pipe)."""
    import time

    time.sleep(600)


def test_shutdown_stops_workers_still_building_at_once(tmp_path):
    """`run` shuts its workers down when its own start fails: a worker still building would read the
    stop only once built, so it is terminated instead of waited for (30 s each)."""
    import time

    from batchllm.parallel.data_parallel import DataParallelEngine

    engine = DataParallelEngine(engine_config(device="cpu", engines_per_gpu=2), tmp_path, 64,
                                worker_main=_builds_forever)
    processes = list(engine.processes)
    started = time.monotonic()
    engine.shutdown()
    assert time.monotonic() - started < 20
    assert not any(p.is_alive() for p in processes)


class _SlowLLM:
    """What `serve_jobs` needs of an LLM: one 0.05 s step per prompt, the first prompt ending at the first step
    and the others all at the last (they decode together); per call, how many steps it ran of how many goes to
    `job<N>-rank<R>.json` in `out_dir`."""

    def __init__(self, rank: int, out_dir: str) -> None:
        self.rank, self.out_dir, self.calls, self.last_stats = rank, out_dir, 0, {}

    def iter_generate(self, prompts, params, *, use_tqdm=False, refill=None, stop_asked=None):
        import json
        import time

        from batchllm.request_output import CompletionOutput, RequestOutput

        self.calls += 1
        prompts = list(prompts)
        while refill is not None and (more := refill()) is not None:
            prompts += more[0]

        def output(local):
            return local, RequestOutput(f"r{local}", None, prompts[local].token_ids,
                                        outputs=[CompletionOutput(0, "", [1], None, None, finish_reason="length")])

        given = 0
        try:
            for step in range(len(prompts)):
                if stop_asked is not None and stop_asked():
                    return
                time.sleep(0.05)
                given += 1
                if step == 0:
                    yield output(0)
            for local in range(1, len(prompts)):
                yield output(local)
        finally:
            Path(self.out_dir, f"job{self.calls}-rank{self.rank}.json").write_text(
                json.dumps({"given": given, "of": len(prompts)}))
            self.last_stats = {"num_requests": given, "prompt_tokens": 0, "prefill_tokens_computed": 0,
                               "output_tokens": given, "num_steps": 0, "wall_s": 0.0}

    def shutdown(self) -> None:
        pass


def _slow_worker(rank, size, config, conn):
    from batchllm.parallel.data_parallel import serve_jobs

    conn.send(("ready",))
    serve_jobs(_SlowLLM(rank, os.environ["BATCHLLM_TEST_OUT"]), conn)


def test_a_job_the_caller_stops_is_stopped_in_the_workers(tmp_path, monkeypatch):
    """An interrupted LLM(data_parallel_size=2).generate left the workers running the whole abandoned job, and
    the next call waited for it (13.8 s against 0.0 with one engine); the workers now drop it before their next
    step, also where no request of theirs finishes until the end."""
    import json

    from batchllm.inputs import TokenizedPrompt
    from batchllm.parallel.data_parallel import DataParallelEngine
    from batchllm.sampling_params import SamplingParams

    monkeypatch.setenv("BATCHLLM_TEST_OUT", str(tmp_path))
    engine = DataParallelEngine(engine_config(device="cpu", engines_per_gpu=2), tmp_path, 4096,
                                worker_main=_slow_worker)
    try:
        engine.wait_ready(120)
        prompts = [TokenizedPrompt([i, i + 1, i + 2], None) for i in range(0, 400, 4)]
        params = [SamplingParams(max_tokens=4)] * len(prompts)
        results = engine.generate(prompts, params, use_tqdm=False)
        next(results)
        results.close()  # (what an interrupt does to the call's generator)
        again = engine.generate(prompts[:4], params[:4], use_tqdm=False)
        assert sorted(index for index, _ in again) == [0, 1, 2, 3]
        first = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("job1-rank*.json"))]
        assert len(first) == 2 and all(rank["given"] < rank["of"] for rank in first), first
        assert sum(rank["of"] for rank in first) == len(prompts)
        # a call left open (its generator neither finished nor closed): the next drops its job, and the open
        # generator closed later stops nothing (it aborted the next job, which came back short, or hung)
        held = engine.generate(prompts, params, use_tqdm=False)
        next(held)
        later = engine.generate(prompts[:8], params[:8], use_tqdm=False)
        got = [next(later)]
        held.close()
        got += list(later)
        assert sorted(index for index, _ in got) == list(range(8))
        dropped = engine.generate(prompts, params, use_tqdm=False)
        next(dropped)
        list(engine.generate(prompts[:2], params[:2], use_tqdm=False))
        with pytest.raises(RuntimeError, match=r"this generate call \(job 5\) was dropped when a later one"):
            list(dropped)  # (it waited forever: the later call had read its workers' messages)
    finally:
        engine.shutdown()


def test_a_dead_tensor_parallel_rank_is_named_not_its_peers_transport_error():
    """A follower killed mid-step made rank 0's collective fail with gloo's "Connection reset by peer" and an
    "unexpected failure" (status 3); the step's failure now names the rank and how it ended, the killed one
    first (its peers exit too, once their own collectives fail)."""
    from types import SimpleNamespace

    from batchllm.engine import Engine
    from batchllm.parallel.data_parallel import WorkerDied
    from batchllm.parallel.tp_worker import TensorParallelFollowers

    def process(code):
        return SimpleNamespace(join=lambda timeout=None: None, is_alive=lambda: code is None, exitcode=code)

    def engine(*processes):
        built = Engine.__new__(Engine)
        object.__setattr__(built, "tp_followers", TensorParallelFollowers(list(processes)) if processes else None)
        return built

    transport = RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer\nmore")
    failure = engine(process(1), process(-9), process(None)).step_failure(transport)
    assert isinstance(failure, WorkerDied) and str(failure).startswith(
        "tensor-parallel rank 2 killed by SIGKILL; rank 1 exited with status 1 "
        "(found when a step's collective failed: RuntimeError: ")
    assert engine(process(None)).step_failure(transport) is transport, "every rank alive: the step's own error"
    assert engine().step_failure(transport) is transport
