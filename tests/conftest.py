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


LONGEST_FILES = ("e2e/test_ray.py", "e2e/test_batch_jobs.py", "unit/test_triton_interpreted.py",
                 "unit/test_model_directories.py", "e2e/test_cli.py", "e2e/test_data_parallel.py")
"""The test files that take longest (1.5-3.5 minutes each on two cores, `--durations`), run first: under
`scripts/test.sh`'s two processes (xdist, a file whole in one of them, files handed out in this order) a long file
started last would leave the other process idle at the end."""


def pytest_collection_modifyitems(config, items):
    """The LONGEST_FILES first, in that order; every other file after them, in collection order (a stable sort:
    a file's tests keep their order)."""
    def rank(item) -> int:
        path = str(item.fspath).replace("\\", "/")
        return next((i for i, name in enumerate(LONGEST_FILES) if path.endswith("tests/" + name)), len(LONGEST_FILES))

    items.sort(key=rank)
