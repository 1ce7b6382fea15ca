"""The only things that cross the scheduler/runner seam: plain dataclasses of ints, floats and lists.

The scheduler emits a `ScheduledBatch`; the runner answers with a `RunnerOutput`. No tensors and no
references to scheduler state travel here, so either side can be replaced or run elsewhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

PLACEHOLDER_TOKEN_ID = -1
"""Stands for a token that the previous step samples and the runner still holds on the device
(asynchronous scheduling): only ever the last token of a ScheduledRequest's `token_ids`."""


@dataclass(frozen=True)
class SamplingSpec:
    """How the runner samples one request's next token this step."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    seed: int | None
    num_logprobs: int | None
    logprob_token_ids: tuple[int, ...] = ()
    """The tokens whose logprobs are returned in place of the top `num_logprobs` (as many), where named."""
    banned_token_ids: tuple[int, ...] = ()
    """Token ids that must not be sampled this step (EOS/stop ids while below min_tokens); ids outside the
    vocabulary may be among them (stop_token_ids are any integers) and are skipped by the sampler."""
    adjust: LogitsAdjust | None = None
    """Penalties and biases (`layers/logits_processors.py`); None for the plain request, which
    costs nothing extra."""
    grammar: tuple[str, str] | None = None
    """Structured output: (kind, canonical text) of the grammar the token must keep to
    (`batchllm/structured.py`); None: unconstrained."""
    num_prompt_tokens: int = 0
    """Where the outputs start: with `adjust` or `grammar` the runner keeps the request's output
    tokens from the positions it computes (such a request is never scheduled on a placeholder);
    0 without either (unused then: requests of the same settings have equal specs, which the
    scheduler shares)."""

    @functools.cached_property  # (these two are read for every sampling row of every step; fields never change)
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @functools.cached_property
    def needs_history(self) -> bool:
        """The runner must know the request's output tokens to sample it."""
        return self.adjust is not None or self.grammar is not None


@dataclass(frozen=True)
class LogitsAdjust:
    """One request's penalties and biases, with vLLM's semantics (applied in this order after the
    grammar mask: allowed_token_ids, bad_words, logit_bias, then repetition, frequency and
    presence penalties)."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    bad_words: tuple[tuple[int, ...], ...] = ()
    """Token sequences whose last token is banned when the outputs end with the others."""
    prompt_token_ids: tuple[int, ...] = ()
    """Only when repetition_penalty != 1 (it counts prompt tokens too)."""


@dataclass(slots=True)  # ~1,000 are built per step; slots build 5x faster than a frozen dataclass
class ScheduledRequest:
    request_id: str
    token_ids: list[int]
    """Tokens whose KV this step computes, at positions start_position .. start_position+len-1; the
    last may be PLACEHOLDER_TOKEN_ID (the token this request samples in the step before)."""
    start_position: int
    block_ids: list[int]
    """New entries of the request's block table, to be placed from index `block_table_start`.
    The runner keeps each request's table between steps; most decode steps send no entries."""
    block_table_start: int
    sampling: SamplingSpec | None
    """Set iff this step reaches the request's last token, so a new token is sampled."""
    shared_prefixes: tuple[tuple[str, int], ...] = ()
    """The shared prefixes above this request, outermost first, as (prefix id, length): every
    request under the same prefix holds the same KV at its first `length` positions (the attention
    may read them once for all of them)."""
    prompt_logprobs: PromptLogprobsSpec | None = None
    """Positions of this step whose LM-head logits give prompt logprobs; None (nearly always): no
    logits beyond the sampled row."""


@dataclass(frozen=True)
class PromptLogprobsSpec:
    """Prompt logprobs wanted from one ScheduledRequest's step: rows `row_start ..
    row_start + len(targets) - 1` of its `token_ids` (consecutive positions); for each row, the
    top `num_top` logprobs and the logprob and rank of each of its `targets` (the prompt token that
    follows the row; at a shared prefix's last row, the distinct next tokens of its members)."""

    num_top: int
    row_start: int
    targets: list[tuple[int, ...]]

    @property
    def num_rows(self) -> int:
        return len(self.targets)


