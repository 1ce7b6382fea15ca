"""Frozen configuration objects: every engine option is declared here once, as a field with its
default, its help text and (where it has them) its choices.

`batchllm/options.py` derives the CLI arguments and the `LLM` keywords from these declarations, so
a new option is one field here. Configs are frozen (house rule 6): values found at run time (the
number of KV blocks, EOS ids, the model's context length) live in result objects elsewhere
(`runner.KVCacheSpec`, `models.ModelSpec`, `engine.Engine`), never written back into them. This
module is the only place that reads environment variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from batchllm.core.policies import GROUP_ORDERS  # torch-free
from batchllm.prefix.plan import PLAN_MODES

_DTYPES = ("auto", "float32", "bfloat16", "float16")
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
_KERNEL_CHOICES = ("auto", "torch", "triton")


def option(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A config field declared once: its default, its help text (shown by `--help`) and its choices
    (checked when the config is built, and offered by the CLI)."""
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    return field(default=default, metadata=metadata)


def _check_choices(config: Any) -> None:
    """Raise ValueError naming the field if a field with declared choices holds anything else."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name} must be one of {choices}, got {value!r}")


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
    model: str | None = option(
        None, "Hugging Face model directory (config.json + *.safetensors + tokenizer); "
        "None: the embedded SmolLM2-135M-Instruct")
    tokenizer: str | None = option(None, "tokenizer directory; None: the model directory")
    dtype: str = option("auto", "weight and KV dtype; auto: float32 on CPU, the checkpoint's 16-bit dtype "
                        "(else bfloat16) on GPU", choices=_DTYPES)
    max_model_len: int | None = option(None, "cap on prompt + output tokens per request; None: the model's "
                                       "max_position_embeddings")
    load_format: str = option("auto", "auto/safetensors: read the weights from the model directory; dummy: "
                              "random weights from config.json alone (benchmarking shapes)", choices=_LOAD_FORMATS)
    seed: int = option(0, "seed of the engine-wide generator used by requests without a seed of their own "
                       "(and of dummy weights)")
    device: str = option("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    skip_tokenizer_init: bool = option(False, "load no tokenizer: prompts must be token ids and outputs carry "
                                       "no text")
    trust_remote_code: bool = option(False, "accepted for vLLM compatibility and ignored: BatchLLM runs no code "
                                     "from the model directory (its architectures are built in)")
    quantization: str | None = option(None, "weight quantization method: not supported yet (only None)")
    attention_backend: str = option("auto", "auto: triton on CUDA when Triton is installed, else torch "
                                    "(the reference)", choices=_KERNEL_CHOICES)
    shared_prefix_attention: bool = option(True, "the Triton attention reads a shared prefix's keys once for "
                                           "its group's decodes; off: plain paged attention (for comparison)")
    kernels: str = option("auto", "norm, rotary and SiLU ops; auto: one Triton kernel each on CUDA when "
                          "Triton is installed, else torch", choices=_KERNEL_CHOICES)
    enforce_eager: bool = option(False, "never use CUDA graphs (else decode steps run as graphs on CUDA with "
                                 "the Triton attention)")
    max_cudagraph_capture_size: int = option(512, "largest decode batch (sequences) with a CUDA graph; larger "
                                             "decode steps run eagerly")

    def __post_init__(self) -> None:
        _check_choices(self)
        if self.quantization is not None:
            raise ValueError(f"quantization={self.quantization!r} is not supported yet (only None)")
        if self.max_cudagraph_capture_size < 1:
            raise ValueError(f"max_cudagraph_capture_size must be >= 1, got {self.max_cudagraph_capture_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = option(16, "tokens per KV block")
    kv_cache_memory_gib: float | None = option(None, "KV cache size in GiB; None: 2 on CPU, on GPU what "
                                               "gpu_memory_utilization of the card leaves")
    gpu_memory_utilization: float = option(0.90, "fraction of the GPU's memory this process may use (weights + "
                                           "activations + KV) when the KV size is automatic")
    num_kv_blocks: int | None = option(None, "exact number of KV blocks (overrides the memory settings; tests "
                                       "use it to force preemption)")

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
    max_num_batched_tokens: int = option(2048, "token budget of one forward step (decode tokens + prefill "
                                         "chunks)")
    max_num_seqs: int | None = option(None, "most requests running at once; None: no cap (admission is by "
                                      "projected KV memory)")
    kv_admission_threshold: float = option(1.0, "admit new work while the projected KV use (prefixes once + "
                                           "suffixes + expected outputs) fits this fraction of the pool")
    enable_chunked_prefill: bool = option(True, "split long prompts across steps; off: a prompt is prefilled in "
                                          "one step (needs max_num_batched_tokens >= max_model_len)")
    async_scheduling: bool | None = option(None, "schedule and submit each step while the one before runs on "
                                           "the device; None (auto): on for CUDA devices")

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1 or None, got {self.max_num_seqs}")
        if not 0.0 < self.kv_admission_threshold <= 4.0:
            raise ValueError(f"kv_admission_threshold must be in (0, 4], got {self.kv_admission_threshold}")


@dataclass(frozen=True)
class SharingConfig:
    prefix_sharing: bool = option(True, "plan prefix sharing over the whole batch and compute each shared "
                                  "prefix once (vLLM's enable_prefix_caching maps here)")
    plan_mode: str = option("multi", "multi: nested groups, each shared segment computed once; single: "
                            "BatchLLM's one-level groups", choices=PLAN_MODES)
    group_order: str = option("decode", "order of groups: decode = expected decode work per prefill token; "
                              "prefill = BatchLLM's 1/(prefix + suffixes); fifo = input order",
                              choices=tuple(GROUP_ORDERS))

    def __post_init__(self) -> None:
        _check_choices(self)


@dataclass(frozen=True)
class ParallelConfig:
    data_parallel_size: int = option(1, "engine processes, each on its own GPU (or tensor-parallel group), "
                                     "each given whole prefix groups")
    tensor_parallel_size: int = option(1, "GPUs (CPU: gloo processes) one engine's model is sharded over, "
                                       "Megatron style")

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")


@dataclass(frozen=True)
class EngineConfig:
    """One engine's whole configuration: one section per concern. Option names are unique across
    sections, so a flat keyword (`LLM(block_size=...)`, `--block-size`) names one field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
