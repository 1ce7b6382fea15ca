"""The facade: `LLM(...)` loads a model; `generate` / `chat` tokenize, run the engine loop, detokenize
and return one `RequestOutput` per prompt in input order (vLLM's API).

Writer of the per-completion output state (`CompletionState`); the scheduler owns request state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from batchllm.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, SharingConfig,
                             default_log_level)
from batchllm.core.engine_core import EngineCore
from batchllm.core.policies import GROUP_ORDERS, expected_output_tokens
from batchllm.core.work_units import build_submission
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.core.scheduler import Scheduler
from batchllm.inputs import PromptProcessor, TokenizedPrompt, load_tokenizer, resolve_max_model_len
from batchllm.models.default_model import default_model_dir
from batchllm.models.spec import read_model_spec
from batchllm.output_processor import CompletionState
from batchllm.prefix import MULTI_LEVEL, PrefixPlan, plan_prefix_sharing
from batchllm.request import Request
from batchllm.request_output import RequestOutput
from batchllm.parallel.tp_worker import build_rank_runner
from batchllm.sampling_params import SamplingParams

logger = logging.getLogger("batchllm")
logger.setLevel(default_log_level())  # handlers are the application's (the CLI adds one)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLM:
    """An offline LLM engine. Keyword arguments follow vLLM's `LLM` where they exist.

    model: a Hugging Face model directory; None for the embedded SmolLM2-135M-Instruct.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        tokenizer: str | Path | None = None,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        device: str = "auto",
        load_format: str = "auto",
        skip_tokenizer_init: bool = False,
        attention_backend: str = "auto",
        kernels: str = "auto",
        enforce_eager: bool = False,
        max_cudagraph_capture_size: int = 512,
        block_size: int = 16,
        kv_cache_memory_gib: float | None = None,
        gpu_memory_utilization: float = 0.90,
        num_kv_blocks: int | None = None,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int | None = None,
        enable_chunked_prefill: bool = True,
        kv_admission_threshold: float = 1.0,
        async_scheduling: bool | None = None,
        prefix_sharing: bool = True,
        plan_mode: str = MULTI_LEVEL,
        group_order: str = "decode",
        tensor_parallel_size: int = 1,
        data_parallel_size: int = 1,
    ) -> None:
        self.config = EngineConfig(
            model=ModelConfig(
                model=None if model is None else str(model),
                tokenizer=None if tokenizer is None else str(tokenizer),
                dtype=dtype,
                max_model_len=max_model_len,
                load_format=load_format,
                seed=seed,
                device=device,
                skip_tokenizer_init=skip_tokenizer_init,
                attention_backend=attention_backend,
                kernels=kernels,
                enforce_eager=enforce_eager,
                max_cudagraph_capture_size=max_cudagraph_capture_size,
            ),
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory_gib=kv_cache_memory_gib,
                gpu_memory_utilization=gpu_memory_utilization,
                num_kv_blocks=num_kv_blocks,
            ),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=max_num_batched_tokens,
                max_num_seqs=max_num_seqs,
                enable_chunked_prefill=enable_chunked_prefill,
                kv_admission_threshold=kv_admission_threshold,
                async_scheduling=async_scheduling,
            ),
            sharing=SharingConfig(prefix_sharing=prefix_sharing, plan_mode=plan_mode, group_order=group_order),
            parallel=ParallelConfig(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size),
        )
        self.sharing = self.config.sharing
        """How the next generate call shares prefixes; replace it (dataclasses.replace) to compare."""
        mc = self.config.model
        self.model_dir = Path(mc.model) if mc.model is not None else default_model_dir()
        self.model_spec = read_model_spec(self.model_dir)
        self.device = _resolve_device(mc.device)
        self.dtype = _resolve_dtype(mc.dtype, self.model_spec.checkpoint_dtype, self.device)
        self.max_model_len = resolve_max_model_len(mc.max_model_len, self.model_spec)
        sc = self.config.scheduler
        if not sc.enable_chunked_prefill and sc.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"with chunked prefill off, max_num_batched_tokens ({sc.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.max_model_len}), or no long prompt could ever run"
            )
        self.tokenizer = None if mc.skip_tokenizer_init else load_tokenizer(Path(mc.tokenizer or self.model_dir))
        self.eos_token_ids = _eos_token_ids(self.model_dir, self.model_spec, self.tokenizer)
        self.prompts = PromptProcessor(self.tokenizer, self.model_spec.vocab_size, self.max_model_len, str(self.model_dir))
        self._request_counter = itertools.count()
        self.last_stats: dict[str, Any] = {}
        self._data_parallel = None
        if self.config.parallel.data_parallel_size > 1:  # this process only plans, partitions and collects
            from batchllm.parallel.data_parallel import DataParallelEngine

            self.engine, self._tp_followers = None, None
            self._data_parallel = DataParallelEngine(self.config, self.model_dir, self.device, self.max_model_len)
            return

        graphs = self.device.type == "cuda" and not mc.enforce_eager
        max_graph_batch = min(mc.max_cudagraph_capture_size, sc.max_num_batched_tokens, sc.max_num_seqs or 2**31)
        build_args = (mc, self.config.cache, self.model_spec, self.model_dir, self.dtype, self.max_model_len,
                      max_graph_batch if graphs else None)
        tp_size = self.config.parallel.tensor_parallel_size
        tp, self._tp_followers = None, None
        if tp_size > 1:
            from batchllm.parallel.tensor_parallel import shard_spec
            from batchllm.parallel.tp_worker import start_followers

            shard_spec(self.model_spec, tp_size)  # a size that does not divide fails before any process starts
            tp, self._tp_followers = start_followers(tp_size, build_args, self.device)
        runner = build_rank_runner(*build_args, device=self.device, tp=tp)
        self.model, self.kv_spec, self.attention_backend = runner.model, runner.kv_spec, runner.backend
        kv = KVCacheManager(self.kv_spec.num_blocks, self.kv_spec.block_size)
        overlap = self.device.type == "cuda" if sc.async_scheduling is None else sc.async_scheduling
        self.engine = EngineCore(Scheduler(sc, kv, self.max_model_len), runner, async_scheduling=overlap)
        logger.info(
            "model %s (%s) on %s, %s, max_model_len %d, %d KV blocks of %d tokens",
            self.model_dir, self.model_spec.architecture, self.device, self.dtype,
            self.max_model_len, self.kv_spec.num_blocks, self.kv_spec.block_size,
        )

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """An engine from a whole EngineConfig (what data-parallel workers receive)."""
        kwargs = {f.name: getattr(getattr(config, part.name), f.name)
                  for part in dataclasses.fields(config) for f in dataclasses.fields(getattr(config, part.name))}
        return cls(kwargs.pop("model"), **kwargs)

    def shutdown(self) -> None:
        """Stop the data-parallel workers and tensor-parallel follower processes, if any (also at
        exit: they are daemons that die with this process)."""
        if getattr(self, "_data_parallel", None) is not None:
            self._data_parallel.shutdown()
            self._data_parallel = None
        if getattr(self, "_tp_followers", None) is not None:
            self._tp_followers.stop(self.engine.executor)
            self._tp_followers = None

    # ------------------------------------------------------------------ public API
    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; one RequestOutput per prompt, in input order.

        prompts: a string, a list of token ids, a {"prompt": ...} / {"prompt_token_ids": [...]} dict,
        or a list of any of these. Every prompt is validated before any work starts.
        """
        items = _as_prompt_list(prompts)
        tokenized = [self.tokenize_prompt(p, i) for i, p in enumerate(items)]
        params = self._params_list(sampling_params, len(tokenized))
        results: list[RequestOutput | None] = [None] * len(tokenized)
        for index, output in self.iter_generate(tokenized, params, use_tqdm=use_tqdm):
            results[index] = output
        return results  # type: ignore[return-value]

    def chat(
        self,
        messages: Any,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (a list of {"role", "content"}) or a
        list of conversations, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.apply_chat_template(conv, i, add_generation_prompt, chat_template_kwargs)
            for i, conv in enumerate(conversations)
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # ------------------------------------------------------------------ building blocks (CLI uses these)
    def apply_chat_template(self, conversation: Any, index: int = 0, add_generation_prompt: bool = True,
                            kwargs: dict | None = None) -> str:
        return self.prompts.apply_chat_template(conversation, index, add_generation_prompt, kwargs)

    def tokenize_prompt(self, prompt: Any, index: int = 0) -> TokenizedPrompt:
        return self.prompts.tokenize_prompt(prompt, index)

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return params

    def iter_generate(
        self,
        prompts: Sequence[TokenizedPrompt],
        params: Sequence[SamplingParams],
        *,
        use_tqdm: bool = True,
        progress_desc: str = "Processed prompts",
        refill: Callable[[], tuple[Sequence[TokenizedPrompt], Sequence[SamplingParams]] | None] | None = None,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Run validated prompts; yield (prompt index, RequestOutput) as each prompt completes.

        refill: called whenever every submitted unit has been admitted (nothing waits); it returns
        more prompts and params, numbered after those before, or None when there are no more (it is
        then not called again). Data-parallel workers pull shared work this way."""
        if self._data_parallel is not None:
            yield from self._data_parallel.generate(prompts, params, self.sharing, use_tqdm=use_tqdm,
                                                    progress_desc=progress_desc)
            self.last_stats = self._data_parallel.last_stats
            return
        run = _GenerationRun(self, next(self._request_counter))
        run.submit(prompts, params)
        stats_before = _snapshot(self.engine)
        started = time.perf_counter()
        bar = tqdm(total=len(prompts), desc=progress_desc, unit="req", disable=not use_tqdm, dynamic_ncols=True)
        with _quiet_gc():
            try:
                while True:
                    if refill is not None and not self.engine.scheduler.waiting:
                        more = refill()
                        if more is None:
                            refill = None
                        else:
                            run.submit(*more)
                            bar.total += len(more[0])
                    if not self.engine.has_unfinished():
                        break
                    for finished in run.record(self.engine.step()):
                        bar.update(1)
                        yield finished
                    if use_tqdm:
                        elapsed = time.perf_counter() - started
                        bar.set_postfix_str(f"out {run.output_tokens / max(elapsed, 1e-9):.0f} tok/s", refresh=False)
            finally:
                bar.close()
                run.abort_unfinished()
                self.last_stats = run.stats(stats_before, time.perf_counter() - started)