@dataclass(slots=True)  # one per step: the running decodes, as columns (no object per request)
class DecodeRows:
    """A step's running decodes as columns, one entry per request, in batch order: they are the
    batch's first rows, before its `entries`. Each computes one token, the last of its sequence
    (PLACEHOLDER_TOKEN_ID where that token is pending), at `start_positions[i]`, and samples; none
    asks for prompt logprobs (a decode is past its prompt). The scheduler fills the columns in one
    pass over the decodes it chose and the runner reads them as arrays (`ModelRunner._host_inputs`);
    `scheduled()` gives the same rows as ScheduledRequests (tests, the tensor-parallel channel)."""

    request_ids: list[str]
    start_positions: list[int]
    token_ids: list[int]
    """One per row: the token computed (its last output, or PLACEHOLDER_TOKEN_ID)."""
    samplings: list[SamplingSpec]
    shared_prefixes: list[tuple[tuple[str, int], ...]]
    """As ScheduledRequest.shared_prefixes, per row."""
    table_lengths: list[int]
    """Entries of each row's block table once this step's new ones are placed (the runner's table must
    hold exactly as many)."""
    new_blocks: list[tuple[int, list[int]]]
    """(row, new entries) of the rows whose table grows this step (about one decode in block_size),
    placed from `table_lengths[row] - len(entries)`; every other row sends none."""

    def scheduled(self) -> list[ScheduledRequest]:
        """The rows as ScheduledRequests, in order (what they were before they became columns)."""
        grown = dict(self.new_blocks)
        return [ScheduledRequest(rid, [token], start, grown.get(i, []), length - len(grown.get(i, ())), spec,
                                 prefixes)
                for i, (rid, start, token, spec, prefixes, length) in enumerate(zip(
                    self.request_ids, self.start_positions, self.token_ids, self.samplings, self.shared_prefixes,
                    self.table_lengths))]


@dataclass(frozen=True)
class ScheduledBatch:
    """One step: its running decodes as columns (`decodes`), then its other entries (prefill chunks,
    and a decode admitted this step), in that order; `requests` is every row as a ScheduledRequest."""

    entries: list[ScheduledRequest]
    """The rows after the decode rows (all of them when `decodes` is None)."""
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests (and shared prefixes) finished or aborted since the previous batch: the runner
    drops their state."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) KV blocks to copy, all layers, before this step's forward (copy-on-write)."""
    num_sampling_rows: int | None = None
    """How many requests have `sampling` set (the scheduler counts them as it builds the batch; None:
    not counted): the tokens its output must hold."""
    decodes: DecodeRows | None = None
    """The running decodes, the batch's first rows (None: none, or a batch made of ScheduledRequests
    alone, as tests and the tensor-parallel followers make them)."""

    @property
    def num_decode_rows(self) -> int:
        """Rows in `decodes` (0 without)."""
        return 0 if self.decodes is None else len(self.decodes.request_ids)

    @property
    def num_seqs(self) -> int:
        """Rows (requests) of the step."""
        return self.num_decode_rows + len(self.entries)

    @functools.cached_property  # not on the hot path: tests, the tensor-parallel channel, prompt logprobs
    def requests(self) -> list[ScheduledRequest]:
        """Every row as a ScheduledRequest, in batch order (the decode rows first)."""
        return self.entries if self.decodes is None else self.decodes.scheduled() + self.entries

    @functools.cached_property  # read by the scheduler's statistics and the step log; rows never change
    def num_tokens(self) -> int:
        return self.num_decode_rows + sum(len(r.token_ids) for r in self.entries)


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities (of the model's raw distribution) around one sampled token."""

    sampled_logprob: float
    sampled_rank: int
    """1 + the number of tokens strictly more likely than the sampled one."""
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class PromptLogprobsRows:
    """The answer to a PromptLogprobsSpec, row by row (logprobs of the raw model distribution)."""

    top_token_ids: list[list[int]]  # [rows][num_top]
    top_logprobs: list[list[float]]  # [rows][num_top]
    target_logprobs: list[list[float]]  # [rows][len(targets[row])]
    target_ranks: list[list[int]]
    """1 + the number of tokens strictly more likely than the target (as TokenLogprobs.sampled_rank)."""


@dataclass(frozen=True)
class RunnerOutput:
    sampled_token_ids: dict[str, int]
    """One new token for every request whose ScheduledRequest.sampling was set."""
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    """For requests that asked for logprobs."""
    prompt_logprobs: dict[str, PromptLogprobsRows] = field(default_factory=dict)
    """For the ScheduledRequests of the step that carried a PromptLogprobsSpec."""


# vLLM's `from vllm.outputs import RequestOutput, CompletionOutput` ported by renaming the package: the user-facing
# results live in `batchllm.request_output` (and `batchllm`); named here too, for that import.
from batchllm.request_output import CompletionOutput, Logprob, RequestOutput  # noqa: E402, F401
