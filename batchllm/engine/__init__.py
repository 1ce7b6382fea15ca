"""`build_engine(config)`: one engine (model, KV cache, attention backend, runner, decode graphs,
scheduler, EngineCore) assembled from an `EngineConfig` alone.

Nothing here reads a tokenizer or a prompt: `LLM` (and any process that runs requests) tokenizes,
with its `FrontEnd` (`llm.front_end_for`). Both sides start from the same `inputs.ModelSource` (the
directory, its spec and context), read once per `LLM` (and once per `batchllm run`) and handed to
`resolve_model`. An engine is built once and never reconfigured: a different setting is a different
engine (`bench.py` builds one per configuration). Values found while building (device, dtype,
context length, KV size) are fields of `Engine`, never written back into the frozen config (house
rule 6).
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from batchllm.attention import TorchReferenceBackend
from batchllm.attention.backend import AttentionBackend
from batchllm.config import FP8_KV_CACHE_DTYPES, EngineConfig, ParallelConfig, SchedulerConfig, fp8_attention_problem
from batchllm.core.engine_core import EngineCore
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.scheduler import Scheduler
from batchllm.inputs import ModelSource, read_model_source
from batchllm.layers.ops import make_ops, use_triton
from batchllm.models.decoder import DecoderForCausalLM
from batchllm.models.loader import build_model, warn_unit_kv_scales
from batchllm.models.quant_config import Fp8Scheme, resolve_kv_cache_dtype, resolve_quantization
from batchllm.models.spec import ModelSpec
from batchllm.parallel.tensor_parallel import shard_spec
from batchllm.runner.activation_profile import measure_activation_reserve
from batchllm.runner.model_runner import KVCacheSpec, ModelRunner, kv_block_size, plan_kv_cache

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BuildPhases:
    """Where an engine's build went: seconds per phase, in the order the phases ran (`seconds`). A phase
    on a CUDA device ends with a synchronize, so that work it queued is counted in it, not in the next; a phase
    that raises is not counted (nor synchronized: its error is the build's, unmasked)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started


@dataclass(frozen=True)
class Engine:
    """A built engine. `core` runs steps (add_request / step / finish_requests); the rest is what
    was found or made while building it. The frozen dataclass fixes the parts, not their state:
    each part is the writer of its own state (module docstrings)."""

    config: EngineConfig
    model_dir: Path
    model_spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    model: DecoderForCausalLM
    kv_spec: KVCacheSpec
    runner: ModelRunner
    core: EngineCore
    tp_followers: object | None = None
    """The tensor-parallel follower processes (`parallel/tp_worker.py`), when tensor_parallel_size > 1."""
    build_seconds: dict[str, float] = field(default_factory=dict)
    """Seconds each phase of the build took (`BuildPhases`): model, activation_reserve, kv_cache,
    kernel_warmup, decode_graphs (those that ran), then scheduler."""

    def step_failure(self, error: Exception) -> Exception:
        """What a step's failure means: a tensor-parallel follower that died makes rank 0's collective fail with
        a bare transport error ("Connection closed by peer"); then a WorkerDied naming the rank and how it ended,
        as data parallel names a worker (found at a step: the follower may have ended between calls, while this LLM
        sat idle). Otherwise the error itself."""
        dead = self.tp_followers.first_dead() if self.tp_followers is not None else None
        if dead is None:
            return error
        from batchllm.parallel.tp_worker import follower_died

        return follower_died(dead, "(found when a step's collective failed: ", error)

    def drop_followers_out_of_step(self) -> None:
        """Kill the tensor-parallel followers where rank 0 left them part-way through a step
        (`ModelRunner.step_cut_short`): they would wait in its collectives until the group's timeout (30 min), holding
        their devices. The runner then refuses every later step by name (`model_runner.CUT_SHORT`), never waiting."""
        if self.tp_followers is not None and self.runner.step_cut_short and self.tp_followers.processes:
            logger.warning("a step stopped part-way on tensor-parallel rank 0: its followers are stopped; this LLM "
                           "cannot generate again")
            self.tp_followers.abandon()

    def shutdown(self) -> None:
        """Stop the tensor-parallel followers, if any (they also die with this process)."""
        if self.tp_followers is not None:
            self.tp_followers.stop(self.runner)


def release_device_memory() -> None:
    """Free an engine just dropped (its reference cycles too) and hand the allocator's cached blocks
    back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


DEFAULT_STEP_TOKENS = {"cuda": 16384, "cuda-small": 8192, "cpu": 2048}
"""max_num_batched_tokens where the user sets none, by device (`default_step_tokens`). On an H200
(docs/benchmarks.md, issue 14) 8,192-token steps took the SmolLM2 user path from 15.8 s to 8.2 s
against 2,048, and 16,384 beat 8,192 and 32,768 side by side (8B paper workload +1.3%, 1B
decode-heavy +3.8%). A GPU under 70 GiB gets 8,192, as vLLM's default does, so that one step's
activations (~1 GB per 8K tokens for an 8B model's MLP) leave room on a 24-48 GB card. On CPU a
step's time grows with its tokens, so small steps keep the pipeline and the progress bar moving."""
SMALL_GPU_BYTES = 70 * 2**30

DEFAULT_GRAPH_BATCH = 1024
"""The largest decode step (sequences) run as a CUDA graph where the user sets none. An eager step's
~400 launches take the host ~20 ms; a decode step of 1,024 sequences of an 8B model takes the GPU
about as long (less with FP8), so up to 1,024 the graph pays. Llama-3.1-8B shape on an H200, paper
workload (1,024 requests decoding together), against graphs up to 512 (vLLM's default): FP8 weights
+ fp8 cache 109.0 / 110.2 req/s against 88.5 / 91.4 (1.21x, GPU idle 10% -> 2.7%), bf16 81.3
against 76.5 (1.06x); 43 graphs captured in 2.4 s, 0.21-0.25 GiB (0.14-0.16 at 512). 2,048 gained
nothing more with 2,048 requests (110.6 / 81.4 against 110.8 / 80.7: the bigger steps keep the GPU
busy eagerly; docs/benchmarks.md, session 21)."""
SMALL_MODEL_HIDDEN = 2048
SMALL_MODEL_GRAPH_BATCH = 8192
"""For a model of hidden size SMALL_MODEL_HIDDEN or less, decode steps of up to this many sequences (the
step budget, if smaller) run as graphs: a small model's eager decode step is bound by its kernel launches
at any batch. SmolLM2-135M shape on an H200, 1,000 / 3,000 / 6,000 requests of 25 shared + 13 own
tokens, 64 out: 1,428 / 2,332 / 1,786 req/s against 461 / 1,168 / 1,402 with 512 (3.10x / 2.00x / 1.27x;
67 graphs captured in 2.6-2.9 s, 0.24 GiB; docs/benchmarks.md, session 18)."""


def default_graph_batch(spec: ModelSpec) -> int:
    """max_cudagraph_capture_size where the user sets none (before the step budget caps it)."""
    return SMALL_MODEL_GRAPH_BATCH if spec.hidden_size <= SMALL_MODEL_HIDDEN else DEFAULT_GRAPH_BATCH


def default_step_tokens(device_type: str, device_memory_bytes: int | None = None) -> int:
    """The step budget for a device type ("cuda", "cpu", ...) and, for a GPU, its memory."""
    if device_type != "cuda":
        return DEFAULT_STEP_TOKENS["cpu"]
    if device_memory_bytes is not None and device_memory_bytes < SMALL_GPU_BYTES:
        return DEFAULT_STEP_TOKENS["cuda-small"]
    return DEFAULT_STEP_TOKENS["cuda"]


@dataclass(frozen=True)
class ModelFacts:
    """What the config and the model directory decide before anything is loaded."""

    model_dir: Path
    spec: ModelSpec
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    scheduler: SchedulerConfig
    """config.scheduler with every automatic setting resolved for the device (the step budget)."""
    quantization: Fp8Scheme | None = None
    """The FP8 scheme of the decoder's linear layers (the option and the checkpoint's config); None: none."""
    kv_cache_dtype: str = "auto"
    """config.cache's kv_cache_dtype resolved with the checkpoint's (`resolve_kv_cache_dtype`)."""


def resolve_model(config: EngineConfig, device: str | torch.device | None = None,
                  source: ModelSource | None = None) -> ModelFacts:
    """The model directory, its spec, the device, dtype and context length the config asks for;
    checks what can be checked without loading weights. `source`: the config's model as this
    process read it already (`read_model_source(config.model.model, config.model.max_model_len)`);
    None: read it here."""
    mc, sc = config.model, config.scheduler
    if source is None:  # a directory, or a Hugging Face id found in the local cache
        source = read_model_source(mc.model, mc.max_model_len)
    elif mc.max_model_len is not None and source.max_model_len != mc.max_model_len:
        raise ValueError(f"the model source was read for a context of {source.max_model_len} tokens, the config "
                         f"asks for {mc.max_model_len}")
    model_dir, spec, max_model_len = source.model_dir, source.spec, source.max_model_len
    device = resolve_device(str(mc.device if device is None else device))
    dtype = _resolve_dtype(mc.dtype, spec.checkpoint_dtype, device)
    if sc.max_num_batched_tokens is None:
        memory = device_total_memory(device) if device.type == "cuda" else None
        sc = replace(sc, max_num_batched_tokens=default_step_tokens(device.type, memory))
    if not sc.enable_chunked_prefill and sc.max_num_batched_tokens < max_model_len:
        raise ValueError(
            f"with chunked prefill off, max_num_batched_tokens ({sc.max_num_batched_tokens}) must be "
            f">= max_model_len ({max_model_len}), or no long prompt could ever run"
        )
    shard_spec(spec, config.parallel.tensor_parallel_size)  # a size that does not divide fails here, by name
    check_gpu_count(config.parallel, device)
    quantization = resolve_quantization(mc.quantization, spec.quantization)
    kv_cache_dtype = resolve_kv_cache_dtype(config.cache.kv_cache_dtype, spec.quantization,
                                            str(dtype).removeprefix("torch."))
    if mc.fp8_attention and kv_cache_dtype not in FP8_KV_CACHE_DTYPES:  # ("auto" on a checkpoint of no fp8 cache)
        raise ValueError(fp8_attention_problem(config.cache.kv_cache_dtype))
    return ModelFacts(model_dir, spec, device, dtype, max_model_len, sc, quantization, kv_cache_dtype)


def check_gpu_count(parallel: ParallelConfig, device: torch.device) -> None:
    """data_parallel_size x tensor_parallel_size GPUs from `device` on must be visible (engines_per_gpu
    shares them); a ValueError names the GPUs wanted and the count seen. No check off CUDA."""
    if device.type != "cuda":
        return
    dp, tp = parallel.data_parallel_size, parallel.tensor_parallel_size
    first = device.index or 0
    last = first + dp * tp - 1
    if torch.cuda.device_count() <= last:
        raise ValueError(f"data_parallel_size {dp} x tensor_parallel_size {tp} needs GPUs {first}..{last}, "
                         f"but {torch.cuda.device_count()} are visible")


def build_engine(config: EngineConfig, device: str | torch.device | None = None,
                 facts: ModelFacts | None = None) -> Engine:
    """Build the engine `config` describes; `device` overrides `config.model.device` (a worker
    process is given its GPU); `facts`: `resolve_model(config, device)` if the caller has it already.
    Loads the weights, sizes and allocates the KV cache, compiles the Triton attention's variants
    and, on CUDA with the Triton attention, captures decode graphs. With tensor_parallel_size > 1
    this process is rank 0 and starts the other ranks first."""
    if facts is not None and device is not None:
        raise ValueError("build_engine takes a device or resolved facts (which hold one), not both")
    facts = resolve_model(config, device) if facts is None else facts
    if facts.device.type == "cuda" and facts.device.index is not None:
        torch.cuda.set_device(facts.device)  # Triton launches on the current device
    tp, followers = None, None
    if config.parallel.tensor_parallel_size > 1:
        from batchllm.parallel.tp_worker import start_followers

        tp, followers = start_followers(config, facts)
    phases = BuildPhases(facts.device)
    try:
        runner = build_runner(config, facts, tp, phases)
        sc = facts.scheduler
        kv_spec = runner.kv_spec
        with phases.phase("scheduler"):
            kv = KVCacheManager(kv_spec.num_blocks, kv_spec.block_size, keep_finished=config.sharing.prefix_sharing)
            overlap = facts.device.type == "cuda" if sc.async_scheduling is None else sc.async_scheduling
            core = EngineCore(Scheduler(sc, kv, facts.max_model_len), runner, async_scheduling=overlap)
    except BaseException as error:  # (an interrupt too, however late: no LLM would hold the followers to stop them)
        if followers is None:
            raise
        failure = followers.build_failure(error)  # (a follower that died, named, before they are all killed)
        followers.abandon()  # (the followers, waiting in collectives, would otherwise outlive the failure)
        if failure is not error:
            raise failure from error
        raise
    logger.info("model %s (%s) on %s, %s%s, max_model_len %d, %d KV blocks of %d tokens (%s, %.2f GiB), tensor "
                "parallel %d", facts.model_dir, facts.spec.architecture, facts.device, facts.dtype,
                "" if facts.quantization is None else f", {facts.quantization.describe()}", facts.max_model_len,
                kv_spec.num_blocks, kv_spec.block_size, kv_spec.dtype, kv_spec.num_bytes / 2**30,
                config.parallel.tensor_parallel_size)
    return Engine(config, facts.model_dir, facts.spec, facts.device, facts.dtype, facts.max_model_len,
                  runner.model, kv_spec, runner, core, followers, phases.seconds)


def build_runner(config: EngineConfig, facts: ModelFacts, tp=None, phases: BuildPhases | None = None) -> ModelRunner:
    """One rank's model (its shard under tensor parallelism), KV cache, attention backend and
    runner; the Triton backend compiles its variants now and, on CUDA unless enforce_eager, decode
    steps get CUDA graphs (captured by all tensor-parallel ranks together: they hold collectives).
    Every rank builds through here, in the same order of collectives. `phases` records each part's seconds."""
    phases = BuildPhases(facts.device) if phases is None else phases
    mc, sc = config.model, facts.scheduler
    device, dtype = facts.device, facts.dtype
    if device.type == "cuda":
        release_device_memory()  # (an LLM dropped without shutdown waits in reference cycles, holding its weights
        # and cache: collected now, before this rank loads and measures the memory its cache may take, as vLLM does)
    with phases.phase("model"):
        model = _build_model(config, facts, tp)
    triton_attention = use_triton(mc.attention_backend, device, "attention_backend")
    graphs = triton_attention and device.type == "cuda" and not mc.enforce_eager
    graph_batch = min(mc.max_cudagraph_capture_size or default_graph_batch(facts.spec), sc.max_num_batched_tokens,
                      sc.max_num_seqs or 2**31) if graphs else 0
    cache = replace(config.cache, kv_cache_dtype=facts.kv_cache_dtype)
    reserve = None
    if triton_attention and device.type == "cuda" and cache.sized_from_memory:
        with phases.phase("activation_reserve"):
            reserve = measure_activation_reserve(
                model, sc.max_num_batched_tokens, sc.max_num_seqs or 2**31,
                mc.max_logprobs if mc.max_logprobs >= 0 else facts.spec.vocab_size, graph_batch, facts.max_model_len,
                kv_block_size(model.spec, cache, dtype, device), driver=tp is None or tp.is_driver)
    with phases.phase("kv_cache"):
        kv_spec = plan_kv_cache(model.spec, cache, dtype, device, tp, reserve)
    with phases.phase("kernel_warmup"):
        backend = _attention_backend(mc, triton_attention, model.spec, kv_spec, dtype, device)
    runner = ModelRunner(model, kv_spec, backend, device=device, seed=mc.seed, tp=tp)
    if backend.supports_decode_graphs and graphs:
        with phases.phase("decode_graphs"):
            runner.setup_decode_graphs(graph_batch, facts.max_model_len)
    return runner


def _build_model(config: EngineConfig, facts: ModelFacts, tp) -> DecoderForCausalLM:
    """The rank's model with its weights loaded (or dummy weights made), on its device; a checkpoint whose
    KV scales are all 1 is warned of once (by rank 0)."""
    mc = config.model
    model = build_model(facts.spec, facts.model_dir, max_positions=facts.max_model_len, dtype=facts.dtype,
                        device=facts.device, load_format="dummy" if mc.load_format == "dummy" else "safetensors",
                        ops=make_ops(mc.kernels, facts.device), tp=tp, quantization=facts.quantization,
                        fp8_fused_quant=mc.fp8_fused_quant, fp8_deferred_scales=mc.fp8_deferred_scales)
    if tp is None or tp.rank == 0:
        warn_unit_kv_scales(model, facts.kv_cache_dtype, facts.quantization)
    return model


def _attention_backend(mc, triton_attention: bool, spec: ModelSpec, kv_spec: KVCacheSpec, dtype: torch.dtype,
                       device: torch.device) -> AttentionBackend:
    """The attention backend for this rank's heads (`spec`: its shard) and KV cache, its kernels warmed up:
    the Triton one (compiling its variants now) or the torch reference. mc: the config's ModelConfig."""
    backend: AttentionBackend
    if triton_attention:
        from batchllm.attention.triton_backend import TritonBackend, decode_tile_for, tma_by_default

        tma = tma_by_default(kv_spec.dtype, device, spec.head_dim)  # (the backend's own choice: tma=None)
        backend = TritonBackend(use_prefix_groups=mc.shared_prefix_attention,
                                fused_store=use_triton(mc.kv_store, device, "kv_store"), fp8_attention=mc.fp8_attention,
                                decode_tile=decode_tile_for(kv_spec.dtype, kv_spec.block_size, dtype, spec.head_dim,
                                                            tma=tma))
    else:
        if mc.kv_store == "triton":  # the one-kernel store is the Triton attention's
            raise ValueError("kv_store='triton' needs the Triton attention (attention_backend 'triton', or 'auto' "
                             "on a CUDA device with Triton installed)")
        backend = TorchReferenceBackend(fp8_attention=mc.fp8_attention)
    backend.warmup(spec.num_heads, spec.num_kv_heads, spec.head_dim, kv_spec.block_size, dtype, device, kv_spec.dtype)
    return backend


def device_total_memory(device: torch.device) -> int:
    """A CUDA device's memory in bytes, from the driver (`data_parallel.cuda_total_memory`: no torch
    CUDA state in a process that may only plan and spawn workers), else from torch."""
    from batchllm.parallel.data_parallel import cuda_total_memory

    if device.index is not None:
        ordinal = device.index
    else:  # "cuda": torch's current device, 0 until something chose another
        ordinal = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    memory = cuda_total_memory(ordinal)
    return torch.cuda.get_device_properties(ordinal).total_memory if memory is None else memory


def resolve_device(device: str) -> torch.device:
    """The device a config's `device` names ("auto": CUDA when available, else the CPU); asking
    for CUDA without one is a ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is available")
    return resolved


def _resolve_dtype(dtype: str, checkpoint_dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(checkpoint_dtype or "", torch.bfloat16) if checkpoint_dtype != "float32" else torch.bfloat16
