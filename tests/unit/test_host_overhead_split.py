"""`benchmarks/host_overhead.py` splits a step into device work and host time as a GPU would: the sampler's
Python (its walks over the rows' SamplingSpecs) is host time, only its tensor operations device work."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("benchmarks.host_overhead")
from batchllm.runner import model_runner  # noqa: E402
from benchmarks import host_overhead  # noqa: E402


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_the_samplers_python_is_host_time_and_its_tensor_work_device_work(monkeypatch):
    logits = torch.randn(64, 512)

    def sampler(*args, **kwargs):  # 30 ms of per-row Python around one tensor operation
        _busy(0.03)
        return logits.argmax(dim=-1)

    monkeypatch.setattr(model_runner, "sample_on_device", sampler)
    with host_overhead.DeviceWork(stub=False) as work:
        tokens = model_runner.sample_on_device(logits, [], None, None)
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert work.sampler_seconds >= 0.03
    # the argmax alone: the 30 ms busy loop is host time (all of it was device work before). Not an absolute bound
    # on the argmax's wall time, which a preemption of this process can stretch past any small one.
    assert work.seconds <= work.sampler_seconds - 0.03
    assert work.sampler_device_seconds == pytest.approx(work.seconds)
    assert model_runner.sample_on_device is sampler  # (restored on exit)


def test_host_noise_is_device_work_and_list_building_is_not(monkeypatch):
    """Seeded noise made with numpy is one kernel on a GPU (device work); `to_device`'s building of a tensor from
    a per-row list is host work, then a copy."""
    from batchllm.outputs import SamplingSpec

    specs = [SamplingSpec(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0, seed=i, num_logprobs=None)
             for i in range(32)]
    with host_overhead.DeviceWork(stub=False) as work:
        model_runner.sample_on_device(torch.randn(32, 4096), specs, list(range(32)), torch.Generator())
    assert 0 < work.sampler_device_seconds < work.sampler_seconds
