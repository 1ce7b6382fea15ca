"""Frozen configuration objects: every engine option is declared here once, as a field with its
default, its help text and (where it has them) its choices.

`batchllm/options.py` derives the CLI arguments and the `LLM` keywords from these declarations, so
a new option is one field here. Configs are frozen (house rule 6): values found at run time (the
number of KV blocks, EOS ids, the model's context length) live in result objects elsewhere
(`runner.KVCacheSpec`, `models.ModelSpec`, `engine.Engine`), never written back into them. This
module reads the engine's environment variables; the others read elsewhere (`OMP_NUM_THREADS`,
`BATCHLLM_TP_COLLECTIVE_TIMEOUT_S`) are listed in docs/architecture.md beside it.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from batchllm.core.policies import GROUP_ORDERS  # torch-free
from batchllm.models.quant_config import QUANTIZATION_METHODS  # torch-free
from batchllm.prefix.plan import PLAN_MODES

logger = logging.getLogger(__name__)

_DTYPES = ("auto", "float32", "bfloat16", "float16", "half", "float")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
"""vLLM's other names of dtypes: a ModelConfig holds the name they stand for."""
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
_KERNEL_CHOICES = ("auto", "torch", "triton")
_KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "bfloat16", "float16")  # kv_quant.KV_CACHE_DTYPES' (no torch here)
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")
"""The kv_cache_dtype names of an fp8 cache (resolved: "auto" may become one, `engine.resolve_model`)."""


def fp8_attention_problem(kv_cache_dtype: str) -> str:
    """Why fp8_attention cannot run over the cache `kv_cache_dtype` gives ("auto" is refused only once resolved, by
    `engine.resolve_model`: a checkpoint declaring an FP8 cache makes it fp8). Both attention backends take FP8
    operands only over an fp8 cache (torch_ref: is_fp8(kv_cache); Triton: its fp8 flag): over a 16-bit one the
    option would be silently ignored."""
    given = f"kv_cache_dtype={kv_cache_dtype!r}" + (" (the checkpoint declares no FP8 cache)"
                                                     if kv_cache_dtype == "auto" else "")
    return (f"fp8_attention needs an fp8 KV cache: {given} keeps a 16-bit cache, over which the attention takes no "
            "FP8 operands; set kv_cache_dtype='fp8' too, or leave fp8_attention off")


def option(default: Any, help: str, *, choices: tuple | None = None, at_least: float | None = None,
           above: float | None = None, at_most: float | None = None, refused: dict[str, str] | None = None) -> Any:
    """A config field declared once: its default, its help text (shown by `--help`), and the values
    it may take (choices, or bounds: >= at_least, > above, <= at_most; None is always allowed where
    the default is None), checked when the config is built; the CLI offers the choices. refused: values vLLM
    takes that are not choices here, each with the reason given (by the config and by the CLI) instead of the
    bare list of choices."""
    limits = dict(choices=None if choices is None else tuple(choices), at_least=at_least, above=above, at_most=at_most,
                  refused=refused)
    return field(default=default, metadata={"help": help, **{k: v for k, v in limits.items() if v is not None}})


def refused_value_message(name: str, value: Any, reason: str) -> str:
    """What a refused value (`option`'s refused) is told, by the config and by the CLI alike."""
    return f"{name}={value!r} is not supported: {reason}"


