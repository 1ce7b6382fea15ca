"""Choosing Triton or torch for `kernels` and `attention_backend` (one rule for both)."""

import importlib.util

import pytest
import torch

from batchllm.layers.ops import use_triton
from batchllm.options import engine_config
from tests.helpers import make_tiny_model


def test_torch_and_cpu_never_use_triton_and_asking_for_it_there_is_an_error():
    assert not use_triton("torch", torch.device("cuda"), "kernels")
    assert not use_triton("auto", torch.device("cpu"), "kernels")
    with pytest.raises(ValueError, match="attention_backend='triton' needs Triton and a CUDA device"):
        use_triton("triton", torch.device("cpu"), "attention_backend")
    with pytest.raises(ValueError, match="kernels must be one of"):
        engine_config(kernels="fast")  # the config option's choices: use_triton never sees another value


def test_auto_on_cuda_without_triton_falls_back_to_torch(monkeypatch):
    """A CUDA machine without Triton: auto means torch (it used to fail importing the Triton ops)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert not use_triton("auto", torch.device("cuda"), "kernels")
    with pytest.raises(ValueError, match="needs Triton"):
        use_triton("triton", torch.device("cuda"), "kernels")


def test_kv_store_choice_reaches_the_triton_backend(monkeypatch, tmp_path):
    """`kv_store` picks the Triton backend's store: "auto" and "triton" the one-kernel store, "torch"
    torch's ops, whatever the cache's type. CUDA is faked: the choice, not the kernel, is under test
    (the kernel's bytes: tests/gpu/test_kv_store_triton.py)."""
    from batchllm import engine
    from batchllm.attention import triton_backend

    built = []

    class Recorder(triton_backend.TritonBackend):
        def __init__(self, **options):
            built.append(options)
            raise RuntimeError("stop after construction")

    monkeypatch.setattr(triton_backend, "TritonBackend", Recorder)
    monkeypatch.setattr(engine, "use_triton", lambda choice, device, setting: choice != "torch")
    with pytest.raises(ValueError, match="kv_store must be one of"):
        engine_config(kv_store="fast")
    model_dir = make_tiny_model("llama", tmp_path)
    cases = [("auto", "auto", True), ("auto", "fp8", True), ("triton", "auto", True), ("torch", "fp8", False),
             ("torch", "auto", False)]
    for choice, kv_cache_dtype, fused in cases:
        config = engine_config(model=str(model_dir), kv_store=choice, kv_cache_dtype=kv_cache_dtype, device="cpu",
                               dtype="float32")
        with pytest.raises(RuntimeError, match="stop after construction"):
            engine.build_engine(config)
        assert built[-1]["fused_store"] is fused, (choice, kv_cache_dtype)


def test_kv_store_triton_without_the_triton_attention_is_an_error_naming_it(tmp_path):
    """As kernels='triton' on a CPU: asking for the one-kernel store where the attention is torch's
    (here: a CPU device) fails at build, naming the option, instead of being silently ignored."""
    from batchllm import engine

    config = engine_config(model=str(make_tiny_model("llama", tmp_path)), kv_store="triton", device="cpu")
    with pytest.raises(ValueError, match="kv_store='triton' needs the Triton attention"):
        engine.build_engine(config)
