"""Per-request engine state. Written by the scheduler (`core/scheduler.py`; the prompt-logprob fields through
the functions of `core/prompt_logprobs.py`, which only the scheduler calls), and by two others on fields the
scheduler only reads: before submission, the plan's work units set `parent` (`core/work_units.py`; `LLM`
clears it before planning a submission again), and the admission policy sets `projected_blocks`
(`core/policies.py`).

Invariant: `num_computed_tokens <= num_tokens`; the tokens in `[num_computed_tokens, num_tokens)` are
the ones whose KV is still missing. A fresh request starts at 0 (prefill), a decoding request is one
token behind (the token it just sampled), and preemption by recompute simply resets the counter to 0
while keeping the output tokens: there are no prefill/decode modes.

The scheduler advances `num_computed_tokens` when it schedules tokens, not when their step ends.
With asynchronous scheduling the next step is scheduled while the previous one runs: a token being
sampled on the device counts in `num_tokens` (`num_pending_tokens`) before its value is known, and
is scheduled as `PLACEHOLDER_TOKEN_ID`, which the runner fills from the step that samples it.

A shared prefix is a `Request` too (`is_prefix=True`): its prompt is the prefix, it is prefilled
and never samples. Members (requests or nested prefixes) name it as `parent`; a member forks from
it once it is READY, which sets the member's counter to the prefix length in one move. The prefix
holds its KV blocks until its last member finishes (`num_live_members` reaches 0).
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field

from batchllm.outputs import PLACEHOLDER_TOKEN_ID
from batchllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    READY = "ready"
    """A shared prefix whose KV is complete and held for its members."""
    FINISHED = "finished"


@dataclass(eq=False)  # identity: requests live in queues and are removed by identity
class Request:
    request_id: str
    prompt_token_ids: list[int]  # or a 1-D numpy integer array
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    """Token ids that end the request unless ignore_eos (from the tokenizer and generation_config)."""
    model_eos_token_id: int | None = None
    """The tokenizer's EOS: ending on it gives stop_reason None; the other EOS ids (generation_config's,
    config.json's) give their id, as vLLM adds them to stop_token_ids."""
    arrival_index: int = 0
    """Position in the batch; breaks ties in ordering policies."""
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    """Tokens sampled by scheduled steps whose results have not come back: 0 or 1 when a step is
    scheduled (a decode may be scheduled on a placeholder), up to 2 right after."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    """'stop' (EOS, stop token or stop string), 'length' (max_tokens or context) or 'abort'."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request, if any."""
    parent: Request | None = field(default=None, repr=False)
    """The shared prefix this request forks from (None: computes its prompt from position 0)."""
    is_prefix: bool = False
    may_reuse_kept_kv: bool = False
    """When it was added, the KV cache held KV of its first full blocks past its fork point, which it takes when
    admitted (`Scheduler._take_kept_kv`)."""
    num_computed_before_release: int = 0
    """The most tokens it had computed when preemption (or, a prefix, its release) freed its KV: its prefill below
    this is computed again (`SchedulerStats.recomputed_tokens`)."""
    kept_tokens: int = 0
    """Of its prompt past its fork point (a prefix's: of the prefix), the tokens whose KV it took from the cache
    at its last admission instead of computing them."""
    num_live_members: int = 0
    """Prefix only: members not yet finished."""
    pending_members: list[Request] = field(default_factory=list, repr=False)
    """Prefix only: members waiting for this prefix to become READY."""
    projected_blocks: int = 0
    """KV blocks the admission policy reserved for this request while it is admitted."""
    num_blocks_sent: int = 0
    """Entries of its block table the runner already has (0 after the table is freed)."""
    cached_sampling_spec: object = field(default=None, repr=False)
    """The runner-side sampling settings, built once the request is past min_tokens."""
    max_output_tokens: int = 0
    """Outputs after which it ends with 'length': max_tokens, or fewer where the context
    (max_model_len) ends first; without max_tokens, where the context or the whole KV cache ends
    (`Scheduler._max_total_tokens`). Set by the scheduler when the request is added."""
    prompt_logprobs_requested: int = 0
    """Prompt logprobs only (`core/prompt_logprobs.py`): the rows (positions) below this one have
    been asked of the runner. Never lowered, so preemption and prefix release never ask twice."""
    prompt_logprob_rows: dict | None = field(default=None, repr=False)
    """Prompt logprobs only: position -> `RowLogprobs`, as the steps that computed them came back."""

    @functools.cached_property
    def needs_host_tokens(self) -> bool:
        """Penalties, biases or a grammar: the runner reads this request's last token on the host,
        so it is never scheduled on a placeholder (it waits for its token instead)."""
        sp = self.sampling_params
        return sp.has_adjustments or sp.grammar_key is not None

    @functools.cached_property
    def stop_token_set(self) -> frozenset[int]:
        """Every token id that may end the request on sight (its EOS ids unless ignore_eos, its
        stop_token_ids): any other token never ends it before max_output_tokens."""
        sp = self.sampling_params
        return frozenset(sp.stop_token_ids) | (frozenset() if sp.ignore_eos else frozenset(self.eos_token_ids))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt + known outputs + pending outputs: the sequence the scheduler schedules."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        """Outputs whose values have come back (pending ones not counted)."""
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of prompt + output, as a list (prompts may be numpy
        int32 arrays: the CLI keeps millions of prompts compact); pending positions hold
        PLACEHOLDER_TOKEN_ID."""
        n_prompt = len(self.prompt_token_ids)
        known = n_prompt + len(self.output_token_ids)
        if start >= known:  # (a decode on its pending token, every step of asynchronous scheduling)
            return [PLACEHOLDER_TOKEN_ID] * (end - start)
        if end > known:
            return self.token_ids(start, known) + [PLACEHOLDER_TOKEN_ID] * (end - known)
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        head = self.prompt_token_ids[start:min(end, n_prompt)]
        head = head.tolist() if hasattr(head, "tolist") else list(head)
        return head if end <= n_prompt else head + self.output_token_ids[: end - n_prompt]

    @property
    def fork_point(self) -> int:
        """Tokens a member gets from its parent without computing them."""
        return self.parent.num_prompt_tokens if self.parent is not None else 0

    @functools.cached_property
    def shared_prefixes(self) -> tuple[tuple[str, int], ...]:
        """(id, length) of every prefix above this request, outermost first: its first `length`
        positions hold that prefix's KV (full blocks shared, the partial block copied on write).
        Read once the request is submitted; `parent` never changes after that, so it is kept."""
        chain = []
        prefix = self.parent
        while prefix is not None:
            chain.append((prefix.request_id, prefix.num_prompt_tokens))
            prefix = prefix.parent
        return tuple(reversed(chain))
