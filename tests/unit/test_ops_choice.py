"""Choosing Triton or torch for `kernels` and `attention_backend` (one rule for both)."""

import importlib.util

import pytest
import torch

from batchllm.layers.ops import use_triton
from batchllm.options import engine_config


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
