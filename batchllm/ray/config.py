"""The Ray Data processor's configuration: engine options per replica, sampling defaults, and how
the job is spread (replicas, GPUs per replica, rows per engine call, prefix keys).

Frozen and picklable (it travels to every Ray worker); imports neither ray nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from batchllm.options import VLLM_ALIASES, engine_config
from batchllm.prefix.plan import MULTI_LEVEL
from batchllm.sampling_params import SamplingParams


@dataclass(frozen=True)
class ProcessorConfig:
    """What `build_processor` needs. Engine fields are `batchllm.LLM` keywords (one engine per replica)."""

    # ---- engine, per replica
    ENGINE_FIELDS = ("model", "tokenizer", "dtype", "device", "max_model_len", "data_parallel_size",
                     "tensor_parallel_size", "max_num_batched_tokens", "kv_cache_memory_gib", "prefix_sharing",
                     "plan_mode", "group_order", "seed")
    """The engine options that are fields here; the others travel in `engine_kwargs`."""

    model: str | None = None
    """Hugging Face model directory, readable on every node; None: the embedded SmolLM2-135M-Instruct."""
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    data_parallel_size: int = 1
    """Engines inside one replica (passed to LLM only when > 1)."""
    tensor_parallel_size: int = 1
    """GPUs per engine inside one replica (passed to LLM only when > 1)."""
    max_num_batched_tokens: int | None = None
    """None: the engine's device default (engine.default_step_tokens)."""
    kv_cache_memory_gib: float | None = None
    prefix_sharing: bool = True
    plan_mode: str = MULTI_LEVEL
    group_order: str = "decode"
    seed: int = 0
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Any other `LLM` keyword (block_size, enforce_eager, ...)."""

    # ---- sampling defaults (a row's own `sampling_params` dict takes precedence, field by field)
    max_tokens: int = 256
    sampling_params: dict[str, Any] = field(default_factory=dict)

    # ---- how the job is spread
    num_replicas: int = 1
    """Engine actors (each a full engine with its own model copy)."""
    num_gpus_per_replica: float | None = None
    """None: data_parallel_size x tensor_parallel_size when the cluster has GPUs, else 0."""
    num_cpus_per_replica: float = 1.0
    batch_size: int = 1024
    """Target rows per engine call. Rows are bucketed by prefix key into about
    rows / batch_size buckets; one call runs one whole bucket, so a prefix group is never split."""
    num_buckets: int | None = None
    """None: max(num_replicas, ceil(rows / batch_size)), which counts the input rows first."""
    prefix_key_tokens: int = 64
    """Longest prefix (tokens) that decides a row's bucket; see `stages.prefix_key`."""
    tokenize_batch_size: int = 256
    """Rows per call of the CPU tokenize stage (Ray tasks)."""

    def __post_init__(self) -> None:
        for name in ("num_replicas", "batch_size", "num_buckets", "prefix_key_tokens", "data_parallel_size",
                     "tensor_parallel_size"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        config = engine_config(model=self.model, **self.engine_options())  # every option checked as LLM checks it
        if self.model is not None and (Path(self.model).expanduser() / "config.json").is_file():
            # a model directory the driver can read (the replicas' nodes may hold it only) is checked here too:
            # its config.json against the context asked (a max_model_len past the model's failed every replica)
            from batchllm.inputs import read_model_source

            read_model_source(self.model, config.model.max_model_len)
        unknown = sorted(set(self.sampling_params) - set(SamplingParams.field_names()))
        if unknown:
            raise ValueError(f"sampling_params has unknown field(s): {', '.join(unknown)}")
        SamplingParams(**self.sampling_defaults())  # a bad default fails here, not on every row

    def max_logprobs(self) -> int:
        """The engines' cap on a row's logprobs / prompt_logprobs (-1: none), as `LLM` resolves it."""
        return engine_config(model=self.model, **self.engine_options()).model.max_logprobs

    def sampling_defaults(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, **self.sampling_params}

    def engine_options(self) -> dict[str, Any]:
        """Keywords for `batchllm.LLM` (besides the model directory): the fields, with `engine_kwargs` over
        those left at their defaults (vLLM's Ray configs give max_num_batched_tokens, enable_prefix_caching
        and the like in engine_kwargs); a field set both ways is a ValueError naming it."""
        named: dict[str, Any] = dict(
            tokenizer=self.tokenizer, dtype=self.dtype, device=self.device, max_model_len=self.max_model_len,
            max_num_batched_tokens=self.max_num_batched_tokens, kv_cache_memory_gib=self.kv_cache_memory_gib,
            prefix_sharing=self.prefix_sharing, plan_mode=self.plan_mode, group_order=self.group_order,
            seed=self.seed,
        )
        kwargs = {VLLM_ALIASES.get(name, name): value for name, value in self.engine_kwargs.items()}
        defaults = {f.name: f.default for f in fields(self)}
        for name in kwargs.keys() & named.keys():
            if named[name] != defaults[name] and named[name] != kwargs[name]:
                raise ValueError(f"{name} is given twice, as ProcessorConfig.{name} ({named[name]!r}) and in "
                                 f"engine_kwargs ({kwargs[name]!r}); give it once")
        options = {**named, **kwargs}
        if self.data_parallel_size > 1:
            options["data_parallel_size"] = self.data_parallel_size
        if self.tensor_parallel_size > 1:
            options["tensor_parallel_size"] = self.tensor_parallel_size
        return options
