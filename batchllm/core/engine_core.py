"""The engine loop body: schedule -> execute -> update. Torch-free; the runner is injected.

Writer of nothing but its own step counter and timing; all request state belongs to the scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from batchllm.core.scheduler import RequestUpdate, Scheduler
from batchllm.outputs import RunnerOutput, ScheduledBatch
from batchllm.request import Request


class Executor(Protocol):
    """Anything that runs a ScheduledBatch: the model runner, or a fake in unit tests."""

    def execute(self, batch: ScheduledBatch) -> RunnerOutput: ...


@dataclass
class StepRecord:
    num_tokens: int
    num_requests: int
    seconds: float


@dataclass
class EngineCore:
    scheduler: Scheduler
    executor: Executor
    step_log: list[StepRecord] = field(default_factory=list)
    """Tokens and time of every step (for tokens-per-step plots and stats)."""

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestUpdate]:
        batch = self.scheduler.schedule()
        if not batch.requests:
            raise RuntimeError(
                "scheduler produced an empty step with work pending: "
                f"{len(self.scheduler.waiting)} waiting, {len(self.scheduler.running)} running, "
                f"{self.scheduler.kv.num_free_blocks} free KV blocks"
            )
        start = time.perf_counter()
        output = self.executor.execute(batch)
        self.step_log.append(StepRecord(batch.num_tokens, len(batch.requests), time.perf_counter() - start))
        return self.scheduler.update_from_output(batch, output)

    def finish_requests(self, request_ids: list[str], reason: str, stop_reason: int | str | None = None) -> None:
        self.scheduler.finish_requests(request_ids, reason, stop_reason)
