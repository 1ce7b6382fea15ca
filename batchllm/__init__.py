"""BatchLLM: offline, throughput-first LLM batch inference.

    from batchllm import LLM, SamplingParams
    llm = LLM()  # the embedded SmolLM2-135M-Instruct
    outputs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
"""

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a small or shared CPU
# box, spinning threads that lose their core stall every parallel op; measured on the 2-core dev
# box under load, generation ran 6x slower with spinning (docs/benchmarks.md, "CPU path").
# setdefault: a value set by the user wins; no effect if torch was imported before batchllm.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import TYPE_CHECKING  # noqa: E402

from batchllm.request_output import CompletionOutput, Logprob, RequestOutput  # noqa: E402
from batchllm.sampling_params import SamplingParams  # noqa: E402

if TYPE_CHECKING:
    from batchllm.llm import LLM


def __getattr__(name: str):
    """`batchllm.LLM`, imported on first use (PEP 562): it brings torch, transformers and Triton
    (seconds), which `batchllm --help`, a bad option or an unreadable input do not need."""
    if name == "LLM":
        from batchllm.llm import LLM

        return LLM
    if name == "EngineArgs":
        from batchllm.engine_args import EngineArgs

        return EngineArgs
    if name == "LLMEngine":  # (vLLM's step engine: importable, so that building it says what to use instead)
        from batchllm.llm_engine import LLMEngine

        return LLMEngine
    if name in ("TextPrompt", "TokensPrompt", "PromptType"):  # (batchllm.inputs imports the tokenizer: lazily)
        from batchllm import inputs

        return getattr(inputs, name)
    raise AttributeError(f"module 'batchllm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "LLM", "EngineArgs", "LLMEngine", "TextPrompt", "TokensPrompt", "PromptType"})


__all__ = ["LLM", "EngineArgs", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "TextPrompt",
           "TokensPrompt", "PromptType"]
__version__ = "0.1.0"