class _Checked:
    """Checks every field against its declared choices and bounds; the error names the field."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            value, m = getattr(self, f.name), f.metadata
            if value is None and f.default is None:
                continue
            if value in m.get("refused", ()):
                raise ValueError(refused_value_message(f.name, value, m["refused"][value]))
            if "choices" in m and value not in m["choices"]:
                none = " or None" if f.default is None else ""  # a None default is always accepted (above)
                raise ValueError(f"{f.name} must be one of {m['choices']}{none}, got {value!r}")
            low, above, high = m.get("at_least"), m.get("above"), m.get("at_most")
            if (low is not None and value < low) or (above is not None and value <= above) or (
                    high is not None and value > high):
                wanted = (f">= {low}" if low is not None else f"in ({above}, {high}]" if high is not None
                          else f"> {above}")
                raise ValueError(f"{f.name} must be {wanted}, got {value!r}")


def default_cache_dir() -> Path:
    """Where converted models are kept: $BATCHLLM_CACHE_DIR, else $XDG_CACHE_HOME/batchllm, else ~/.cache/batchllm,
    a leading ~ of either variable expanded (as vLLM expands VLLM_CACHE_ROOT: a quoted value, a Docker -e, a
    systemd or .env file leave it to the program). A ValueError where none can be named: no home directory is known
    (HOME unset and the user in no passwd entry, as in a container under an arbitrary uid)."""
    explicit = os.environ.get("BATCHLLM_CACHE_DIR")
    if explicit:
        return Path(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(os.path.expanduser(xdg)) / "batchllm"
    try:
        return Path.home() / ".cache" / "batchllm"
    except RuntimeError:  # (Path.home: "Could not determine home directory")
        raise ValueError("cannot name a cache directory for converted models: no home directory is known (HOME is "
                         "unset and this user has no passwd entry); set BATCHLLM_CACHE_DIR to a writable "
                         "directory") from None


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "WARN", "FATAL", "NOTSET")
"""The level names Python's logging takes (WARN, FATAL and NOTSET too: vLLM passes VLLM_LOGGING_LEVEL to it)."""


LOG_LEVEL_VARIABLES = ("BATCHLLM_LOG_LEVEL", "VLLM_LOGGING_LEVEL")
"""The environment variables that set the log level, the first set winning: this project's, then vLLM's (a vLLM
user's VLLM_LOGGING_LEVEL=DEBUG did nothing)."""


def _log_level_given() -> tuple[str, str] | None:
    return next(((name, os.environ[name]) for name in LOG_LEVEL_VARIABLES if name in os.environ), None)


def default_log_level() -> str:
    """Logging level for the `batchllm` loggers: $BATCHLLM_LOG_LEVEL, else vLLM's $VLLM_LOGGING_LEVEL (one of
    LOG_LEVELS, any case), default WARNING, also where the variable names no level (`log_level_problem` says so:
    the CLI refuses it)."""
    given = _log_level_given()
    level = given[1].upper() if given else "WARNING"
    return level if level in LOG_LEVELS else "WARNING"


def log_level_problem() -> str | None:
    """Why the log level's variable is refused (it names no level: logging raised a traceback, exit 1), or None."""
    given = _log_level_given()
    if given is None or given[1].upper() in LOG_LEVELS:
        return None
    return f"{given[0]} must be one of {', '.join(LOG_LEVELS)}, got {given[1]!r}"


def unread_vllm_variables() -> list[str]:
    """vLLM's environment variables (VLLM_*) set here that nothing here reads: a job that ran as if they were not
    set said nothing of them (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 with a longer --max-model-len was refused without a
    word on it)."""
    return sorted(name for name in os.environ if name.startswith("VLLM_") and name not in LOG_LEVEL_VARIABLES)


