"""vLLM's `vllm.distributed.parallel_state` clean-up names, as older example scripts import them."""

from batchllm.distributed import cleanup_dist_env_and_memory, destroy_distributed_environment, destroy_model_parallel

__all__ = ["cleanup_dist_env_and_memory", "destroy_model_parallel", "destroy_distributed_environment"]
