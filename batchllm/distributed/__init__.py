"""vLLM's clean-up calls that example scripts make between two engines in one process
(`from vllm.distributed import cleanup_dist_env_and_memory`; older scripts import `destroy_model_parallel` and
`destroy_distributed_environment` from `vllm.distributed.parallel_state`).

Here an engine's processes and process group belong to its `LLM`: `llm.shutdown()`, or dropping the last reference
to it (`del llm`), stops them. These calls collect what was dropped, so the device memory of a deleted LLM is
free when they return; an LLM still referenced is left running, whole."""

import sys


def cleanup_dist_env_and_memory(shutdown_ray: bool = False) -> None:
    """Free what deleted LLMs held: their engine processes, tensor-parallel group, weights, KV cache and CUDA
    graphs (a garbage collection runs their finalizers, then the allocator's cached blocks go back to the device).
    shutdown_ray: also end this process's Ray session, if it has one."""
    from batchllm.engine import release_device_memory

    release_device_memory()
    ray = sys.modules.get("ray")  # (never imported here for nothing: Ray is an extra)
    if shutdown_ray and ray is not None and ray.is_initialized():
        ray.shutdown()


def destroy_model_parallel() -> None:
    """vLLM's first half of the clean-up: here `cleanup_dist_env_and_memory` does it all."""
    cleanup_dist_env_and_memory()


def destroy_distributed_environment() -> None:
    """vLLM's second half of the clean-up: here `cleanup_dist_env_and_memory` does it all."""
    cleanup_dist_env_and_memory()


__all__ = ["cleanup_dist_env_and_memory", "destroy_model_parallel", "destroy_distributed_environment"]