@dataclass(frozen=True)
class ModelConfig(_Checked):
    model: str | None = option(
        None, "Hugging Face model directory (config.json + *.safetensors + tokenizer), or a model id "
        "(org/name) already in the local Hugging Face cache (never downloaded); "
        "None: the embedded SmolLM2-135M-Instruct")
    tokenizer: str | None = option(None, "tokenizer directory or cached model id; None: the model's")
    generation_config: str = option("auto", "where the sampling defaults of `run` and of LLM calls without "
                                    "SamplingParams come from, as vLLM's --generation-config: "
                                    "auto: the model's generation_config.json (temperature, top_p, top_k, min_p, "
                                    "repetition_penalty, max_new_tokens); vllm: take none of them; or a folder "
                                    "holding a generation_config.json, which also gives the EOS ids")
    chat_template: str | None = option(None, "a Jinja chat template, or a file holding one, used instead of the "
                                       "tokenizer's (vLLM's --chat-template); None: the tokenizer's")
    dtype: str = option("auto", "weight and KV dtype; auto: float32 on CPU, the checkpoint's 16-bit dtype "
                        "(else bfloat16) on GPU", choices=_DTYPES)
    max_model_len: int | None = option(None, "cap on prompt + output tokens per request; None: the model's "
                                       "(its config's max_position_embeddings, or a smaller n_positions, "
                                       "seq_length ..., as vLLM derives it)", at_least=2)
    load_format: str = option("auto", "auto/safetensors: read the weights from the model directory; dummy: "
                              "random weights from config.json alone (benchmarking shapes)", choices=_LOAD_FORMATS)
    seed: int | None = option(0, "seed of the engine-wide generator used by requests without a seed of their own "
                              "(each data-parallel engine draws from one of its own), so runs repeat; dummy weights "
                              "are seeded by their names alone, as vLLM's by one fixed seed; None: 0, with a "
                              "warning, as vLLM's V1 "
                              "engine read it (vLLM 0.26 refuses None)")
    device: str = option("auto", "auto (cuda if available, else cpu) | cpu | cuda | cuda:N")
    skip_tokenizer_init: bool = option(False, "load no tokenizer: prompts must be token ids and outputs carry "
                                       "no text")
    trust_remote_code: bool = option(False, "accepted for vLLM compatibility and ignored: BatchLLM runs no code "
                                     "from the model directory (its architectures are built in)")
    quantization: str | None = option(None, "fp8: the decoder's linear layers run with float8 weights (per-channel "
                                      "scales, quantized at load) and per-token float8 activations; None: the "
                                      "checkpoint decides (an FP8 checkpoint runs FP8, else the model dtype)",
                                      choices=QUANTIZATION_METHODS)
    fp8_fused_quant: bool = option(True, "with FP8 weights, RMSNorm and SiLU-and-mul quantize their outputs "
                                   "per token in their own kernels (the same bits as the FP8 layers' quantizer, "
                                   "~6% faster on an H200) instead of each FP8 layer quantizing its input; off: "
                                   "for comparison; no effect without FP8")
    fp8_deferred_scales: bool = option(True, "with FP8 weights on an FP8 GPU, a bfloat16 model and the Triton "
                                       "kernels, decode-sized matmuls (up to 512 tokens) run cuBLAS's "
                                       "per-tensor FP8 kernels and the norm, SiLU and rotary kernels after them "
                                       "apply the per-token and per-channel scales as they load the product; "
                                       "off: the row-scaled matmul, for comparison; no effect without FP8")
    attention_backend: str = option("auto", "auto: triton on CUDA when Triton is installed, else torch "
                                    "(the reference)", choices=_KERNEL_CHOICES)
    shared_prefix_attention: bool = option(True, "the Triton attention reads a shared prefix's keys once for "
                                           "its group's decodes; off: plain paged attention (for comparison)")
    kernels: str = option("auto", "norm, rotary and SiLU ops; auto: one Triton kernel each on CUDA when "
                          "Triton is installed, else torch", choices=_KERNEL_CHOICES)
    fp8_attention: bool = option(False, "needs an fp8 KV cache (kv_cache_dtype fp8, or auto on a checkpoint "
                                 "declaring one; refused over a 16-bit cache): the attention's "
                                 "two matmuls take FP8 operands (the query quantized per token and head, the "
                                 "softmax weights scaled by 448 into e4m3's range) in the programs that fill an FP8 "
                                 "MMA (prefill tiles, prefix-shared items; one-query decode items keep fp16), as "
                                 "FlashAttention 3 does over an fp8 cache; off: the cache's values are cast up to 16 "
                                 "bits. Off by default: slower on an H200 (0.68-0.71x the fp8 cache's attention on "
                                 "prefill, 0.86x on decode steps; e4m3 MMAs want V transposed, which Triton does in "
                                 "registers)")
    kv_store: str = option("auto", "how a step's new keys and values reach the KV cache under the Triton "
                           "attention: triton: one kernel per layer (copying, or quantizing to fp8; 2-15x faster "
                           "per layer on an H200); torch: per K and V a quantize and an index_copy_ (the same "
                           "bytes); auto: triton on CUDA (triton needs the Triton attention)",
                           choices=_KERNEL_CHOICES)
    enforce_eager: bool = option(False, "never use CUDA graphs (else decode steps run as graphs on CUDA with "
                                 "the Triton attention)")
    max_logprobs: int = option(20, "most logprobs (and prompt_logprobs) one request may ask for, as vLLM's "
                               "max_logprobs; a request asking for more is an error naming it; -1: no cap (a "
                               "whole vocabulary per token makes megabytes of output per token)", at_least=-1)
    max_cudagraph_capture_size: int | None = option(
        None, "largest decode batch (sequences) with a CUDA graph; larger decode steps run eagerly; None: 1,024 "
        "(1.21x for FP8, 1.06x for bf16 against graphs up to 512, vLLM's default, on the Llama-3.1-8B shape), "
        "or 8,192 for a model of hidden size 2,048 or less, whose eager decode steps are bound by kernel launches "
        "(1.3-3.1x on the SmolLM2-135M shape on an H200); either capped by the step budget",
        at_least=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", DTYPE_ALIASES.get(self.dtype, self.dtype))
        if isinstance(self.quantization, str):  # vLLM's ModelConfig lowercases it: quantization="FP8" is "fp8"
            object.__setattr__(self, "quantization", self.quantization.lower())
        if self.seed is None:  # vLLM V1 read None as 0 ("impossible to un-specify a seed"); 0.26 refuses it
            logger.warning("seed=None is taken as seed=0, as vLLM's V1 engine took it (vLLM 0.26 refuses None): "
                           "runs repeat; give another integer for other samples")
            object.__setattr__(self, "seed", 0)
        if not isinstance(self.seed, numbers.Integral) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))  # (a numpy integer, as the option check allows)
        from batchllm.sampling_params import SEED_MAX, SEED_MIN  # (torch's generator range)

        if not SEED_MIN <= self.seed <= SEED_MAX:  # (it failed after the weights loaded, naming no option)
            raise ValueError(f"seed must be in [-2**63, 2**64 - 1], got {self.seed}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")  # (a torch error
            # at the engine's start, exit 3, named no option)
        super().__post_init__()


