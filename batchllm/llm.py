"""The facade: `LLM(...)` builds an engine from its options (`engine.build_engine`); `generate` /
`chat` tokenize, submit, run the engine loop, detokenize and return one `RequestOutput` per prompt in
input order (vLLM's API).

Writer of the per-completion output state (`CompletionState`; its token ids are its request's output list,
which the scheduler writes); the scheduler owns request state.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchllm.beam_search import BeamSearchOutput, run_beam_search
from batchllm.config import EngineConfig, default_log_level
from batchllm.core.engine_core import EngineCore
from batchllm.core.policies import GROUP_ORDERS, expected_output_tokens, kv_tokens_written, output_budget
from batchllm.core.step_updates import SchedulerStats
from batchllm.core.work_units import build_submission
from batchllm.engine import Engine, ModelFacts, build_engine, release_device_memory, resolve_model
from batchllm.generation_defaults import model_sampling_defaults, request_ending_eos_ids
from batchllm.inputs import (
    ModelSource,
    PromptProcessor,
    TokenizedPrompt,
    not_a_conversation,
    read_chat_template,
    read_model_source,
    tokenizer_for,
)
from batchllm.llm_engine import LLMEngine, running_model_config
from batchllm.models.spec import ModelSpec
from batchllm.options import engine_config
from batchllm.output_processor import CompletionState, prompt_logprobs_output
from batchllm.prefix import PrefixPlan, plan_prefix_sharing
from batchllm.progress import TokenProgress
from batchllm.request import Request
from batchllm.request_output import RequestOutput
from batchllm.sampling_params import TRUNCATION_SIDE_NOTE, TRUNCATION_SIDES, BeamSearchParams, SamplingParams
from batchllm.structured import GrammarState

logger = logging.getLogger("batchllm")
logger.setLevel(default_log_level())  # handlers are the application's (the CLI adds one)


class LLM:
    """An offline LLM engine. Keyword arguments follow vLLM's `LLM` where they exist.

    model: a Hugging Face model directory, or a model id (`"Qwen/Qwen2.5-0.5B-Instruct"`) already in
    the local Hugging Face cache (nothing is downloaded); None for the embedded SmolLM2-135M-Instruct.
    Every other keyword is an engine option, declared once in `config.py` (`batchllm run --help`
    lists them with their defaults); vLLM's `enable_prefix_caching` means `prefix_sharing`, and an
    unknown keyword is a TypeError naming it.
    """

    def __init__(self, model: str | Path | None = None, **kwargs: Any) -> None:
        self._init_from_config(engine_config(model=model, **kwargs))

    @classmethod
    def from_engine_args(cls, engine_args: Any) -> LLM:
        """vLLM's: an LLM from a `batchllm.EngineArgs` (`engine_args.py`)."""
        return cls(**dataclasses.asdict(engine_args))

    @classmethod
    def from_config(cls, config: EngineConfig, front: FrontEnd | None = None, workers=None,
                    facts: ModelFacts | None = None) -> LLM:
        """An engine from a whole EngineConfig (what data-parallel workers receive). What the caller
        has made already for this config, so that nothing is read or checked twice (`batchllm run`
        makes all three, to read its input while the engine loads): `front`, its
        `front_end_for(config)`; `workers`, with more than one engine process, the
        `DataParallelEngine` started for it; `facts`, its `resolve_model(config, source=front.source)`."""
        llm = cls.__new__(cls)
        llm._init_from_config(config, front, workers, facts)
        return llm

    def _init_from_config(self, config: EngineConfig, front: FrontEnd | None = None, workers=None,
                          facts: ModelFacts | None = None) -> None:
        front = front_end_for(config) if front is None else front
        # what can be checked without weights (device, step budget, sharding, GPU count) fails here,
        # in this process, before any weights load or any worker builds
        facts = resolve_model(config, source=front.source) if facts is None else facts
        self.config = config
        self.model_dir, self.model_spec, self.max_model_len = front.model_dir, front.model_spec, front.max_model_len
        self.tokenizer, self.eos_token_ids, self.prompts = front.tokenizer, front.eos_token_ids, front.prompts
        self._model_eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        # read here, so that a bad generation_config fails the build, not the first call without SamplingParams
        from_model = model_sampling_defaults(front.model_dir, config.model.generation_config)
        self._default_params = SamplingParams(**from_model)
        self._model_defaults_unsaid = dict(from_model)
        """The sampling defaults the model's generation_config.json gave, until `_note_model_defaults` said them."""
        self._said_block_aligned = False
        """Whether `_note_block_aligned` warned already (once per LLM)."""
        self.engine: Engine | None = None
        """The built engine: `engine.core` runs the steps, `engine.runner` the model (None when
        more than one engine process (data_parallel_size x engines_per_gpu > 1): this process then
        plans and collects, the workers run engines)."""
        self._data_parallel = None
        self._shut_down = False
        self._running_call: _RunningCall | None = None
        """The call running or suspended (`_take_over`), guarded by `_call_lock`."""
        self._call_lock = threading.RLock()  # (re-entrant: a suspended call the collector ends releases itself)
        if config.parallel.num_engines > 1:
            from batchllm.parallel.data_parallel import DataParallelEngine

            if workers is None:
                workers = DataParallelEngine(config, front.model_dir, front.max_model_len)
            elif workers.size != config.parallel.num_engines:
                raise ValueError(f"{workers.size} workers were started for a config of {config.parallel.num_engines} "
                                 "engine processes")
            self._data_parallel = workers
            workers.wait_ready()
        else:
            self.engine = build_engine(config, facts=facts)
        self._stop_processes = self._finalizer_for_processes()  # (at once: what fails after it stops them too)
        if self.engine is not None:
            self.engine.runner.structured = self.prompts.grammars
        self.model_config = running_model_config(
            config, front.model_dir, front.model_spec, front.max_model_len, facts.dtype,
            None if facts.quantization is None else facts.quantization.method)
        """vLLM's `llm.model_config`: the model as the engine runs it (`llm_engine.RunningModelConfig`)."""
        self.llm_engine = LLMEngine(self, self.model_config)
        """vLLM's `llm.llm_engine` as scripts read it (`llm_engine.LLMEngine`); the engine itself is `engine`."""
        self._request_counter = itertools.count()
        self._queued: list[tuple[str, TokenizedPrompt, SamplingParams]] = []
        """What `enqueue` queued for the next `wait_for_completion`: (request id, prompt, params)."""
        self._output_counter = itertools.count()
        """`generate`'s RequestOutput.request_id: "0", "1", ... over the LLM's life, in input order, as vLLM's."""
        self.last_stats: dict[str, Any] = {}
        self._reset_pending = False
        """`reset_prefix_cache` was asked while a suspended call's requests were in the engine: the cache is cleared
        as the next call starts (what they record as they finish was computed before the reset)."""

    def _finalizer_for_processes(self) -> weakref.finalize | None:
        """The engine processes this LLM started (data-parallel workers, tensor-parallel followers) are stopped when
        it is collected, as vLLM's are (`del llm; gc.collect()` frees their devices); at the interpreter's exit
        they stop as daemons do. None where it started none."""
        if self._data_parallel is not None:
            stop = self._data_parallel.shutdown
        elif self.engine is not None and self.engine.tp_followers is not None:
            stop = self.engine.shutdown
        else:
            return None
        finalizer = weakref.finalize(self, stop)
        finalizer.atexit = False
        return finalizer

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """vLLM's, called between timed runs: forget the KV that finished sequences left for later calls to find
        (`core/prefix_cache.py`; every engine process's); True. Prefixes the running call shares stay until their
        last member finishes, as the plan has them. Asked while a call is suspended (`iter_generate`), the cache is
        cleared as the next call starts, so that none of the KV the suspended call's requests record as they finish
        (computed before the reset, with the weights of then) is found later; as the data-parallel engine does.
        reset_running_requests: vLLM's (it recomputes the running requests); here they finish on the KV they hold."""
        if self._data_parallel is not None:
            self._data_parallel.reset_prefix_cache()
        elif self.engine is not None and self.engine.core.scheduler.kv.cache is not None:
            self.engine.core.scheduler.kv.cache.clear()
            self._reset_pending = self.engine.core.has_unfinished()
        return True

    def shutdown(self) -> None:
        """Stop the data-parallel workers and tensor-parallel followers, if any (they are daemons
        that also die with this process), drop the engine and hand its device memory (weights, KV
        cache, CUDA graphs) back, so that another LLM can be built in this process. The LLM cannot
        generate after this; an `iter_generate` left suspended is dropped first (its requests aborted): resumed, it
        says the LLM was shut down (it went on over the dropped engine, then failed with an AttributeError)."""
        self._shut_down = True
        self._queued = []
        with self._call_lock:
            suspended = self._running_call
            if suspended is not None and not suspended.executing:
                suspended.dropped = True
        if suspended is not None and suspended.dropped and suspended.drop is not None and self.engine is not None:
            suspended.drop()
        if getattr(self, "_stop_processes", None) is not None:  # (None: an LLM whose building failed)
            self._stop_processes.detach()
        if self._data_parallel is not None:
            self._data_parallel.shutdown()
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
            release_device_memory()

    # ------------------------------------------------------------------ public API
    def get_tokenizer(self):
        return self.tokenizer

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        """vLLM 0.26's: level 0 pauses scheduling, which its scripts do around `enqueue` so that everything is queued
        before anything runs: here nothing runs before `wait_for_completion` anyway, so level 0 does nothing.
        Levels 1 and 2 (freeing the weights and the KV cache) are not offered: `shutdown()` frees them."""
        if level != 0:
            raise ValueError(f"LLM.sleep(level={level!r}) is not offered: shutdown() frees the device memory (weights, "
                             "KV cache, CUDA graphs); build a new LLM to go on. level 0 (a pause before "
                             "wait_for_completion) is taken")

    def wake_up(self, tags: list[str] | None = None) -> None:
        """vLLM 0.26's: the end of `sleep(level=0)`'s pause (nothing to do here)."""

    def apply_model(self, func: Callable[[Any], Any]) -> list[Any]:
        """vLLM's: [func(model)], the engine's torch module (`models.decoder.DecoderForCausalLM`: its own layer
        names, not transformers'). Only where the model lives in this process: not with data or tensor
        parallelism, whose workers hold it (or shards of it). KV kept from earlier calls stays: after changing the
        weights, call `reset_prefix_cache()` (as vLLM's weight-update examples do)."""
        if self._shut_down:
            raise RuntimeError("this LLM was shut down (LLM.shutdown); build a new one to reach its model")
        if self.engine is None or self.config.parallel.tensor_parallel_size > 1:
            raise ValueError("apply_model needs the model in this process: with data_parallel_size, engines_per_gpu "
                             "or tensor_parallel_size above 1 it lives in worker processes")
        return [func(self.engine.model)]

    def __getattr__(self, name: str) -> Any:
        """vLLM `LLM` methods not offered here are named with what to do instead (an AttributeError, so
        hasattr stays False)."""
        if name in _METHODS_NOT_OFFERED:
            raise AttributeError(f"LLM.{name} is not offered: {_METHODS_NOT_OFFERED[name]}")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def get_world_size(self, include_dp: bool = True) -> int:
        """vLLM's: the GPUs (CPU: processes) the model runs on, tensor parallel x data parallel (without
        `include_dp`, one engine's)."""
        parallel = self.config.parallel
        return parallel.tensor_parallel_size * (parallel.data_parallel_size if include_dp else 1)

    def _pooling_task(self, name: str) -> None:
        raise ValueError(f"LLM.{name} is not supported: this engine runs text generation only (vLLM's pooling "
                         "tasks, embeddings, classification and scores, need vLLM's pooling runner)")

    def encode(self, *args: Any, **kwargs: Any) -> None:
        """vLLM's pooling task: refused by name (`_pooling_task`), as are embed, classify, score and reward."""
        self._pooling_task("encode")

    def embed(self, *args: Any, **kwargs: Any) -> None:
        self._pooling_task("embed")

    def classify(self, *args: Any, **kwargs: Any) -> None:
        self._pooling_task("classify")

    def score(self, *args: Any, **kwargs: Any) -> None:
        self._pooling_task("score")

    def reward(self, *args: Any, **kwargs: Any) -> None:
        self._pooling_task("reward")

    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool | Callable[..., Any] = True, lora_request: None = None,
                 priority: Sequence[int] | None = None, tokenization_kwargs: dict | None = None,
                 mm_processor_kwargs: dict | None = None) -> list[RequestOutput]:
        """Generate for every prompt; one RequestOutput per prompt, in input order.

        prompts: a string, a list of token ids, a {"prompt": ...} / {"prompt_token_ids": [...]} dict,
        or a list of any of these. Every prompt is validated before any work starts. tokenization_kwargs:
        vLLM's; its truncate_prompt_tokens keeps each prompt's last k tokens, as SamplingParams.truncate_prompt_tokens
        (which it overrides) does, and add_special_tokens tokenizes text prompts with or without special tokens
        (`_tokenization_asked`). lora_request, priority: vLLM's, taken only where they ask for nothing
        (`_refuse_unsupported`; a priority list must have one entry per prompt); so is mm_processor_kwargs (None or {}:
        the prompts are text).
        """
        tokenized, params = self._validate_call(prompts, sampling_params, lora_request, priority, tokenization_kwargs,
                                                mm_processor_kwargs)
        results: list[RequestOutput | None] = [None] * len(tokenized)
        for index, output in self.iter_generate(tokenized, params, use_tqdm=use_tqdm, _held=True):
            results[index] = output
        for output in results:  # (numbered once the call ended: a failed call uses no numbers, as none came out)
            output.request_id = str(next(self._output_counter))
        return results  # type: ignore[return-value]

    def beam_search(self, prompts: Any, params: BeamSearchParams, lora_request: None = None, use_tqdm: bool = False,
                    concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's beam search (`batchllm/beam_search.py`): per prompt, the params.beam_width best sequences,
        best first, each with its tokens (the prompt's included), logprobs, cumulative logprob and text (the
        whole sequence decoded). prompts: as `generate` takes them; each is checked before the search starts, a
        prompt whose max_tokens the KV cache cannot hold refused as `generate` refuses it. use_tqdm: vLLM's, a bar of
        the steps (`run_beam_search`), none where concurrency_limit is given, as in vLLM. concurrency_limit: vLLM's
        (a positive integer); every prompt's beams go into each step's call. params.structured_outputs: every beam
        kept to the grammar, compiled (or refused) before the first step."""
        _refuse_unsupported(lora_request=lora_request)
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params must be a BeamSearchParams, got {type(params).__name__}")
        if concurrency_limit is not None and (type(concurrency_limit) is not int or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be a positive integer or None, got {concurrency_limit!r}")
        whole = SamplingParams(max_tokens=max(params.max_tokens, 1),  # (what the longest beam of a prompt writes)
                               structured_outputs=params.structured_outputs)  # (its grammar compiled, or refused)
        tokenized, _ = self._validate(prompts, whole)
        if use_tqdm and concurrency_limit is not None:
            logger.warning("a progress bar is not shown with concurrency_limit (as in vLLM)")
            use_tqdm = False
        return run_beam_search(self, [[int(t) for t in prompt.token_ids] for prompt in tokenized], params,
                               [prompt.text for prompt in tokenized], use_tqdm)

    def _validate_call(self, prompts: Any, sampling_params, lora_request, priority, tokenization_kwargs,
                       mm_processor_kwargs) -> tuple[list[TokenizedPrompt], list[SamplingParams]]:
        """`generate`'s and `enqueue`'s arguments checked (vLLM's that ask for what is not supported refused by name:
        `_refuse_unsupported`) and their prompts validated (`_validate`, truncated as tokenization_kwargs asks)."""
        items = _as_prompt_list(prompts)
        _check_per_prompt_lengths(len(items), priority=priority, lora_request=lora_request)
        asks_priority = priority is not None and any(int(p) != 0 for p in priority)
        _refuse_unsupported(lora_request=lora_request, priority=priority if asks_priority else None,
                            mm_processor_kwargs=mm_processor_kwargs or None)
        return self._validate(items, sampling_params, *_tokenization_asked(tokenization_kwargs))

    def _validate(self, prompts: Any, sampling_params, truncate: int | None = None,
                  add_special_tokens: bool | None = None) -> tuple[list[TokenizedPrompt], list[SamplingParams]]:
        """`generate`'s input path up to submission: every prompt tokenized and validated (keeping its last
        `truncate` tokens where given, else its SamplingParams.truncate_prompt_tokens; a text's special tokens as
        `add_special_tokens` asks, where given), one SamplingParams per prompt checked against the model; raises the
        first bad prompt's ValueError."""
        items = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(items))
        with _quiet_gc():  # millions of new lists and arrays would trigger collections that walk the input
            tokenized = [self.prompts.tokenize_prompt(p, i, self.prompts.truncation_for(
                sp.truncate_prompt_tokens if truncate is None else truncate, sp.max_tokens), add_special_tokens)
                for i, (p, sp) in enumerate(zip(items, params))]
        for sp in {id(sp): sp for sp in params}.values():
            sp.check_for_model(self.model_spec.vocab_size, self.tokenizer, self.prompts.grammars,
                               self.prompts.max_logprobs, self.eos_token_ids)
        for index, (prompt, sp) in enumerate(zip(tokenized, params)):
            if problem := self.kv_cache_problem(len(prompt.token_ids), sp):
                raise ValueError(f"prompt {index}: {problem}")
        return tokenized, params

    def chat(self, messages: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | Callable[..., Any] = True, lora_request: None = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None, tokenization_kwargs: dict | None = None,
             mm_processor_kwargs: None = None) -> list[RequestOutput]:
        """Apply the model's chat template (or `chat_template`, a Jinja template or a file holding one, as
        vLLM's) to one conversation (a list of {"role", "content"}) or a list of conversations, then generate.
        continue_final_message (vLLM's): the last message, an assistant's, is continued rather than closed
        (with add_generation_prompt=False). tools: given to the template, as vLLM does (the answer is text:
        no tool call is parsed from it). chat_template_content_format: vLLM's "string" (message content reaches
        the template as a string), "openai" (as a list of text parts) or "auto" (parts where the template loops over
        a message's content). tokenization_kwargs: as `generate` takes it. mm_processor_kwargs, lora_request:
        vLLM's, None only (not supported). The arguments may be given by position, in vLLM's order."""
        prompts = self._render_chats(messages, lora_request, chat_template, chat_template_content_format,
                                     add_generation_prompt, continue_final_message, tools, chat_template_kwargs,
                                     mm_processor_kwargs)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm, tokenization_kwargs=tokenization_kwargs)

    def enqueue(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                lora_request: None = None, priority: Sequence[int] | None = None,
                use_tqdm: bool | Callable[..., Any] = True, tokenization_kwargs: dict | None = None,
                mm_processor_kwargs: dict | None = None) -> list[str]:
        """vLLM 0.26's: queue prompts (taken and checked as `generate` takes them: a bad one raises here and
        queues none of them) to run at the next `wait_for_completion`, which plans everything queued as one
        batch. Returns their request ids, numbered as `generate`'s outputs are. use_tqdm: vLLM's, no bar here
        (nothing runs)."""
        if self._shut_down:
            raise RuntimeError("this LLM was shut down (LLM.shutdown); build a new one to generate again")
        tokenized, params = self._validate_call(prompts, sampling_params, lora_request, priority, tokenization_kwargs,
                                                mm_processor_kwargs)
        ids = [str(next(self._output_counter)) for _ in tokenized]
        self._queued.extend(zip(ids, tokenized, params))
        return ids

    def enqueue_chat(self, messages: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                     use_tqdm: bool | Callable[..., Any] = True, lora_request: None = None,
                     priority: Sequence[int] | None = None, chat_template: str | None = None,
                     chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
                     continue_final_message: bool = False, tools: list[dict] | None = None,
                     chat_template_kwargs: dict | None = None, tokenization_kwargs: dict | None = None,
                     mm_processor_kwargs: None = None) -> list[str]:
        """vLLM 0.26's: `chat`'s conversations rendered and queued as `enqueue` queues prompts."""
        prompts = self._render_chats(messages, lora_request, chat_template, chat_template_content_format,
                                     add_generation_prompt, continue_final_message, tools, chat_template_kwargs,
                                     mm_processor_kwargs)
        return self.enqueue(prompts, sampling_params, priority=priority, tokenization_kwargs=tokenization_kwargs)

    def wait_for_completion(self, output_type: Any = None, *,
                            use_tqdm: bool | Callable[..., Any] = True) -> list[RequestOutput]:
        """vLLM 0.26's: run every queued prompt (`enqueue`, `enqueue_chat`) as one batch, its prefixes planned
        over all of them, and return their RequestOutputs in request-id order. The queue is emptied once its
        requests reach the engine: after a failure there, or an interrupt, nothing stays queued; one before (a
        progress bar that cannot be made, an interrupt while they are submitted) leaves them queued. output_type:
        vLLM's check of the outputs' type (they are RequestOutputs)."""
        if output_type is not None and not issubclass(RequestOutput, output_type):
            raise TypeError(f"the outputs are RequestOutputs, not {output_type!r} (pooling tasks are not supported)")
        if self._shut_down:
            raise RuntimeError("this LLM was shut down (LLM.shutdown); build a new one to generate again")
        queued, self._queued = self._queued, []
        if not queued:
            return []
        results: list[RequestOutput | None] = [None] * len(queued)
        reached_engine = threading.Event()
        try:
            for index, output in self.iter_generate([p for _, p, _ in queued], [sp for _, _, sp in queued],
                                                    use_tqdm=use_tqdm, on_reaching_engine=reached_engine.set,
                                                    _held=True):
                output.request_id = queued[index][0]
                results[index] = output
        except BaseException:
            if not reached_engine.is_set():
                self._queued[:0] = queued
            raise
        return results  # type: ignore[return-value]  (ids were drawn in queue order)

    def _render_chats(self, messages: Any, lora_request, chat_template: str | None, content_format: str,
                      add_generation_prompt: bool, continue_final_message: bool, tools: list[dict] | None,
                      chat_template_kwargs: dict | None, mm_processor_kwargs) -> list[str]:
        """`chat`'s conversations rendered by the chat template, checked as vLLM checks `chat`'s arguments. The
        explicit add_generation_prompt, continue_final_message and tools (where not None) win over the same keys
        of chat_template_kwargs, as vLLM merges them (`merge_kwargs(chat_template_kwargs, explicit)`); so does
        chat_template, and without it the kwargs' chat_template is the template (as vLLM's
        `get_apply_chat_template_kwargs`: it was refused)."""
        _refuse_unsupported(lora_request=lora_request, mm_processor_kwargs=mm_processor_kwargs or None,
                            chat_template_content_format=None if content_format in CONTENT_FORMATS
                            else content_format)
        explicit = {"add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
                    "tools": tools}
        chat_template_kwargs = {**(chat_template_kwargs or {}),
                                **{key: value for key, value in explicit.items() if value is not None}}
        if (kwargs_template := chat_template_kwargs.pop("chat_template", None)) is not None and chat_template is None:
            chat_template = kwargs_template
        if isinstance(messages, (str, bytes, dict)):  # (iterated, a text's characters became conversations)
            raise ValueError(f"chat takes a conversation or a list of conversations: {not_a_conversation(messages)}")
        if not isinstance(messages, (list, tuple)):  # a generator: of conversations, or of one's messages
            messages = list(messages)
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        named = getattr(self.prompts.tokenizer, "chat_template", None)
        if chat_template is None or (isinstance(named, dict) and chat_template in named):
            template = chat_template  # (a name of the tokenizer's own templates, "tool_use": as vLLM resolves it)
        else:
            template = read_chat_template(chat_template)
        return [self.prompts.apply_chat_template(conv, i, add_generation_prompt, chat_template_kwargs, template,
                                                 content_format)
                for i, conv in enumerate(conversations)]

    # ------------------------------------------------------------------ building blocks (CLI uses these)
    def apply_chat_template(self, conversation: Any, index: int = 0, add_generation_prompt: bool = True,
                            kwargs: dict | None = None, chat_template: str | None = None) -> str:
        return self.prompts.apply_chat_template(conversation, index, add_generation_prompt, kwargs, chat_template)

    def tokenize_prompt(self, prompt: Any, index: int = 0, truncate: int | None = None) -> TokenizedPrompt:
        return self.prompts.tokenize_prompt(prompt, index, truncate)

    @functools.cached_property  # (asked once per prompt; the caches never change size)
    def kv_cache_tokens(self) -> int | None:
        """Tokens the KV cache holds (with data parallelism, the smallest engine's; None where a worker
        did not report it)."""
        if self._data_parallel is not None:
            sizes = [t.get("kv_tokens") for t in self._data_parallel.start_times.values()]
            return None if not sizes or None in sizes else min(sizes)
        return None if self.engine is None else self.engine.kv_spec.num_tokens

    def kv_cache_problem(self, num_prompt_tokens: int, params: SamplingParams) -> str | None:
        """Why a completion of this prompt could not fit the KV cache even alone (its prompt and max_tokens,
        at most the context, write more tokens than the cache holds: all but the last output token,
        `kv_tokens_written`, as `Scheduler.kv_blocks_needed` counts them), or None. Such a request would stop
        the engine; vLLM refuses to start where the cache cannot hold max_model_len tokens, here only the
        prompts that need more fail (`generate` raises naming the prompt, `run` fails the line). Without
        max_tokens a request runs to the context or to what the cache holds (`Scheduler._max_total_tokens`),
        so only a prompt the cache cannot hold (with one output token, which it does not write) is a problem."""
        capacity = self.kv_cache_tokens
        outputs = 1 if params.max_tokens is None else output_budget(num_prompt_tokens, params.max_tokens, 0,
                                                                    self.max_model_len)
        needed = kv_tokens_written(num_prompt_tokens + max(outputs, 1))
        if capacity is None or needed <= capacity:
            return None
        return (f"the prompt ({num_prompt_tokens} tokens) and its completion may need {needed} tokens of KV cache, "
                f"but the cache holds {capacity}; {self.kv_cache_advice()}"
                + (" or lower max_tokens" if params.max_tokens is not None else ""))

    def kv_cache_advice(self) -> str:
        """How to give the KV cache more tokens: num_kv_blocks, where set, fixes its size over the memory
        settings (raising those would change nothing), else the memory settings."""
        blocks = self.config.cache.num_kv_blocks
        if blocks is not None:
            return (f"raise num_kv_blocks (--num-kv-blocks, now {blocks}), which fixes the cache's size over "
                    "--kv-cache-memory-gib and --gpu-memory-utilization")
        return "give the cache more memory (--kv-cache-memory-gib, --gpu-memory-utilization)"

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call without SamplingParams samples with, as in vLLM: the sampling fields the model's
        generation_config.json sets (`generation_defaults`), over SamplingParams()'s defaults. A new
        object each call (as vLLM's), so that a caller may change its fields without changing the LLM's."""
        self._note_model_defaults()
        return self._default_params.clone()

    def _note_model_defaults(self) -> None:
        """Warn, the first time the defaults are taken, which of them the model's generation_config.json set (a
        call without SamplingParams then samples with them, not SamplingParams()'s), as vLLM warns."""
        if not self._model_defaults_unsaid:
            return
        source = self.config.model.generation_config
        logger.warning("default sampling parameters are taken from %s: %s (generation_config='vllm' takes none)",
                       "the model's generation_config.json" if source == "auto"
                       else f"{source}/generation_config.json", self._model_defaults_unsaid)
        self._model_defaults_unsaid = {}

    def _params_list(self, sampling_params, n: int) -> list[SamplingParams]:
        """One SamplingParams per prompt, each a fresh copy of the one given (`SamplingParams.as_given`, made
        once per object): fields set after construction take effect and are checked, as vLLM reads them at
        submission, and the caller's objects are never changed by the engine's checks."""
        if sampling_params is None:
            self._note_model_defaults()
            return [self._default_params.as_given()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params.as_given()] * n
        iterable = isinstance(sampling_params, Iterable) and not isinstance(sampling_params, (str, dict))
        params = list(sampling_params) if iterable else [sampling_params]
        if bad := [sp for sp in params if not isinstance(sp, SamplingParams)][:1]:  # (None among them too)
            shown = ("a list holding " if iterable else "") + type(bad[0]).__name__
            raise TypeError("sampling_params must be a SamplingParams or a list of them (one per prompt), got "
                            + shown + (" (build one: SamplingParams(**fields))" if isinstance(bad[0], dict) else ""))
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        copies: dict[int, SamplingParams] = {}
        for sp in params:
            if id(sp) not in copies:
                copies[id(sp)] = sp.as_given()
        return [copies[id(sp)] for sp in params]

    def iter_generate(
        self, prompts: Sequence[TokenizedPrompt], params: Sequence[SamplingParams], *,
        use_tqdm: bool | Callable[..., Any] = True,
        progress_desc: str = "Processed prompts",
        refill: Callable[[], tuple[Sequence[TokenizedPrompt], Sequence[SamplingParams]] | None] | None = None,
        stop_asked: Callable[[], bool] | None = None,
        on_reaching_engine: Callable[[], None] | None = None,
        _held: bool = False,
    ) -> Iterator[tuple[int, RequestOutput]]:
        """Run validated prompts; yield (prompt index, RequestOutput) as each prompt completes.
        Afterwards (also when the caller stops early) `last_stats` holds the call's statistics.

        refill: called whenever every submitted unit has been admitted (nothing waits); it returns
        more prompts and params, numbered after those before, or None when there are no more (it is
        then not called again). Data-parallel workers pull shared work this way. stop_asked: called
        before every step; True ends the call there, what still runs aborted (a data-parallel worker's job
        that its parent dropped). on_reaching_engine: called once the call's requests are in the engine (a failure
        before left nothing run: `wait_for_completion` then keeps its queue).

        One call runs at a time (`_take_over`): a call while another executes is refused, and one while another is
        suspended (at a yield: its caller has not asked for its next output) drops that one, which raises where it
        is resumed after the outputs it had finished. `_held`: the caller is this LLM's own loop (`generate`,
        `wait_for_completion`), which asks for the next output at once: the call stays executing at its yields, so
        another thread's call is refused there (it took such a call for a suspended one and dropped it, losing its
        results)."""
        if self._shut_down:
            raise RuntimeError("this LLM was shut down (LLM.shutdown); build a new one to generate again")
        running = _RunningCall(threading.get_ident())
        self._take_over(running)
        outputs = None
        try:
            if self._data_parallel is not None:  # (the workers have the prompts once every rank got its job)
                outputs = self._data_parallel.generate(prompts, params, use_tqdm=use_tqdm, progress_desc=progress_desc,
                                                       on_dispatched=on_reaching_engine)
            else:
                outputs = self._run_on_engine(prompts, params, use_tqdm, progress_desc, refill, stop_asked, running,
                                              on_reaching_engine)
            for item in outputs:
                if _held:
                    yield item
                    continue
                self._suspend(running)
                yield item
                self._resume(running)
            if self._data_parallel is not None:
                self.last_stats = self._data_parallel.last_stats
        finally:
            try:
                if outputs is not None:  # (its clean-up, before the LLM is free for another call)
                    outputs.close()
            finally:
                self._release(running)

    def _take_over(self, running: _RunningCall) -> None:
        """Make `running` the LLM's call: one runs at a time. A call while another executes (in another thread, or
        from a callback of its own) is refused: an LLM is not thread-safe, as vLLM's is not, and each call's steps
        would take the other's requests. A suspended call (an `iter_generate` whose caller has not asked for its
        next output, in any thread: one its thread left behind must not block the LLM) is dropped
        (`_RunningCall.drop`: its requests aborted, after the lock is let go; resumed, it says so), as a
        data-parallel LLM drops it."""
        with self._call_lock:
            current = self._running_call
            if current is not None and current.executing:
                where = "in another thread" if current.thread != running.thread else "(called from inside it)"
                raise RuntimeError(f"another generate call is running on this LLM {where}: an LLM runs one call at a "
                                   "time (as vLLM's); give each thread its own LLM, or hold a lock around the calls")
            if current is not None:
                current.dropped = True  # (under the lock: resumed meanwhile, it stops before touching the engine)
            self._running_call = running
        if current is not None and current.drop is not None:
            try:
                current.drop()
            except BaseException:  # (Ctrl-C in its clean-up: what it left, the next call aborts: `_abort_leftovers`)
                self._release(running)
                raise

    def _suspend(self, running: _RunningCall) -> None:
        with self._call_lock:
            running.executing = False

    def _resume(self, running: _RunningCall) -> None:
        with self._call_lock:
            running.executing = True

    def _release(self, running: _RunningCall) -> None:
        with self._call_lock:
            if self._running_call is running:
                self._running_call = None

    def _run_on_engine(self, prompts: Sequence[TokenizedPrompt], params: Sequence[SamplingParams],
                       use_tqdm: bool | Callable[..., Any], progress_desc: str, refill, stop_asked,
                       running: _RunningCall, on_reaching_engine) -> Iterator[tuple[int, RequestOutput]]:
        """`iter_generate` on this process's engine. The engine's step log is the call's own (cleared at its
        start: a long-lived LLM keeps no step of earlier calls)."""
        core = self.engine.core
        self._abort_leftovers()
        if self._reset_pending:  # (asked while a suspended call's requests were in the engine)
            self.reset_prefix_cache()
        # (made before the requests: a bar that fails leaves none)
        progress = TokenProgress(progress_desc, use_tqdm, requests=sum(p.n for p in params))
        call = _Call(next(self._request_counter), progress=progress)
        try:
            with _quiet_gc():  # (as in `_validate`: the requests of a large batch)
                self._submit(prompts, params, call=call)
        except BaseException:  # an interrupt part-way: none of the call's requests may stay for the next call
            progress.close()
            core.scheduler.abort_requests_of(f"{call.call_id}-")
            raise
        if on_reaching_engine is not None:
            on_reaching_engine()
        running.drop = functools.partial(self._drop, call)
        core.step_log.clear()
        before, started = dataclasses.replace(core.scheduler.stats), time.perf_counter()
        with _quiet_gc() as call.quiet_gc:  # (the clean-up too: aborting a large call's requests allocates as much
            try:                           # as running them)
                while not running.dropped:
                    if refill is not None and not core.scheduler.waiting:
                        more = refill()
                        if more is None:
                            refill = None
                        else:
                            self._submit(*more, call=call)
                    if not core.has_unfinished() or (stop_asked is not None and stop_asked()):
                        break
                    for index, output in self._step(call):
                        call.num_prompts_done += 1
                        call.num_completions_done += len(output.outputs)
                        yield index, output
                    self._show_progress(progress, call, before)
                if running.dropped:
                    why = "the LLM was shut down" if self._shut_down else "a later one started on this LLM"
                    raise RuntimeError(f"this generate call (call {call.call_id}) was dropped when {why}; the outputs "
                                       "it had finished were given")
            finally:
                try:
                    if not running.dropped:  # (its requests are aborted by `_drop`; the engine is a later call's)
                        self._end_call(call, before, started)
                finally:
                    try:
                        self._show_progress(progress, call, before, force=True)
                    finally:
                        progress.close()

    def _end_call(self, call: _Call, before: SchedulerStats, started: float) -> None:
        """Leave the engine clean for the next call (the caller stopped early or a step failed: what is left of
        the call aborted) and set `last_stats`."""
        self._abort_rest(list(call.states))
        self.last_stats = self._statistics(call, before, time.perf_counter() - started)

    def _abort_leftovers(self) -> None:
        """Abort whatever is in the engine as a call starts (after `_take_over`, which dropped any suspended call):
        only an earlier call's clean-up cut short leaves anything, a second Ctrl-C inside its `_abort_rest`. The
        requests it left would otherwise run in this call's steps, which have no state for them (every later call
        failed with a KeyError)."""
        core = self.engine.core
        if not core.has_unfinished():
            return
        logger.warning("aborting %d requests an interrupted call left in the engine",
                       core.scheduler.num_unfinished_requests())
        core.scheduler.abort_requests_of("")  # (every request: prefixes after their members)
        _drain_quietly(core)
        self.engine.drop_followers_out_of_step()

    def _abort_rest(self, request_ids: list[str]) -> None:
        """Abort a call's unfinished requests and collect its step in flight, so that the engine is clean."""
        if request_ids:
            self.engine.core.finish_requests(request_ids, "abort")
            _drain_quietly(self.engine.core)
        self.engine.drop_followers_out_of_step()

    def _drop(self, call: _Call) -> None:
        """Drop a suspended call for a later one (`_take_over`, which marked it dropped under the lock first: its
        clean-up, should it be resumed or collected meanwhile, then leaves the engine alone): its requests aborted,
        its step in flight collected, its quiet collector and its progress bar ended (they would outlast it until
        it is collected); resumed, it raises."""
        request_ids = list(call.states)
        call.states.clear()
        self._abort_rest(request_ids)
        if call.quiet_gc is not None:
            call.quiet_gc.release()
        call.progress.close()

    def _show_progress(self, progress: TokenProgress, call: _Call, before: SchedulerStats, force: bool = False) -> None:
        if progress.enabled and self.engine is not None:  # (None: shut down under a suspended call)
            stats = self.engine.core.scheduler.stats  # (prompt tokens done: computed, or taken from the KV cache)
            done, total = ((call.num_completions_done, call.num_completions) if progress.counts_completions
                           else (call.num_prompts_done, len(call.prompts)))
            progress.update(input_tokens=stats.prefill_tokens - before.prefill_tokens
                            + stats.kept_prefill_tokens - before.kept_prefill_tokens,
                            output_tokens=call.output_tokens, planned_tokens=call.planned_tokens,
                            requests_done=done, requests_total=total, force=force)

    def _submit(self, prompts: Sequence[TokenizedPrompt], params: Sequence[SamplingParams],
                call: _Call | None = None) -> _Call:
        """Make the requests (n > 1: one per completion), plan their prefix sharing among themselves
        and add the ordered submission (prefix requests and top-level units) to the engine; with
        `call`, as more prompts of that call (numbered after its others)."""
        call = call or _Call(next(self._request_counter))
        first = len(call.prompts)
        call.prompts.extend(prompts)
        requests = []
        for index, (prompt, sp) in enumerate(zip(prompts, params), start=first):
            children = []
            for k in range(sp.n):
                child_params = sp if sp.n == 1 else sp.for_child(k)
                child_params.update_from_tokenizer(self.tokenizer)  # (for_child does not copy the bad words' ids)
                request = Request(request_id=f"{call.call_id}-{index}-{k}", prompt_token_ids=prompt.token_ids,
                                  sampling_params=child_params, eos_token_ids=self.eos_token_ids,
                                  model_eos_token_id=self._model_eos_token_id,
                                  arrival_index=index)
                requests.append(request)
                state = CompletionState(k, child_params, self.tokenizer, prompt.token_ids,
                                        token_ids=request.output_token_ids)
                call.states[request.request_id] = (index, state)
                call.num_reading_every_token += state.reads_every_token
                children.append(state)
            call.pending[index] = children
            call.unfinished[index] = len(children)
        plan_started = time.perf_counter()
        sharing = self.config.sharing
        budgets = {r.request_id: expected_output_tokens(r, self.max_model_len) for r in requests}
        id_prefix = f"{call.call_id}-{len(call.plans)}-"
        parts = self._plans_within_cache(call, requests, sharing.prefix_sharing, budgets, id_prefix)
        call.budgets.update(budgets)
        call.plan_seconds += time.perf_counter() - plan_started
        call.plans.extend(plan.summary() for plan, _ in parts)
        call.num_completions += len(requests)
        call.planned_tokens += sum(plan.prefill_tokens for plan, _ in parts) + sum(budgets.values())
        for request, cached in zip(requests, cached_prompt_tokens(requests)):  # (prompt by prompt, k = 0 first:
            call.num_cached_tokens.setdefault(request.arrival_index, cached)  # setdefault keeps the first's)
        for _, submission in parts:
            for request in submission:
                self.engine.core.add_request(request)
        return call

    def _plans_within_cache(self, call: _Call, requests: list[Request], share: bool, budgets: dict[str, int],
                            id_prefix: str) -> list[tuple[Any, list[Request]]]:
        """The submission's [(plan, submission)], as `_planned` makes them. Where members are crowded (their
        worst case and their prefixes' partial last blocks would not fit the KV cache together,
        `_crowded_members`; each fits alone: `kv_cache_problem`), every prefix above one is cut back to its last
        block boundary (`PrefixPlan.with_prefixes_cut_to_blocks`): a member then shares all of its prefixes'
        blocks and needs no more memory than it would unshared, so it still shares all but at most block_size - 1
        tokens of each prefix. Cutting only lowers the partial blocks above any member: no other member becomes
        crowded. Said once per LLM (`_note_block_aligned`)."""
        plan, submission = self._planned(call, requests, share, budgets, id_prefix)
        if not (crowded := self._crowded_members(requests)):
            return [(plan, submission)]
        group_of = {prompt: group.group_id for group in plan.groups for prompt in group.prompts}
        above: set[int] = set()
        for index, request in enumerate(requests):
            group = group_of.get(index) if request.request_id in crowded else None
            while group is not None and group not in above:
                above.add(group)
                group = plan.groups[group].parent
        block_size = self.engine.core.scheduler.kv.block_size
        unbounded = any(r.request_id in crowded and r.sampling_params.max_tokens is None for r in requests)
        self._note_block_aligned(len(crowded), len(requests), block_size, unbounded)
        for request in requests:
            request.parent = None  # (the first plan's links dropped: a request the new plan leaves ungrouped has none)
        return [self._planned(call, requests, share, budgets, id_prefix,
                              plan.with_prefixes_cut_to_blocks(above, block_size))]

    def _note_block_aligned(self, num_squeezed: int, num_requests: int, block_size: int, unbounded: bool) -> None:
        """Warn, once per LLM, that requests share their prefixes only up to block boundaries, and why (`unbounded`:
        some of them have no max_tokens, which the advice then names)."""
        if self._said_block_aligned:
            return
        self._said_block_aligned = True
        kv = self.engine.core.scheduler.kv
        logger.warning(
            "%d of %d requests may fill nearly the whole KV cache (%d blocks of %d tokens) with their prompt and "
            "max_tokens (without max_tokens: up to what the cache holds), leaving no room for copies of their shared "
            "prefixes' partial last blocks: those prefixes are shared only up to their last full block, each member "
            "computing up to %d tokens of them again. To share whole prefixes, %s%s",
            num_squeezed, num_requests, kv.pool.num_blocks, block_size, block_size - 1,
            "give them a max_tokens or " if unbounded else "", self.kv_cache_advice())

    def _planned(self, call: _Call, requests: list[Request], share: bool, budgets: dict[str, int],
                 id_prefix: str, plan: PrefixPlan | None = None) -> tuple[PrefixPlan, list[Request]]:
        """(the prefix plan of these requests among themselves, or `plan` where given; their submission: prefix
        requests and top-level units in the group order, members' parents set)."""
        sharing = self.config.sharing
        if plan is None:
            plan = plan_prefix_sharing([call.prompts[r.arrival_index].array for r in requests],  # (converted once)
                                       mode=sharing.plan_mode, share=share)
        submission = build_submission(plan, requests, GROUP_ORDERS[sharing.group_order](),
                                      lambda r: budgets[r.request_id], id_prefix=id_prefix)
        return plan, submission

    def _crowded_members(self, requests: list[Request]) -> set[str]:
        """Ids of the members whose worst case, counting the partial last block of each prefix above them,
        is more than the whole KV cache (the scheduler refuses them; `Scheduler.kv_blocks_needed`)."""
        scheduler = self.engine.core.scheduler
        return {r.request_id for r in requests
                if r.parent is not None and scheduler.kv_blocks_needed(r) > scheduler.kv.pool.num_blocks}

    def _step(self, call: _Call) -> list[tuple[int, RequestOutput]]:
        """Run one engine step and apply its tokens (detokenize, stop strings); the prompts it
        completed, as (prompt index, RequestOutput). The step's updates are columns (`StepUpdates`):
        a token that carries nothing but itself (no logprobs or prompt logprobs in the step, no grammar,
        not the end of its request: nearly every one) goes straight to its completion; the others
        through `_apply_update`, one RequestUpdate each."""
        core = self.engine.core
        try:
            updates = core.step()
        except RuntimeError as e:  # (a dead tensor-parallel rank is named, not its peer's transport error)
            failure = self.engine.step_failure(e)
            if failure is e:
                raise
            raise failure from e
        call.output_tokens += len(updates)
        done: list[tuple[int, RequestOutput]] = []
        states, ended = call.states, updates.ended
        plain = not (updates.logprobs or updates.prompt_logprobs)
        if plain and not call.num_reading_every_token:  # (each state's tokens are its request's, recorded)
            for request_id, (finish_reason, stop_reason) in list(ended.items()):
                index, state = states[request_id]
                state.finish(finish_reason, stop_reason)
                self._completion_ended(call, request_id, index, state, done)
            return done
        for request_id, token in zip(updates.request_ids, updates.token_ids):
            index, state = states[request_id]
            if plain and request_id not in ended and state.params.grammar_key is None:
                if (matched := state.append(token, None)) is None:
                    continue
                core.finish_requests([request_id], "stop", matched)
                state.finish("stop", matched)
            elif not self._apply_update(call, updates.update(request_id, token), index, state):
                continue
            self._completion_ended(call, request_id, index, state, done)
        return done

    def _apply_update(self, call: _Call, update, index: int, state: CompletionState) -> bool:
        """Apply one token with whatever it carries (prompt logprobs, logprobs, its grammar's check, the end of
        its request); whether its completion ended."""
        if update.prompt_logprobs is not None:
            state.prompt_logprobs = update.prompt_logprobs
        checker = call.grammars.get(update.request_id)
        if checker is None and state.params.grammar_key is not None:  # (made at its first token, not at submit)
            checker = call.grammars[update.request_id] = self._grammar_check(state.params.grammar_key)
        if checker is not None and (refusal := checker.refusal(update.new_token_id)) is not None:
            self._end_with_error(call, update, state, refusal, index)
        elif (matched := state.append(update.new_token_id, update.logprobs,
                                      stop_terminated=update.finish_reason == "stop")) is not None:
            if update.finish_reason is None:
                self.engine.core.finish_requests([update.request_id], "stop", matched)
            state.finish("stop", matched)
        elif update.finish_reason is not None:
            state.finish(update.finish_reason, update.stop_reason)
        else:
            return False
        return True

    def _completion_ended(self, call: _Call, request_id: str, index: int, state: CompletionState,
                          done: list[tuple[int, RequestOutput]]) -> None:
        """A completion ended: forget it, give back its unused budget, and when it was its prompt's last,
        add the prompt's RequestOutput to `done`."""
        del call.states[request_id]
        call.num_reading_every_token -= state.reads_every_token
        call.grammars.pop(request_id, None)
        call.planned_tokens -= max(0, call.budgets.pop(request_id) - len(state.token_ids))
        call.unfinished[index] -= 1
        if not call.unfinished[index]:
            del call.unfinished[index]
            children = call.pending.pop(index)
            prompt = call.prompts[index]
            done.append((index, RequestOutput(request_id=f"{call.call_id}-{index}", prompt=prompt.text,
                                              prompt_token_ids=prompt.token_ids,
                                              outputs=[c.to_output() for c in children],
                                              prompt_logprobs=self._prompt_logprobs(prompt, children[0]),
                                              num_cached_tokens=cached_tokens_of(call.num_cached_tokens.pop(index)))))

    def _grammar_check(self, grammar_key: tuple[str, str]) -> GrammarState:
        """The facade's own matcher of a structured completion's tokens (`GrammarState.refusal`), made at its first
        token: made at submission, a million structured lines held a million matchers (~9 KB and ~56 us each)
        before the first step, and compiled again each schema the grammar cache had evicted; at the first token
        the runner has just compiled it (a cache hit), and live matchers never outnumber running requests."""
        return self.prompts.grammars.new_state(grammar_key)

    def _end_with_error(self, call: _Call, update, state: CompletionState, error: str, index: int) -> None:
        """End a completion whose grammar refused its token `update` (`GrammarState.refusal`): finish_reason "error"
        (vLLM's for a request that failed) with `error` on its output, the token left out. The call's first such
        failure is said in the log, naming the call's prompt, once (a job of thousands of such lines flooded the log
        with one warning per completion); each failure is in its own output. The other requests go on."""
        if update.finish_reason is None:
            self.engine.core.finish_requests([update.request_id], "error")
        state.leave_out_last_token()
        state.finish("error", None)
        state.error = error
        if not call.completion_failed:
            call.completion_failed = True
            logger.warning("prompt %d of this call: %s (this and any later failed completion of the call end with "
                           'finish_reason "error", the reason in their output)', index, error)

    def _prompt_logprobs(self, prompt: TokenizedPrompt, first: CompletionState):
        """vLLM's RequestOutput.prompt_logprobs from the first completion's (only it computes them);
        None when not asked for (or when the request ended before its first token: an abort)."""
        if first.prompt_logprobs is None:
            return None
        return prompt_logprobs_output(prompt.token_ids, first.prompt_logprobs, first.tokenizer)  # (None: not decoded)

    def _statistics(self, call: _Call, before: SchedulerStats, wall_s: float) -> dict[str, Any]:
        """What the call did: the scheduler's counters since `before`, the steps of the step log (the call's own:
        `_run_on_engine` clears it), and its plan.
        num_requests and prompt_tokens count each prompt once whatever its n, as vLLM's usage does; its n completions
        are n engine requests (`num_completions`), whose prompt tokens (`completion_prompt_tokens`, the prompt n
        times) are the prefill without sharing: saving_ratio = 1 - (prefill_tokens_computed - recomputed_tokens) / those
        (what preemption computed again is its own cost, not sharing's: it made the saving negative)."""
        s = self.engine.core.scheduler.stats
        steps, prefill = s.num_steps - before.num_steps, s.prefill_tokens - before.prefill_tokens
        first_time = prefill - (s.recomputed_tokens - before.recomputed_tokens)
        scheduled = sum(r.num_tokens for r in self.engine.core.step_log)
        prompt_tokens = sum(len(p.token_ids) for p in call.prompts)
        unshared = sum(p["completion_prompt_tokens"] for p in call.plans)
        num_units = sum(p["num_groups"] + p["num_ungrouped"] for p in call.plans)
        return {
            "num_requests": len(call.prompts), "num_completions": call.num_completions,
            "prompt_tokens": prompt_tokens, "completion_prompt_tokens": unshared, "output_tokens": call.output_tokens,
            "prefill_tokens_computed": prefill,
            "saving_ratio": 1.0 - first_time / unshared if unshared else 0.0,
            **{k: getattr(s, k) - getattr(before, k)
               for k in ("recomputed_tokens", "kept_prefill_tokens", "decode_tokens", "attended_keys",
                         "num_preemptions", "num_block_copies", "num_prefix_releases")},
            "num_steps": steps,
            "mean_tokens_per_step": scheduled / steps if steps else 0.0,
            "wall_s": wall_s,
            "output_tokens_per_s": call.output_tokens / wall_s if wall_s > 0 else 0.0,
            **dataclasses.asdict(self.config.sharing),
            "num_groups": sum(p["num_groups"] for p in call.plans),
            "mean_sharing_degree": call.num_completions / num_units if num_units else 0.0,
            "max_sharing_degree": max((p["max_sharing_degree"] for p in call.plans), default=0),
            "planned_prefill_tokens": sum(p["prefill_tokens"] for p in call.plans),
            "plan_seconds": call.plan_seconds,
            **kv_pool_stats(self.engine.kv_spec),
        }


def kv_pool_stats(kv_spec) -> dict[str, Any]:
    """The KV pool as the statistics report it: its element type, blocks, tokens and GiB (one
    tensor-parallel rank's share of the heads; fp8 holds twice a 16-bit cache's tokens per GiB), and the
    activation reserve its size left for the steps where that was measured (`runner.activation_profile`;
    None elsewhere: on CPU, a given size, the torch attention)."""
    reserve = kv_spec.activation_reserve
    return {"kv_cache_dtype": str(kv_spec.dtype).removeprefix("torch."), "kv_blocks": kv_spec.num_blocks,
            "kv_tokens": kv_spec.num_tokens, "kv_cache_gib": kv_spec.num_bytes / 2**30,
            "activation_reserve_gib": None if reserve is None else reserve.total / 2**30}


def cached_prompt_tokens(requests: list[Request]) -> list[tuple[int, list[Request]]]:
    """Per request (plans final), the prompt tokens the plan does not compute for it: as a prefix cache counts
    hits, each shared prefix is charged to the first of `requests` that reads it and is cached for the rest. So over
    requests of one prompt each, sum(prompt tokens - cached) is the prefill the plan computes. With it, the requests
    whose KV taken from earlier sequences (`Request.kept_tokens`, set when they are admitted) is cached for this one
    too: itself and the prefixes charged to it (`cached_tokens_of`)."""
    charged: set[str] = set()
    cached = []
    for request in requests:
        computed, start = request.num_prompt_tokens - request.fork_point, 0
        charged_here = []
        for prefix_id, end in request.shared_prefixes:  # (outermost first: each adds its tokens past the last)
            if prefix_id not in charged:
                charged.add(prefix_id)
                computed += end - start
                charged_here.append(prefix_id)
            start = end
        mine, prefix = [request], request.parent
        while charged_here and prefix is not None:  # (the prefixes charged to it, found up its chain)
            if prefix.request_id in charged_here:
                mine.append(prefix)
            prefix = prefix.parent
        cached.append((request.num_prompt_tokens - computed, mine))
    return cached


def cached_tokens_of(planned: tuple[int, list[Request]]) -> int:
    """`RequestOutput.num_cached_tokens` from a `cached_prompt_tokens` entry, once its requests were admitted."""
    cached, charged = planned
    return cached + sum(r.kept_tokens for r in charged)


@dataclass
class _Call:
    """One iter_generate call's bookkeeping; written only by the LLM running it."""

    call_id: int
    prompts: list[TokenizedPrompt] = dataclasses.field(default_factory=list)
    num_completions: int = 0
    """Engine requests made: one per completion (n of them for a prompt of n > 1)."""
    states: dict[str, tuple[int, CompletionState]] = dataclasses.field(default_factory=dict)
    """Unfinished completions by request id: (prompt index, state)."""
    grammars: dict[str, GrammarState] = dataclasses.field(default_factory=dict)
    """Unfinished structured completions' checks of their tokens (`GrammarState.refusal`), by request id, from
    their first token on (`LLM._grammar_check`)."""
    pending: dict[int, list[CompletionState]] = dataclasses.field(default_factory=dict)
    """Prompts with an unfinished completion: their completions' states."""
    unfinished: dict[int, int] = dataclasses.field(default_factory=dict)
    """The same prompts' completions not yet ended: counted down, where checking every state as each ended made a
    prompt of n completions cost n^2 checks (28 s of a 67 s call at n = 16,384)."""
    plans: list[dict] = dataclasses.field(default_factory=list)
    """The summary of each submission's prefix plan."""
    plan_seconds: float = 0.0
    output_tokens: int = 0
    budgets: dict[str, int] = dataclasses.field(default_factory=dict)
    """Unfinished completions' decode budgets (the output tokens planned for them), by request id."""
    planned_tokens: int = 0
    """Prefill tokens after sharing + decode budgets; a completion that stops early gives back what it left."""
    num_prompts_done: int = 0
    num_completions_done: int = 0
    """Completions of the prompts done (a vLLM bar counts these: `TokenProgress.counts_completions`)."""
    num_reading_every_token: int = 0
    """Unfinished completions that read each token as it comes (`CompletionState.reads_every_token`): while
    none, a step's tokens need no work here but for the requests they ended (`LLM._step`)."""
    num_cached_tokens: dict[int, tuple[int, list[Request]]] = dataclasses.field(default_factory=dict)
    """Unfinished prompts' `RequestOutput.num_cached_tokens`, by prompt index, as their first completion's
    `cached_prompt_tokens` entry (`cached_tokens_of` reads it when the prompt is done)."""
    completion_failed: bool = False
    """A completion of the call has failed (`_end_with_error`): the log said so once."""
    progress: TokenProgress | None = None
    quiet_gc: _QuietGC | None = None
    """The call's hold on the quiet collector while it steps (`LLM._drop` ends both)."""


@dataclass
class _RunningCall:
    """The `iter_generate` call an LLM runs (`LLM._take_over`): the thread that began it, whether it executes (False
    while suspended at a yield), and how to drop it where a later call replaces it while it is suspended (None:
    nothing to drop here, as before its requests reach the engine, or on a data-parallel LLM, whose workers drop it
    themselves). `executing` and `dropped` are written under the LLM's `_call_lock`."""

    thread: int
    executing: bool = True
    dropped: bool = False
    """Dropped for a later call while suspended (`LLM._take_over`): it stops where it is resumed."""
    drop: Callable[[], None] | None = None


# ---------------------------------------------------------------------- helpers
def _drain_quietly(engine: EngineCore) -> None:
    """Collect (and drop) the step still in flight after the loop stopped early; a failure there
    is logged, not raised over the error that stopped the loop."""
    try:
        engine.drain()
    except Exception:  # noqa: BLE001 - the step's outputs are discarded anyway
        logger.exception("the step in flight failed while the batch was being stopped")


def _quiet_gc(young_threshold: int = 50_000) -> _QuietGC:
    """Python's cyclic GC during the engine loop: each step allocates thousands of short-lived
    objects, which trigger collections that walk the large heap of live requests again and again
    (a third of the CPU time of a 6,400-request batch, `benchmarks/step_overhead.py`). Everything
    alive when the loop starts is frozen (never walked) and young collections run less often; the
    settings are restored afterwards. Acyclic garbage is still freed at once by reference counts.
    Only the young generations are collected before freezing: a full collection walks the whole
    heap (torch, transformers: 0.2-0.4 s per call, ~1 ms per step of a 300-step call,
    `benchmarks/host_overhead.py`); old cyclic garbage, if any, stays frozen until the call ends
    and is collected after it.
    The settings are the process's: nested or overlapping uses (two LLMs in two threads, a suspended call) change
    them once, at the first to begin, and restore them once, at the last to end (`_QuietGC`'s count). Where the caller
    froze objects itself (`gc.freeze()`), nothing is frozen here: unfreezing would thaw theirs too."""
    return _QuietGC(young_threshold)


class _QuietGC:
    """A hold on `_quiet_gc`'s settings: taken by `with` (it returns the hold), given back by its end or by
    `release` (once: a dropped call's, `LLM._drop`, is given back before its generator ends)."""

    _lock = threading.RLock()  # (re-entrant: a collection started under it may end a collected call's hold)
    _depth = 0
    _threshold: tuple[int, ...] = ()
    _froze = False

    def __init__(self, young_threshold: int) -> None:
        self.young_threshold = young_threshold
        self._held = False

    def __enter__(self) -> _QuietGC:
        cls = type(self)
        with cls._lock:
            if cls._depth == 0:
                cls._froze = gc.get_freeze_count() == 0
                if cls._froze:
                    gc.collect(1)
                    gc.freeze()
                cls._threshold = gc.get_threshold()
                gc.set_threshold(max(cls._threshold[0], self.young_threshold), *cls._threshold[1:])
            cls._depth += 1
            self._held = True
        return self

    def release(self) -> None:
        cls = type(self)
        with cls._lock:
            if not self._held:
                return
            self._held = False
            cls._depth -= 1
            if cls._depth == 0:
                gc.set_threshold(*cls._threshold)
                if cls._froze:
                    gc.unfreeze()

    def __exit__(self, *exc) -> None:
        self.release()


_METHODS_NOT_OFFERED = {
    "start_profile": "profile with `batchllm bench --profile-out` (torch's profiler over the engine's steps)",
    "stop_profile": "profile with `batchllm bench --profile-out` (torch's profiler over the engine's steps)",
    "get_metrics": "each call's statistics are in llm.last_stats (tokens, steps, prefix sharing, KV cache)",
    "collective_rpc": "apply_model(func) runs a function on the model where it lives in this process",
    "set_tokenizer": "give the tokenizer when building: LLM(model, tokenizer=directory)",
    "reset_mm_cache": "prompts are text or token ids only",
    **{name: "weights are loaded from the model directory when the LLM is built"
       for name in ("init_weight_transfer_engine", "start_weight_update", "start_draft_weight_update",
                    "update_weights", "finish_weight_update")},
}
"""vLLM 0.26 `LLM` methods with no counterpart here, and what to do instead (`LLM.__getattr__`)."""

CONTENT_FORMATS = ("auto", "string", "openai")
"""vLLM's chat_template_content_format values (`PromptProcessor.apply_chat_template`)."""

_NOT_SUPPORTED = {
    "lora_request": "LoRA adapters are not supported; leave it None",
    "mm_processor_kwargs": "the models here take text and token ids only; leave it None",
    "priority": "priority scheduling is not supported: requests run in the order the prefix-sharing plan "
                "gives them; leave it None (or all 0)",
    "chat_template_content_format": "'auto', 'string' or 'openai'",
}
"""What to do instead of each vLLM `generate` / `chat` argument given a value that asks for something."""


def _check_per_prompt_lengths(num_prompts: int, **arguments: Any) -> None:
    """A ValueError where one of vLLM's per-prompt arguments given as a list (priority; lora_request's list) has
    another length than the prompts, as vLLM refuses it ("The lengths of prompts (2) and priority (1) must be the
    same."); a short list was taken and the prompts past it given nothing."""
    for name, value in arguments.items():
        if value is None or (name != "priority" and not isinstance(value, (list, tuple))):
            continue  # (a lora_request that is no list is one for every prompt)
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
            raise TypeError(f"{name} must be a list (one per prompt), got {type(value).__name__}")
        if len(value) != num_prompts:
            raise ValueError(f"the lengths of prompts ({num_prompts}) and {name} ({len(value)}) must be the same")


def _refuse_unsupported(**arguments: Any) -> None:
    """A ValueError naming the first of vLLM's `generate` / `chat` arguments (`_NOT_SUPPORTED`) given a value
    other than None, and what to do instead."""
    for name, value in arguments.items():
        if isinstance(value, (list, tuple)) and all(v is None for v in value):
            value = None  # one per prompt, none asking for anything (vLLM scripts build such lists)
        if value is not None:
            raise ValueError(f"{name}={str(value)[:60]} is not supported: {_NOT_SUPPORTED[name]}")


def _tokenization_asked(tokenization_kwargs: dict | None) -> tuple[int | None, bool | None]:
    """vLLM's tokenization_kwargs as (truncate, add_special_tokens), each None where not asked.
    truncate_prompt_tokens k (vLLM's way to truncate since its SamplingParams lost the field): the tokens each
    prompt keeps from its end (truncation_side "left", vLLM's for generation; -1: what the context holds beside the
    request's max_tokens, `PromptProcessor.truncation_for`), checked as SamplingParams checks its own.
    add_special_tokens True or False: a text prompt is tokenized with or without the tokenizer's special tokens, as
    vLLM does (`PromptProcessor._adds_special_tokens`). Another key, a non-bool add_special_tokens or truncation_side
    "right" is a ValueError naming it."""
    kwargs = dict(tokenization_kwargs or {})
    truncate = kwargs.pop("truncate_prompt_tokens", None)
    side = kwargs.pop("truncation_side", None)
    add_special = kwargs.pop("add_special_tokens", None)
    if side not in TRUNCATION_SIDES:
        raise ValueError(f"tokenization_kwargs truncation_side={str(side)[:20]!r} is not supported: "
                         f"{TRUNCATION_SIDE_NOTE}")
    if add_special is not None and not isinstance(add_special, bool):
        raise ValueError(f"tokenization_kwargs add_special_tokens must be True or False, got {add_special!r:.40}")
    if kwargs:
        raise ValueError(f"tokenization_kwargs {', '.join(map(repr, sorted(map(str, kwargs))))[:80]} not supported: "
                         "only truncate_prompt_tokens, truncation_side 'left' and add_special_tokens are taken")
    if truncate is not None:
        SamplingParams(truncate_prompt_tokens=truncate)  # its ValueError names a bad value
    return truncate, add_special


def _as_prompt_list(prompts: Any) -> list:
    """`generate`'s prompts as a list of prompts: a str or dict is one prompt, as is one sequence of ints (token
    ids); bytes are refused (a TypeError, as vLLM's for a prompt that is no str, dict or list of ints), never read as
    the token ids their byte values would be."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray, memoryview)):
        raise TypeError(f"prompts must be str, not {type(prompts).__name__}: decode the bytes first (e.g. "
                        "data.decode('utf-8')); token ids are given as a list of ints (vLLM reads bytes as "
                        "serialized prompt embeddings, which are not supported here)")
    if not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a prompt or a list of prompts, got {type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt given as token ids (a 1-D numpy array's too)
    return prompts


@dataclass(frozen=True)
class FrontEnd:
    """An engine's prompt side: the model directory, spec and context (`source`), the tokenizer, the
    EOS ids and the PromptProcessor that templates, tokenizes and validates prompts. Read from the
    model directory without loading weights or touching a device, so it can be made before the engine
    (and the input read with it while the engine loads); the engine built from the same config starts
    from the same `source` (`engine.resolve_model(config, source=front.source)`)."""

    source: ModelSource
    tokenizer: Any
    """None with skip_tokenizer_init."""
    eos_token_ids: frozenset[int]
    prompts: PromptProcessor

    @property
    def model_dir(self) -> Path:
        return self.source.model_dir

    @property
    def model_spec(self) -> ModelSpec:
        return self.source.spec

    @property
    def max_model_len(self) -> int:
        return self.source.max_model_len


def front_end_for(config: EngineConfig, source: ModelSource | None = None) -> FrontEnd:
    """The FrontEnd of the engine `config` describes (its tokenizer loaded: fails here, before any
    weights load, on a tokenizer that cannot be read); `source`: the config's model as this process
    read it already (None: read it here)."""
    mc = config.model
    source = read_model_source(mc.model, mc.max_model_len) if source is None else source
    tokenizer = None if mc.skip_tokenizer_init else tokenizer_for(source, mc.tokenizer, mc.chat_template)
    eos_token_ids = request_ending_eos_ids(source.model_dir, mc.generation_config, source.spec.config_eos_token_ids,
                                           tokenizer)
    prompts = PromptProcessor(tokenizer, source.spec.vocab_size, source.max_model_len, str(source.model_dir),
                              sorted(eos_token_ids), mc.max_logprobs)
    return FrontEnd(source, tokenizer, eos_token_ids, prompts)
