"""vLLM's `vllm.engine.arg_utils`, as its example scripts import it (`from vllm.engine.arg_utils import
EngineArgs`): the same class as `batchllm.EngineArgs` (`batchllm/engine_args.py`)."""

from batchllm.engine_args import EngineArgs

__all__ = ["EngineArgs"]