ACTIVATION_RESERVE = 0.10
"""Fraction of the card that an automatically sized KV cache leaves out of the engine's
gpu_memory_utilization for the activations of its largest step where they are not measured (the torch
attention; the Triton attention's are: `runner.activation_profile`), and the least part of a GPU each of
engines_per_gpu engines must be given (`runner.model_runner.engine_share`)."""


def leaves_activation_reserve(utilization: float, engines: int) -> bool:
    """Whether an equal part of `utilization` for each of `engines` engines sharing a GPU is more
    than the activation reserve (`runner.model_runner.engine_share` refuses less)."""
    return utilization / engines > ACTIVATION_RESERVE


@dataclass(frozen=True)
class CacheConfig(_Checked):
    block_size: int | None = option(None, "tokens per KV block; None: 64 with an fp8 cache (whose V is then "
                                    "keys-major: 1.09x its 16-token blocks on decode-heavy with FP8 weights, "
                                    "on an H200) and with a 16-bit cache on a Hopper GPU (whose attention tiles "
                                    "then load by TMA: 1.065x on the 16K workload), else 16", at_least=1)
    kv_cache_memory_gib: float | None = option(None, "KV cache size in GiB (of each engine, with several); None: 2 "
                                               "on CPU, on GPU what gpu_memory_utilization of the card leaves", above=0)
    gpu_memory_utilization: float = option(0.90, "fraction of the GPU's memory the engine may use (weights + "
                                           "activations + KV) when the KV size is automatic; engines_per_gpu engines "
                                           "sharing a GPU get an equal part each", above=0, at_most=1)
    gpu_memory_accounting: str = option("card", "what counts as used against gpu_memory_utilization when the KV "
                                        "size is automatic; card: all memory in use on the GPU, other processes' "
                                        "too; engine: this engine's own (torch's + 1 GiB for its CUDA context), "
                                        "the cache never taking more than is free (engines_per_gpu engines use "
                                        "it, to size their caches at once)", choices=("card", "engine"))
    num_kv_blocks: int | None = option(None, "exact number of KV blocks (overrides the memory settings; tests "
                                       "use it to force preemption)", at_least=1)
    kv_cache_dtype: str = option("auto", "element type of the KV cache; auto: the model's dtype (fp8 where the "
                                 "checkpoint declares an FP8 cache: compressed-tensors' kv_cache_scheme, as vLLM); "
                                 "fp8 (= fp8_e4m3): float8_e4m3fn with a per-layer k/v scale (an FP8 model's "
                                 "checkpoint k_scale/v_scale, else 1.0), half the bytes of a 16-bit cache per token, "
                                 "so twice the tokens fit; bfloat16 / float16: the model's dtype, which must be that "
                                 "one (vLLM's way to keep such a checkpoint's cache unquantized)",
                                 choices=_KV_CACHE_DTYPES,
                                 refused={"fp8_e5m2": "the fp8 KV cache here stores float8_e4m3fn only (its store and "
                                          "attention kernels are built for e4m3); give 'fp8' (= 'fp8_e4m3') or "
                                          f"another of {_KV_CACHE_DTYPES}"})

    @property
    def sized_from_memory(self) -> bool:
        """Neither num_kv_blocks nor kv_cache_memory_gib is given: the KV cache takes what
        gpu_memory_utilization leaves (on a GPU)."""
        return self.num_kv_blocks is None and self.kv_cache_memory_gib is None


