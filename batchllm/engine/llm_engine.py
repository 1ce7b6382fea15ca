"""vLLM's `vllm.engine.llm_engine`, as its scripts import it (`from vllm.engine.llm_engine import LLMEngine`):
the same class as `batchllm.LLMEngine` (`batchllm/llm_engine.py`), whose `from_engine_args` says the step engine
is not offered and what to call instead."""

from batchllm.llm_engine import LLMEngine

__all__ = ["LLMEngine"]
