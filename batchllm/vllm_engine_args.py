"""The rest of vLLM 0.26's `EngineArgs` fields (and so `LLM` keywords and engine flags) with no counterpart here:
for each, the values that ask for what runs here anyway (vLLM's default first) and why any other is refused.
`options.VLLM_NOT_TAKEN` merges them in, so `LLM(...)`, `EngineArgs(...)`, its parser and `batchllm run` take a
default and refuse anything else saying why, never as an unknown option (which would suggest the closest BatchLLM
name: `prefix_caching_hash_algo` was asked "did you mean 'enable_prefix_caching'?"). Data only: no imports of the
engine."""

from __future__ import annotations

from typing import Any

_ONE_NODE = ("the engines run in processes one LLM starts on this machine (for a cluster: batchllm.ray or "
             "run --ray)")
_DATA_PARALLEL = ("data parallelism runs the data_parallel_size engines in processes one LLM starts on this machine "
                  "and gives each whole prefix groups itself (for a cluster: batchllm.ray or run --ray)")
_CONTEXT_PARALLEL = "context parallelism is not supported; use tensor_parallel_size and data_parallel_size"
_NO_EXPERTS = "the models here have no experts"
_DBO = "dual-batch overlap is not supported (async_scheduling overlaps each step's host work with the device's)"
_ON_DEVICE = "the weights stay on the device; use tensor_parallel_size for a model larger than one GPU"
_TEXT_ONLY = "prompts are text or token ids only"
_NO_METRICS = "no metrics, traces or statistics lines are exported (llm.last_stats and run --stats give a run's)"
_NO_MAMBA = "the models here have no Mamba (state-space) layers"
_OWN_KERNELS = "the kernels are this engine's own (kernels and attention_backend choose them)"
_ADMISSION = ("requests are admitted by projected KV use (kv_admission_threshold) in the prefix-sharing plan's "
              "order, within max_num_batched_tokens per step")
_LOADER = "weights are read from the model directory's top-level *.safetensors files by this engine's own loader"
_GRAPHS = ("decode batches up to max_cudagraph_capture_size run as CUDA graphs (enforce_eager turns them off); "
           "the sizes between are this engine's own")