@dataclass(frozen=True)
class SchedulerConfig(_Checked):
    max_num_batched_tokens: int | None = option(None, "token budget of one forward step (decode tokens + "
                                                "prefill chunks); None: chosen from the device (16384 on "
                                                "a GPU of 70 GiB or more, 8192 on a smaller one, 2048 on "
                                                "CPU; engine.default_step_tokens)", at_least=1)
    max_num_seqs: int | None = option(None, "most requests running at once; None: no cap (admission is by "
                                      "projected KV memory)", at_least=1)
    kv_admission_threshold: float = option(1.0, "admit new work while the projected KV use (prefixes once + "
                                           "suffixes + expected outputs) fits this fraction of the pool",
                                           above=0, at_most=4)
    enable_chunked_prefill: bool = option(True, "split long prompts across steps; off: a prompt is prefilled in "
                                          "one step (needs max_num_batched_tokens >= max_model_len)")
    async_scheduling: bool | None = option(None, "schedule and submit each step while the one before runs on "
                                           "the device; None (auto): on for CUDA devices")


@dataclass(frozen=True)
class SharingConfig(_Checked):
    prefix_sharing: bool = option(True, "plan prefix sharing over the whole batch and compute each shared "
                                  "prefix once, and keep finished sequences' KV for later calls to take (vLLM's "
                                  "enable_prefix_caching maps here)")
    plan_mode: str = option("multi", "multi: nested groups, each shared segment computed once; single: "
                            "BatchLLM's one-level groups", choices=PLAN_MODES)
    group_order: str = option("decode", "order of groups: decode = expected decode work per prefill token; "
                              "prefill = BatchLLM's 1/(prefix + suffixes); fifo = input order",
                              choices=tuple(GROUP_ORDERS))


@dataclass(frozen=True)
class ParallelConfig(_Checked):
    data_parallel_size: int = option(1, "engine processes, each on its own GPU (or tensor-parallel group), "
                                     "each given whole prefix groups", at_least=1)
    tensor_parallel_size: int = option(1, "GPUs (CPU: gloo processes) one engine's model is sharded over, "
                                       "Megatron style", at_least=1)
    engines_per_gpu: int | None = option(None, "engine processes sharing each GPU (or, on CPU, the processor), "
                                         "each given whole prefix groups and an equal part of "
                                         "gpu_memory_utilization; more than 1 runs one engine's host work while "
                                         "another's steps run on the GPU, for small, host-bound models; None: 1, "
                                         "except that `batchllm run` takes 2 for a model of under 0.55B parameters "
                                         "where it finds a CUDA GPU and 4 or more CPU cores, unless data or tensor "
                                         "parallelism or a KV size is given (data_parallel.auto_engines_per_gpu)",
                                         at_least=1)

    @property
    def engines_on_each_gpu(self) -> int:
        """engines_per_gpu, None read as 1."""
        return self.engines_per_gpu or 1

    @property
    def num_engines(self) -> int:
        """Engine processes in all: data_parallel_size GPUs (or TP groups) x engines_on_each_gpu."""
        return self.data_parallel_size * self.engines_on_each_gpu


@dataclass(frozen=True)
class EngineConfig:
    """One engine's whole configuration: one section per concern. Option names are unique across
    sections, so a flat keyword (`LLM(block_size=...)`, `--block-size`) names one field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    sharing: SharingConfig = field(default_factory=SharingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        """Checks that span sections (each section checks its own fields)."""
        if self.model.fp8_attention and self.cache.kv_cache_dtype not in (*FP8_KV_CACHE_DTYPES, "auto"):
            raise ValueError(fp8_attention_problem(self.cache.kv_cache_dtype))  # ("auto": the checkpoint decides)
        if self.parallel.engines_on_each_gpu > 1 and self.parallel.tensor_parallel_size > 1:
            raise ValueError("engines_per_gpu > 1 is for models that fit one GPU; it cannot be combined with "
                             "tensor_parallel_size > 1")
