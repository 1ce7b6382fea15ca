"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`) without giving up prefix sharing. Torch-free.

The logprob of prompt token j comes from the logits at position j - 1 (its *row*), so a prompt of
P tokens needs rows 0 .. P-2. Each row is computed by the request that computes that position's KV:

- a shared prefix of length L (a `Request` with `is_prefix`) computes rows 0 .. L-1 once, for all
  its members, when any member under it asks (`work_units.build_submission` gives the prefix node
  `prompt_logprobs` = the largest k below it). Its last row predicts the token *after* the prefix,
  which differs between members: that row's targets are the distinct next tokens of its members
  that ask (`fork_targets`), and each member picks its own;
- a request computes its own rows, from its fork point (0 without a prefix) to P-2, in whatever
  prefill chunks the scheduler gives it.

Invariants:
- Each row is asked of the runner exactly once: `Request.prompt_logprobs_requested` is a watermark
  written when the chunk holding the row is scheduled and never lowered. A preempted request
  recomputes its KV from 0 but asks for no logits again; a prefix released to unblock the batch
  and recomputed keeps the rows it already has (they live on the prefix's `Request`, which every
  member references as `parent`, for as long as any member does). No row is lost either: a
  scheduled step always runs and its output is always recorded (`record`), even when the request
  was preempted in the meantime.
- A member's rows (its ancestors' and its own) have all come back by the step that samples its
  first token: the prefix's steps come before the member forks, and steps are collected in order.
  `assemble` is called then, once (the first output token is recorded once), so the facade
  receives the whole list exactly once, whatever preemption happens later.
- Requests without prompt_logprobs (and prefixes with no such member) never get a spec: the runner
  computes no logits beyond the sampled rows for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from batchllm.outputs import PromptLogprobsRows, PromptLogprobsSpec, TokenLogprobs
from batchllm.request import Request


@dataclass(slots=True)
class RowLogprobs:
    """What one computed row left: its top tokens and the (logprob, rank) of each of its targets."""

    top_token_ids: list[int]
    top_logprobs: list[float]
    targets: dict[int, tuple[float, int]]


def spec_for_chunk(request: Request, start: int, num_new: int) -> PromptLogprobsSpec | None:
    """The rows among positions [start, start + num_new) that still need logits, or None; marks
    them requested. Only for requests (or prefixes) with `sampling_params.prompt_logprobs` set."""
    num_prompt = request.num_prompt_tokens
    last_row = num_prompt if request.is_prefix else num_prompt - 1  # rows end before this
    first = max(start, request.prompt_logprobs_requested)
    end = min(start + num_new, last_row)
    if first >= end:
        return None
    request.prompt_logprobs_requested = end
    prompt = request.prompt_token_ids
    targets: list[tuple[int, ...]] = [(int(prompt[p + 1]),) for p in range(first, min(end, num_prompt - 1))]
    if end == num_prompt:  # a prefix's last row: the token after it is each member's own
        targets.append(fork_targets(request))
    return PromptLogprobsSpec(request.sampling_params.prompt_logprobs, first - start, targets)


def fork_targets(prefix: Request) -> tuple[int, ...]:
    """The distinct tokens right after the prefix among its members that want prompt logprobs.
    Read when the prefix's last row is scheduled the first time: every member is still in
    `pending_members` then (members are admitted only once the prefix is READY)."""
    at = prefix.num_prompt_tokens
    return tuple(sorted({int(m.prompt_token_ids[at]) for m in prefix.pending_members
                         if m.sampling_params.prompt_logprobs is not None}))


def record(request: Request, spec: PromptLogprobsSpec, start_position: int, rows: PromptLogprobsRows) -> None:
    """Keep the rows a step computed for `request` (scheduled at `start_position` with `spec`)."""
    if request.prompt_logprob_rows is None:
        request.prompt_logprob_rows = {}
    first = start_position + spec.row_start
    for i, targets in enumerate(spec.targets):
        request.prompt_logprob_rows[first + i] = RowLogprobs(
            rows.top_token_ids[i], rows.top_logprobs[i],
            dict(zip(targets, zip(rows.target_logprobs[i], rows.target_ranks[i]))))


def assemble(request: Request) -> list[TokenLogprobs]:
    """Prompt logprobs of tokens 1 .. P-1 of the request's prompt, from its ancestors' rows and its
    own, each with the request's own top k; drops the request's own rows (nothing else reads them)."""
    chain = [request]
    while chain[-1].parent is not None:
        chain.append(chain[-1].parent)
    chain.reverse()  # outermost prefix first; each node holds rows [its fork point, its end)
    k = request.sampling_params.prompt_logprobs
    prompt = request.prompt_token_ids
    out: list[TokenLogprobs] = []
    for node in chain:
        end = node.num_prompt_tokens if node.is_prefix else node.num_prompt_tokens - 1
        rows = node.prompt_logprob_rows or {}
        for p in range(node.fork_point, end):
            row = rows.get(p)
            token = int(prompt[p + 1])
            if row is None or token not in row.targets:
                raise RuntimeError(f"{request.request_id}: prompt logprobs of position {p + 1} were never "
                                   f"computed (row {p} of {node.request_id})")
            logprob, rank = row.targets[token]
            out.append(TokenLogprobs(logprob, rank, row.top_token_ids[:k], row.top_logprobs[:k]))
    request.prompt_logprob_rows = None
    return out
