"""The engine loop body: schedule -> execute -> update. Torch-free; the runner is injected.

Writer of nothing but its own step log and the step in flight; all request state belongs to the
scheduler.

With `async_scheduling`, a step is scheduled and submitted before the previous step's tokens are
collected, so the CPU work of a step (scheduling, building inputs, launching kernels, recording the
previous step's tokens) runs while the device computes the step before it: `step()` submits step
N + 1, then collects step N and returns its updates. The scheduler never needs a token before it is
collected (see `core/scheduler.py`); the runner fills each placeholder from the step that samples it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from batchllm.core.scheduler import Scheduler
from batchllm.core.step_updates import StepUpdates
from batchllm.outputs import RunnerOutput, ScheduledBatch
from batchllm.request import Request


class PendingOutput(Protocol):
    def result(self) -> RunnerOutput: ...


class Executor(Protocol):
    """Anything that runs a ScheduledBatch: the model runner, or a fake in unit tests. An executor
    that can run asynchronously also has `submit(batch) -> PendingOutput`, which returns once the
    step is queued on the device."""

    def execute(self, batch: ScheduledBatch) -> RunnerOutput: ...


@dataclass
class StepRecord:
    num_tokens: int
    num_requests: int
    seconds: float
    """Wall time of the step: from its submission (or the previous step's collection, if later)
    to its collection."""


@dataclass
class _Done:
    output: RunnerOutput

    def result(self) -> RunnerOutput:
        return self.output


@dataclass
class EngineCore:
    scheduler: Scheduler
    executor: Executor
    async_scheduling: bool = False
    """Submit each step before collecting the previous one (needs an executor with `submit`)."""
    step_log: list[StepRecord] = field(default_factory=list)
    """Tokens and time of every step (for tokens-per-step plots and stats)."""
    _in_flight: tuple[ScheduledBatch, PendingOutput, float] | None = None
    _last_collected: float = 0.0

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> StepUpdates:
        """Run one step; returns the updates of the step collected (the one before, when asynchronous). A step
        that fails (or is interrupted) anywhere is handled by `_after_failure` before the error goes on."""
        try:
            return self._step()
        except BaseException:
            self._after_failure()
            raise

    def _after_failure(self) -> None:
        """A step failed (an error, or an interrupt anywhere from scheduling to recording its tokens): it may have
        left KV unwritten, so the KV cache forgets what finished sequences left (`PrefixCache.clear`); and only the
        step still in flight, if any, will record tokens, so the scheduler counts only its outputs as pending
        (`Scheduler.recover_from_failed_step`: derived here, not tracked per failure point). The caller ends the
        requests (`finish_requests`, as `LLM` aborts its call's); the engine then runs later requests as a fresh one
        would."""
        self.scheduler.recover_from_failed_step(None if self._in_flight is None else self._in_flight[0])
        if self.scheduler.kv.cache is not None:
            self.scheduler.kv.cache.clear()

    def _step(self) -> StepUpdates:
        batch = self.scheduler.schedule()
        if not batch.num_seqs:
            if self._in_flight is not None:  # what could run waits on the tokens in flight
                return self._collect()
            raise RuntimeError(
                "scheduler produced an empty step with work pending: "
                f"{len(self.scheduler.waiting)} waiting, {len(self.scheduler.running)} running, "
                f"{self.scheduler.kv.num_free_blocks} free KV blocks"
            )
        submitted = time.perf_counter()
        pending = self.executor.submit(batch) if self.async_scheduling else _Done(self.executor.execute(batch))
        # the step before (asynchronous: it ran while this one was prepared); where its collection fails, this
        # step is never in flight: dropped with it (`_after_failure`)
        updates = self.drain()
        self._in_flight = (batch, pending, submitted)
        return updates if self.async_scheduling else updates.extend(self._collect())

    def drain(self) -> StepUpdates:
        """Collect the step in flight, if any (a failure is handled as in `step`)."""
        if self._in_flight is None:
            return StepUpdates()
        try:
            return self._collect()
        except BaseException:
            self._after_failure()
            raise

    def _collect(self) -> StepUpdates:
        """The step in flight's updates; it is no longer in flight from the start, whether its tokens come or not."""
        batch, pending, submitted = self._in_flight
        self._in_flight = None
        output = pending.result()
        now = time.perf_counter()
        self.step_log.append(StepRecord(batch.num_tokens, batch.num_seqs,
                                        now - max(submitted, self._last_collected)))
        self._last_collected = now
        return self.scheduler.update_from_output(batch, output)

    def finish_requests(self, request_ids: list[str], reason: str, stop_reason: int | str | None = None) -> None:
        self.scheduler.finish_requests(request_ids, reason, stop_reason)