VLLM_026_NOT_TAKEN: dict[str, tuple[tuple[Any, ...], str]] = {
    # model files and loading
    "model_weights": (("", None), "weights are read from the model directory"),
    "hf_config_path": ((None,), "config.json is read from the model directory"),
    "code_revision": ((None,), "no code is run from the model directory (its architectures are built in)"),
    "model_class_overrides": ((None, {}), "the models are this engine's own"),
    "safetensors_load_strategy": ((None,), _LOADER),
    "safetensors_prefetch_num_threads": ((8,), _LOADER),
    "safetensors_prefetch_block_size": ((16 * 1024 * 1024,), _LOADER),
    "model_loader_extra_config": ((None, {}), _LOADER),
    "ignore_patterns": ((None, "original/**/*", ["original/**/*"]), _LOADER),
    "pt_load_map_location": (("cpu",), _LOADER),
    "max_parallel_loading_workers": ((None,), "each engine process loads its own weights"),
    "weight_transfer_config": ((None,), "weights are not updated while the engine runs"),
    "allow_deprecated_quantization": ((False, True), "quantization takes fp8 or compressed-tensors, neither "
                                                     "deprecated"),
    "language_model_only": ((False, True), "the models here are language models only"),
    # CUDA graphs, compilation and kernels
    "cudagraph_capture_sizes": ((None,), _GRAPHS),
    "cuda_graph_sizes": ((None,), _GRAPHS),  # (vLLM 0.10-0.11's name)
    "optimization_level": ((2, 1, 3), "nothing is compiled here (the kernels are Triton's) and decode steps run as "
                                      "CUDA graphs; for none (vLLM's -O0) give enforce_eager"),
    "performance_mode": (("balanced", "throughput"), "the engine is tuned for batch throughput; its knobs are its "
                                                     "own options (max_num_batched_tokens, engines_per_gpu, ...)"),
    "ir_op_priority": ((None, {}), _OWN_KERNELS),
    "kernel_config": ((None, {}), _OWN_KERNELS),
    "linear_backend": (("auto",), _OWN_KERNELS),
    "enable_flashinfer_autotune": ((None, False), _OWN_KERNELS),
    "enable_bf16x3_router_gemm": ((None, False), _NO_EXPERTS),
    "override_attention_dtype": ((None,), "attention runs in the model's dtype (kv_cache_dtype sets the cache's)"),
    "disable_cascade_attn": ((True, False), "a shared prefix's attention is this engine's own "
                                            "(shared_prefix_attention)"),
    "use_fp64_gumbel": ((False,), "sampling's noise is this engine's own (a seeded request's: a hash of its seed and "
                                  "position)"),
    # one node, parallelism
    "master_addr": (("127.0.0.1",), _ONE_NODE),
    "master_port": ((29501,), _ONE_NODE),
    "nnodes": ((1,), _ONE_NODE),
    "node_rank": ((0,), _ONE_NODE),
    "distributed_timeout_seconds": ((None,), "the timeouts of the engine processes' collectives are their own"),
    "cpu_distributed_timeout_seconds": ((None,), "the timeouts of the engine processes' collectives are their own"),
    "numa_bind": ((False,), "engine processes are not bound to NUMA nodes"),
    "numa_bind_nodes": ((None,), "engine processes are not bound to NUMA nodes"),
    "numa_bind_cpus": ((None,), "engine processes are not bound to NUMA nodes"),
    "device_ids": ((None,), "engines take consecutive GPUs from device (cuda:N, or CUDA_VISIBLE_DEVICES)"),
    "prefill_context_parallel_size": ((1,), _CONTEXT_PARALLEL),
    "decode_context_parallel_size": ((1,), _CONTEXT_PARALLEL),
    "dcp_comm_backend": (("ag_rs",), _CONTEXT_PARALLEL),
    "dcp_kv_cache_interleave_size": ((1,), _CONTEXT_PARALLEL),
    "cp_kv_cache_interleave_size": ((1,), _CONTEXT_PARALLEL),
    "data_parallel_rank": ((None,), _DATA_PARALLEL),
    "data_parallel_start_rank": ((None,), _DATA_PARALLEL),
    "data_parallel_size_local": ((None,), _DATA_PARALLEL),
    "data_parallel_address": ((None,), _DATA_PARALLEL),
    "data_parallel_rpc_port": ((None,), _DATA_PARALLEL),
    "data_parallel_hybrid_lb": ((False,), _DATA_PARALLEL),
    "data_parallel_external_lb": ((False,), _DATA_PARALLEL),
    "data_parallel_multi_port_external_lb": ((False,), _DATA_PARALLEL),
    "disable_nccl_for_dp_synchronization": ((None, False), "data-parallel engines never synchronize: each runs its "
                                                           "own prefix groups"),
    "_api_process_count": ((1,), "no API server processes are started"),
    "_api_process_rank": ((0,), "no API server processes are started"),
    "ray_workers_use_nsight": ((False,), "LLM starts no Ray workers (batchllm.ray runs engines as Ray actors)"),
    "worker_cls": (("auto",), "the engine's processes are its own (collective_rpc is not offered)"),
    "worker_extension_cls": (("",), "the engine's processes are its own (collective_rpc is not offered)"),
    "shutdown_timeout": ((0,), "shutdown() stops the engine's processes at once"),
    # experts and dual-batch overlap
    "enable_ep_weight_filter": ((False,), _NO_EXPERTS),
    "moe_backend": (("auto",), _NO_EXPERTS),
    "all2all_backend": ((None, "allgather_reducescatter"), _NO_EXPERTS),
    "enable_elastic_ep": ((False,), _NO_EXPERTS),
    "eplb_config": ((None, {}), _NO_EXPERTS),
    "enable_eplb": ((False,), _NO_EXPERTS),
    "expert_placement_strategy": (("linear",), _NO_EXPERTS),
    "enable_dbo": ((False,), _DBO),
    "ubatch_size": ((0,), _DBO),
    "dbo_decode_token_threshold": ((32,), _DBO),
    "dbo_prefill_token_threshold": ((512,), _DBO),
    # KV cache and scheduling
    "prefix_caching_hash_algo": (("sha256", "sha256_cbor", "xxhash", "xxhash_cbor"),
                                 "shared prefixes are found in the whole batch's token tree, not by hashing blocks "
                                 "(prefix_sharing turns sharing off)"),
    "prefix_match_unit": ((None,), "shared prefixes are matched token by token in the whole batch's token tree"),
    "offload_backend": (("auto",), _ON_DEVICE),
    "cpu_offload_params": ((None, set()), _ON_DEVICE),
    "kv_offloading_size": ((None,), "the KV cache stays on the device (a preempted request is recomputed)"),
    "kv_offloading_backend": (("native",), "the KV cache stays on the device (a preempted request is recomputed)"),
    "kv_cache_dtype_skip_layers": ((None, []), "an fp8 KV cache (kv_cache_dtype) covers every layer"),
    "kv_sharing_fast_prefill": ((False,), "KV sharing across layers is not supported"),
    "kv_events_config": ((None,), "KV cache events are not published"),
    "ec_transfer_config": ((None,), "encoder caches are not transferred: prompts are text or token ids only"),
    "disable_hybrid_kv_cache_manager": ((None, False, True), "the models here have one kind of attention layer: "
                                                             "the KV cache is one pool"),
    "max_num_scheduled_tokens": ((None,), "a step's tokens are capped by max_num_batched_tokens"),
    "max_num_partial_prefills": ((1,), _ADMISSION),
    "max_long_partial_prefills": ((1,), _ADMISSION),
    "long_prefill_token_threshold": ((0,), _ADMISSION),
    "scheduler_reserve_full_isl": ((True,), _ADMISSION),
    "prefill_schedule_interval": ((1,), _ADMISSION),
    "watermark": ((0.0, 0), _ADMISSION),
    "scheduler_cls": ((None,), "the scheduler is this engine's own (it runs the prefix-sharing plan)"),
    "stream_interval": ((1,), "LLM returns each output whole when its request finishes (nothing is streamed)"),
    "tokens_only": ((False,), "outputs carry text and token ids (skip_tokenizer_init gives token ids only)"),
    # multimodal
    "enable_mm_embeds": ((False,), _TEXT_ONLY),
    "interleave_mm_strings": ((False,), _TEXT_ONLY),
    "media_io_kwargs": ((None, {}), _TEXT_ONLY),
    "mm_processor_cache_gb": ((4, 4.0, 0, 0.0), _TEXT_ONLY),
    "mm_processor_cache_type": (("lru", None), _TEXT_ONLY),
    "mm_shm_cache_max_object_size_mb": ((128,), _TEXT_ONLY),
    "mm_encoder_only": ((False,), _TEXT_ONLY),
    "mm_encoder_tp_mode": (("weights",), _TEXT_ONLY),
    "mm_encoder_attn_backend": ((None,), _TEXT_ONLY),
    "mm_encoder_attn_dtype": ((None,), _TEXT_ONLY),
    "mm_encoder_fp8_scale_path": ((None,), _TEXT_ONLY),
    "mm_encoder_fp8_scale_save_path": ((None,), _TEXT_ONLY),
    "mm_encoder_fp8_scale_save_margin": ((1.5,), _TEXT_ONLY),
    "io_processor_plugin": ((None,), _TEXT_ONLY),
    "renderer_num_workers": ((1,), "prompts are rendered and tokenized in the calling process"),
    "skip_mm_profiling": ((False, True), _TEXT_ONLY),
    "video_pruning_rate": ((None,), _TEXT_ONLY),
    "mm_tensor_ipc": (("direct_rpc",), _TEXT_ONLY),
    "mm_ipc_gpu_memory_gb": ((0, 0.0), _TEXT_ONLY),
    "disable_chunked_mm_input": ((False, True), _TEXT_ONLY),
    # state-space models
    "mamba_config": ((None, {}), _NO_MAMBA),
    "mamba_cache_dtype": (("auto",), _NO_MAMBA),
    "mamba_ssm_cache_dtype": (("auto",), _NO_MAMBA),
    "mamba_block_size": ((None,), _NO_MAMBA),
    "mamba_cache_mode": (("none",), _NO_MAMBA),
    "mamba_backend": ((None, "triton", "TRITON"), _NO_MAMBA),
    "enable_mamba_cache_stochastic_rounding": ((False,), _NO_MAMBA),
    "mamba_cache_philox_rounds": ((0,), _NO_MAMBA),
    "gdn_prefill_backend": ((None,), _NO_MAMBA),
    # reasoning, diffusion, sleep, plugins
    "reasoning_parser_plugin": ((None, ""), "LLM's outputs keep the thinking in their text (as vLLM's LLM.generate); "
                                            "batchllm run --reasoning-parser splits chat answers"),
    "reasoning_config": ((None,), "LLM's outputs keep the thinking in their text (as vLLM's LLM.generate)"),
    "diffusion_config": ((None,), "the engine generates text token by token"),
    "enable_cumem_allocator": ((False,), "sleep mode is not supported; shutdown() frees the device memory"),
    "additional_config": ((None, {}), "no platform plugins are loaded"),
    "fail_on_environ_validation": ((False,), "no VLLM_* environment variables are read"),
    # observability
    "aggregate_engine_logging": ((False,), _NO_METRICS),
    "show_hidden_metrics_for_version": ((None,), _NO_METRICS),
    "otlp_traces_endpoint": ((None,), _NO_METRICS),
    "collect_detailed_traces": ((None,), _NO_METRICS),
    "kv_cache_metrics": ((False,), _NO_METRICS),
    "kv_cache_metrics_sample": ((0.01,), _NO_METRICS),
    "cudagraph_metrics": ((False,), _NO_METRICS),
    "enable_layerwise_nvtx_tracing": ((False,), _NO_METRICS),
    "enable_mfu_metrics": ((False,), _NO_METRICS),
    "enable_logging_iteration_details": ((False,), _NO_METRICS),
    "jit_monitor_mode": (("warn",), _NO_METRICS),
    "jit_monitor_verbose": ((False,), _NO_METRICS),
    "enable_mm_processor_stats": ((False,), _NO_METRICS),
}
"""vLLM 0.26 `EngineArgs` field -> (the values taken and dropped, vLLM's default first; what to do instead of any
other, or why it cannot be had here)."""
