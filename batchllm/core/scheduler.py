"""Iteration-level scheduler: which tokens of which requests run in the next forward step.

Writer of all `Request` state and of the `KVCacheManager`. Each step it fills a token budget:
first the running requests (in admission order: decodes and unfinished prefill chunks), then new
requests from the waiting queue, chunking prompts to fit the budget. When the KV pool cannot grow a
running request, the most recently admitted running request is preempted by recompute: its blocks
are freed, `num_computed_tokens` goes back to 0, its output tokens are kept, and it rejoins the
front of the waiting queue. No request is ever dropped and no token is ever wrong.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from batchllm.config import SchedulerConfig
from batchllm.core.kv_cache_manager import KVCacheManager
from batchllm.outputs import RunnerOutput, SamplingSpec, ScheduledBatch, ScheduledRequest, TokenLogprobs
from batchllm.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class RequestUpdate:
    """What one step did to one request, for the output side (detokenizing, stop strings)."""

    request_id: str
    new_token_id: int
    logprobs: TokenLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None


@dataclass
class SchedulerStats:
    num_steps: int = 0
    num_scheduled_tokens: int = 0
    prefill_tokens: int = 0
    """Tokens whose KV was computed from a prompt (or recomputed after preemption): not decode."""
    decode_tokens: int = 0
    num_preemptions: int = 0
    peak_used_blocks: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        self._finished_since_last_step: list[str] = []

    # ------------------------------------------------------------------ admission
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if request.num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: prompt has {request.num_prompt_tokens} tokens, "
                f"the model's context (max_model_len) is {self.max_model_len}; no room to generate"
            )
        worst_case = self.kv.blocks_for(self._max_total_tokens(request))
        if worst_case > self.kv.pool.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} may need {worst_case} KV blocks but the cache has "
                f"{self.kv.pool.num_blocks}; give the KV cache more memory or lower max_model_len"
            )
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def _max_total_tokens(self, request: Request) -> int:
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            return self.max_model_len
        return min(self.max_model_len, request.num_prompt_tokens + max_tokens)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Request, int]] = []
        preempted_this_step = False

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                i += 1
                continue
            while not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted_this_step = True
                if victim is request:
                    break
            else:
                chosen.append((request, num_new))
                budget -= num_new
                i += 1

        # Admitting new work right after a preemption would only thrash: wait for blocks to free up.
        while self.waiting and budget > 0 and not preempted_this_step:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                break
            if not self.kv.allocate_slots(request.request_id, request.num_computed_tokens + num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            chosen.append((request, num_new))
            budget -= num_new

        return self._make_batch(chosen)

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining <= budget:
            return remaining
        return budget if self.config.enable_chunked_prefill else 0

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.debug("preempted %s (%d tokens)", request.request_id, request.num_tokens)

    def _make_batch(self, chosen: list[tuple[Request, int]]) -> ScheduledBatch:
        scheduled = []
        for request, num_new in chosen:
            start = request.num_computed_tokens
            reaches_end = start + num_new == request.num_tokens
            is_decode = num_new == 1 and reaches_end and request.num_output_tokens > 0
            if is_decode:
                self.stats.decode_tokens += 1
            else:
                self.stats.prefill_tokens += num_new
            scheduled.append(
                ScheduledRequest(
                    request_id=request.request_id,
                    token_ids=request.token_ids(start, start + num_new),
                    start_position=start,
                    block_ids=list(self.kv.block_table(request.request_id)),
                    sampling=self._sampling_spec(request) if reaches_end else None,
                )
            )
        batch = ScheduledBatch(scheduled, finished_request_ids=self._finished_since_last_step)
        self._finished_since_last_step = []
        self.stats.num_steps += 1
        self.stats.num_scheduled_tokens += batch.num_tokens
        self.stats.peak_used_blocks = max(self.stats.peak_used_blocks, self.kv.pool.num_used_blocks)
        return batch

    @staticmethod
    def _sampling_spec(request: Request) -> SamplingSpec:
        sp = request.sampling_params
        banned: tuple[int, ...] = ()
        if request.num_output_tokens < sp.min_tokens:
            banned = tuple(sorted(set(request.eos_token_ids) | set(sp.stop_token_ids)))
        return SamplingSpec(
            temperature=sp.temperature,
            top_k=sp.top_k,
            top_p=sp.top_p,
            min_p=sp.min_p,
            seed=sp.seed,
            num_logprobs=sp.logprobs,
            banned_token_ids=banned,
        )

    # ------------------------------------------------------------------ results
    def update_from_output(self, batch: ScheduledBatch, output: RunnerOutput) -> list[RequestUpdate]:
        updates = []
        for scheduled in batch.requests:
            request = self.requests[scheduled.request_id]
            request.num_computed_tokens += len(scheduled.token_ids)
            if scheduled.sampling is None:
                continue
            token = output.sampled_token_ids[request.request_id]
            request.output_token_ids.append(token)
            finish_reason, stop_reason = self._check_finished(request, token)
            if finish_reason is not None:
                self._finish(request, finish_reason, stop_reason)
            updates.append(
                RequestUpdate(
                    request_id=request.request_id,
                    new_token_id=token,
                    logprobs=output.logprobs.get(request.request_id),
                    finish_reason=finish_reason,
                    stop_reason=stop_reason,
                )
            )
        return updates

    def _check_finished(self, request: Request, token: int) -> tuple[str | None, int | None]:
        sp = request.sampling_params
        if request.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and token in request.eos_token_ids:
                return "stop", None
            if token in sp.stop_token_ids:
                return "stop", token
        if sp.max_tokens is not None and request.num_output_tokens >= sp.max_tokens:
            return "length", None
        if request.num_tokens >= self.max_model_len:
            return "length", None
        return None, None

    def finish_requests(self, request_ids: list[str], reason: str, stop_reason: int | str | None = None) -> None:
        """End requests from outside the step (a stop string matched, or an abort)."""
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is not None and not request.is_finished:
                self._finish(request, reason, stop_reason)

    def _finish(self, request: Request, reason: str, stop_reason: int | str | None) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)
        self._finished_since_last_step.append(request.request_id)
        del self.requests[request.request_id]