class _GenerationRun:
    """One `iter_generate` call: its requests, their completion states, and its plan statistics.
    Writer of the completion states; the scheduler owns the requests once submitted."""

    def __init__(self, llm: LLM, call_id: int) -> None:
        self.llm, self.engine, self.call_id = llm, llm.engine, call_id
        self.states: dict[str, tuple[int, CompletionState]] = {}
        self.pending: dict[int, list[CompletionState]] = {}
        self.prompts: list[TokenizedPrompt] = []
        self.num_requests = self.prompt_tokens = self.output_tokens = 0
        self.plan_seconds = 0.0
        self.plan_summaries: list[dict] = []

    def submit(self, prompts: Sequence[TokenizedPrompt], params: Sequence[SamplingParams]) -> None:
        """Plan these prompts' sharing among themselves and hand them to the engine."""
        first = len(self.prompts)
        self.prompts.extend(prompts)
        requests: list[Request] = []
        for index, (prompt, sp) in enumerate(zip(prompts, params), start=first):
            children = []
            for k in range(sp.n):
                child_params = sp if sp.n == 1 else sp.for_child(k)
                request = Request(request_id=f"{self.call_id}-{index}-{k}", prompt_token_ids=prompt.token_ids,
                                  sampling_params=child_params, eos_token_ids=self.llm.eos_token_ids,
                                  arrival_index=index)
                requests.append(request)
                state = CompletionState(k, child_params, self.llm.tokenizer)
                self.states[request.request_id] = (index, state)
                children.append(state)
            self.pending[index] = children
        started = time.perf_counter()
        prompt_ids = [r.prompt_token_ids for r in requests]
        sharing = self.llm.sharing
        if sharing.prefix_sharing:
            plan = plan_prefix_sharing(prompt_ids, mode=sharing.plan_mode)
        else:
            plan = PrefixPlan.without_sharing([len(p) for p in prompt_ids], sharing.plan_mode)
        max_len = self.llm.max_model_len
        submission = build_submission(plan, requests, GROUP_ORDERS[sharing.group_order](),
                                      lambda r: expected_output_tokens(r, max_len),
                                      id_prefix=f"{self.call_id}-{len(self.plan_summaries)}-")
        self.plan_seconds += time.perf_counter() - started
        self.plan_summaries.append(plan.summary())
        self.num_requests += len(requests)
        self.prompt_tokens += plan.prompt_tokens
        for request in submission:
            self.engine.add_request(request)

    def record(self, updates) -> Iterator[tuple[int, RequestOutput]]:
        """Apply one step's token updates; yield each prompt whose completions all finished."""
        self.output_tokens += len(updates)
        for update in updates:
            index, state = self.states[update.request_id]
            matched = state.append(update.new_token_id, update.logprobs)
            if matched is not None:
                if update.finish_reason is None:
                    self.engine.finish_requests([update.request_id], "stop", matched)
                state.finish("stop", matched)
            elif update.finish_reason is not None:
                state.finish(update.finish_reason, update.stop_reason)
            else:
                continue
            del self.states[update.request_id]
            children = self.pending[index]
            if all(c.finish_reason is not None for c in children):
                del self.pending[index]
                prompt = self.prompts[index]
                yield index, RequestOutput(request_id=f"{self.call_id}-{index}", prompt=prompt.text,
                                           prompt_token_ids=prompt.token_ids,
                                           outputs=[c.to_output() for c in children])

    def abort_unfinished(self) -> None:
        """The caller stopped early or a step failed: leave the engine clean for the next call."""
        if self.states:
            self.engine.finish_requests(list(self.states), "abort")
            _drain_quietly(self.engine)

    def stats(self, before: tuple, wall_s: float) -> dict[str, Any]:
        stats = _stats_since(self.engine, before, wall_s, num_requests=self.num_requests,
                             prompt_tokens=self.prompt_tokens, output_tokens=self.output_tokens)
        summaries = self.plan_summaries
        sharing = self.llm.sharing
        stats.update(
            prefix_sharing=sharing.prefix_sharing, plan_mode=sharing.plan_mode, group_order=sharing.group_order,
            num_groups=sum(s["num_groups"] for s in summaries),
            mean_sharing_degree=self.num_requests / max(1, sum(s["num_groups"] + s["num_ungrouped"] for s in summaries)),
            max_sharing_degree=max((s["max_sharing_degree"] for s in summaries), default=0),
            planned_prefill_tokens=sum(s["prefill_tokens"] for s in summaries),
            plan_seconds=self.plan_seconds,
        )
        return stats


