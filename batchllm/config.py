"""Frozen configuration objects, one docstring line per field.

This module is the only place that reads environment variables. Values found at run time (the
number of KV blocks, EOS ids, the model's context length) live in result objects elsewhere
(`runner.KVCacheSpec`, `models.ModelSpec`), never written back into these configs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "safetensors", "dummy")


def default_cache_dir() -> Path:
    """Where converted models are kept: $BATCHLLM_CACHE_DIR, else $XDG_CACHE_HOME/batchllm, else ~/.cache."""
    explicit = os.environ.get("BATCHLLM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "batchllm"


def default_log_level() -> str:
    """Logging level for the `batchllm` loggers: $BATCHLLM_LOG_LEVEL, default WARNING."""
    return os.environ.get("BATCHLLM_LOG_LEVEL", "WARNING").upper()


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """Model directory (config.json + *.safetensors + tokenizer). None: the embedded SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    """Tokenizer directory; None means the model directory."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (float32 on CPU; the checkpoint's dtype, else bfloat16, on GPU)."""
    max_model_len: int | None = None
    """Cap on prompt + output tokens per request; None: the model's max_position_embeddings."""
    load_format: str = "auto"
    """auto/safetensors: read weights from the directory; dummy: random weights from config.json alone."""
    seed: int = 0
    """Seed of the engine-wide generator used by requests without a seed of their own (and dummy weights)."""
    device: str = "auto"
    """auto (cuda if available, else cpu) | cpu | cuda | cuda:N."""
    skip_tokenizer_init: bool = False
    """Do not load a tokenizer: prompts must be token ids and outputs carry no text."""
    attention_backend: str = "auto"
    """auto (triton on CUDA when Triton is installed, else torch) | torch (reference) | triton."""
    kernels: str = "auto"
    """Norm, rotary and SiLU ops: auto (one Triton kernel each on CUDA when Triton is installed, else
    torch) | torch | triton."""
    enforce_eager: bool = False
    """Never use CUDA graphs (else decode steps run as graphs on CUDA with the Triton attention)."""
    max_cudagraph_capture_size: int = 512
    """Largest decode batch (sequences) with a CUDA graph; larger decode steps run eagerly."""

    def __post_init__(self) -> None:
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if self.kernels not in ("auto", "torch", "triton"):
            raise ValueError(f"kernels must be auto, torch or triton, got {self.kernels!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        if self.max_cudagraph_capture_size < 1:
            raise ValueError(f"max_cudagraph_capture_size must be >= 1, got {self.max_cudagraph_capture_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory_gib: float | None = None
    """KV cache size in GiB. None: on CPU 2 GiB; on GPU gpu_memory_utilization of the card less what is used."""
    gpu_memory_utilization: float = 0.90
    """Fraction of the GPU's memory this process may use (weights + activations + KV), when the size is automatic."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks (overrides the memory settings; used by tests to force preemption)."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    """Token budget of one forward step (decode tokens + prefill chunks)."""
    max_num_seqs: int | None = None
    """Most requests running at once; None: no cap (admission is by projected KV memory)."""
    kv_admission_threshold: float = 1.0
    """Admit new work while the projected KV use (prefixes once + suffixes + expected outputs) fits this fraction of the pool."""
    enable_chunked_prefill: bool = True
    """Split long prompts across steps; off: a prompt is prefilled in one step (needs a budget >= max_model_len)."""
    async_scheduling: bool | None = None
    """Schedule and submit each step while the one before runs on the device; None: on for CUDA devices."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 or None, got {self.max_num_seqs}")
        if not 0.0 < self.kv_admission_threshold <= 4.0:
            raise ValueError(f"kv_admission_threshold must be in (0, 4], got {self.kv_admission_threshold}")


@dataclass(frozen=True)
class SharingConfig:
    prefix_sharing: bool = True
    """Plan prefix sharing over the whole batch and compute each shared prefix once."""
    plan_mode: str = "multi"
    """multi: nested groups, every shared segment computed once; single: BatchLLM's one-level groups."""
    group_order: str = "decode"
    """Order of groups: decode (expected decode work per prefill token), prefill (BatchLLM's), fifo."""

    def __post_init__(self) -> None:
        from batchllm.core.policies import GROUP_ORDERS  # torch-free; imported here to keep config a leaf
        from batchllm.prefix.plan import PLAN_MODES

        if self.plan_mode not in PLAN_MODES:
            raise ValueError(f"plan_mode must be one of {PLAN_MODES}, got {self.plan_mode!r}")
        if self.group_order not in GROUP_ORDERS:
            raise ValueError(f"group_order must be one of {tuple(GROUP_ORDERS)}, got {self.group_order!r}")


@dataclass(frozen=True)
class ParallelConfig:
    data_parallel_size: int = 1
    """Engine processes, each on its own GPU (or tensor-parallel group), each given whole prefix groups."""
    tensor_parallel_size: int = 1
    """GPUs (CPU: gloo processes) one engine's model is sharded over, Megatron style."""

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
