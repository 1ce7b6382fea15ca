"""What a scheduler step did, as the output side reads it: `StepUpdates` (one per step, the step's tokens as
columns), `RequestUpdate` (one token's, as an object) and the run's `SchedulerStats`. Plain data: the scheduler
(`core/scheduler.py`) is the only writer of these, and a step's updates are read only after it hands them over."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from batchllm.outputs import TokenLogprobs


@dataclass(slots=True)  # one per sampled token
class RequestUpdate:
    """What one step did to one request, for the output side (detokenizing, stop strings)."""

    request_id: str
    new_token_id: int
    logprobs: TokenLogprobs | None
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_logprobs: list[TokenLogprobs] | None = None
    """With the request's first output token, when it asked for prompt logprobs: those of prompt
    tokens 1 .. P-1, in order (`core/prompt_logprobs.py`); given exactly once."""


@dataclass(slots=True, eq=False)  # one per step
class StepUpdates:
    """What one step did to its requests, for the output side, as columns in batch order: each token
    recorded (a request that ended while the step was in flight has none), and, by request id, what
    few of them carry: how those that ended with it ended, logprobs where asked (the runner's dict, which
    may name a dropped token's request too), prompt logprobs with a request's first token. Iterating gives
    one RequestUpdate per token (tests, and callers that want objects); equal to a list of those."""

    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    ended: dict[str, tuple[str, int | str | None]] = field(default_factory=dict)
    """(finish reason, stop reason) of the requests this step's token ended."""
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[RequestUpdate]:
        """One RequestUpdate per token, in batch order."""
        for request_id, token in zip(self.request_ids, self.token_ids):
            yield self.update(request_id, token)

    def __len__(self) -> int:
        """Tokens recorded (the output tokens the step added)."""
        return len(self.token_ids)

    def update(self, request_id: str, token: int) -> RequestUpdate:
        """The RequestUpdate of one of the step's tokens, `request_id`'s."""
        finish_reason, stop_reason = self.ended.get(request_id, (None, None))
        return RequestUpdate(request_id, token, self.logprobs.get(request_id), finish_reason, stop_reason,
                             self.prompt_logprobs.get(request_id))

    def __eq__(self, other: object) -> bool:
        """Equal to the list of its RequestUpdates (or to updates holding the same ones)."""
        return list(self) == list(other) if isinstance(other, StepUpdates | list) else NotImplemented

    def extend(self, later: StepUpdates) -> StepUpdates:
        """Append a later step's updates (a request has at most one token in flight per step, and
        none after it ended); returns self."""
        self.request_ids += later.request_ids
        self.token_ids += later.token_ids
        self.ended.update(later.ended)
        self.logprobs = {**self.logprobs, **later.logprobs} if later.logprobs else self.logprobs
        self.prompt_logprobs.update(later.prompt_logprobs)
        return self


@dataclass
class SchedulerStats:
    num_steps: int = 0
    prefill_tokens: int = 0
    """Tokens whose KV was computed from a prompt or prefix (or recomputed after preemption)."""
    recomputed_tokens: int = 0
    """Of prefill_tokens, those computed again after preemption or a prefix's release freed their KV, and the outputs
    such a request computes as prefill: what sharing's saving leaves out."""
    kept_prefill_tokens: int = 0
    """Prompt tokens whose KV an earlier sequence left (the prefix cache), taken instead of computed: a kept
    prefix's length for each request or shared prefix attached to it (`Scheduler._kept_prefix_for`)."""
    decode_tokens: int = 0
    attended_keys: int = 0
    """Over every token computed (prefill and decode), the keys its attention reads: its position + 1
    (causal; a member's shared prefix counted as its own keys; a sliding window, which reads fewer, is
    not taken into account). 4 x heads x head dim x layers times this is the run's attention FLOPs
    (`bench.attention_flops`)."""
    num_preemptions: int = 0
    num_prefix_releases: int = 0
    """Shared prefixes released before their members finished, to unblock the batch."""
    num_block_copies: int = 0
    num_prefixes_kept_whole: int = 0
    """Shared prefixes whose whole KV an earlier sequence left: ready at admission, computing nothing."""
    peak_used_blocks: int = 0