# ---------------------------------------------------------------------- helpers
def _drain_quietly(engine: EngineCore) -> None:
    """Collect (and drop) the step still in flight after the loop stopped early; a failure there
    is logged, not raised over the error that stopped the loop."""
    try:
        engine.drain()
    except Exception:  # noqa: BLE001 - the step's outputs are discarded anyway
        logger.exception("the step in flight failed while the batch was being stopped")


@contextlib.contextmanager
def _quiet_gc(young_threshold: int = 50_000):
    """Python's cyclic GC during the engine loop: each step allocates thousands of short-lived
    objects, which trigger collections that walk the large heap of live requests again and again
    (a third of the CPU time of a 6,400-request batch, `benchmarks/step_overhead.py`). Everything
    alive when the loop starts is frozen (never walked) and young collections run less often; the
    settings are restored afterwards. Acyclic garbage is still freed at once by reference counts."""
    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], young_threshold), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


def _as_prompt_list(prompts: Any) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


def _resolve_device(device: str) -> torch.device:
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


def _eos_token_ids(model_dir: Path, spec, tokenizer) -> frozenset[int]:
    ids = set(spec.config_eos_token_ids)
    generation_config = model_dir / "generation_config.json"
    if generation_config.is_file():
        try:
            eos = json.loads(generation_config.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            eos = None
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _snapshot(engine: EngineCore) -> tuple:
    s = engine.scheduler.stats
    return (s.num_steps, s.prefill_tokens, s.decode_tokens, s.num_preemptions, len(engine.step_log),
            s.num_block_copies, s.num_prefix_releases)


def _stats_since(engine: EngineCore, before: tuple, wall_s: float, **counts: int) -> dict[str, Any]:
    s = engine.scheduler.stats
    steps = s.num_steps - before[0]
    step_records = engine.step_log[before[4]:]
    scheduled = sum(r.num_tokens for r in step_records)
    prefill = s.prefill_tokens - before[1]
    return {
        **counts,
        "prefill_tokens_computed": prefill,
        "saving_ratio": 1.0 - prefill / counts["prompt_tokens"] if counts["prompt_tokens"] else 0.0,
        "decode_tokens": s.decode_tokens - before[2],
        "num_preemptions": s.num_preemptions - before[3],
        "num_block_copies": s.num_block_copies - before[5],
        "num_prefix_releases": s.num_prefix_releases - before[6],
        "num_steps": steps,
        "mean_tokens_per_step": scheduled / steps if steps else 0.0,
        "wall_s": wall_s,
        "output_tokens_per_s": counts["output_tokens"] / wall_s if wall_s > 0 else 0.0,
    }
