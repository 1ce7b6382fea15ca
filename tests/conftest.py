"""Shared fixtures: the embedded default model, tiny random-weight models, and an HF greedy oracle."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as batchllm/__init__.py, which torch would precede here

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # before anything imports Triton: its kernels then run interpreted (numpy)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers import TINY_CONFIGS, hf_greedy, make_tiny_model, patch_interpreter_rounding  # noqa: E402

patch_interpreter_rounding()


@pytest.fixture(scope="session")
def default_model_dir():
    from batchllm.models.default_model import default_model_dir as convert

    return convert()


@pytest.fixture(scope="session")
def default_llm(default_model_dir):
    """One fp32 CPU engine on SmolLM2, shared by the tests that do not need special settings."""
    from batchllm import LLM

    return LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=2048)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, default_model_dir):
    cache: dict[str, str] = {}

    def make(name: str) -> str:
        if name not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{name}")
            make_tiny_model(name, out, tokenizer_dir=default_model_dir)
            cache[name] = str(out)
        return cache[name]

    return make


__all__ = ["TINY_CONFIGS", "hf_greedy"]

