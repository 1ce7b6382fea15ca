"""Per-request logits processing before sampling: grammar masks, allowed tokens, bad words, logit
bias, and repetition / frequency / presence penalties, with vLLM's semantics and order.

Only rows whose `SamplingSpec` asks for one of these are touched; a step without any costs
nothing (the sampler does not call in here). The inputs are plain ints: each request's output
tokens come from `OutputHistory`, which the runner fills from the tokens it computes (a request
with a history is never scheduled on a placeholder, so its last token is known on the host).

Order (vLLM v1): grammar mask -> allowed_token_ids -> bad words -> (min_tokens bans, in the sampler)
-> logit_bias -> repetition penalty -> frequency penalty -> presence penalty. Masks set -inf, which
every later step keeps (-inf / p and -inf * p stay -inf).
"""

from __future__ import annotations

import torch

from batchllm.layers.transfer import to_device
from batchllm.outputs import PLACEHOLDER_TOKEN_ID, SamplingSpec


class OutputHistory:
    """One request's output tokens, as the runner saw them computed. Writer: the runner."""

    __slots__ = ("num_prompt_tokens", "outputs")

    def __init__(self, num_prompt_tokens: int) -> None:
        self.num_prompt_tokens = num_prompt_tokens
        self.outputs: list[int] = []

    def record(self, start_position: int, token_ids: list[int]) -> None:
        """Tokens computed at positions start_position...; those past the prompt are outputs.
        A recompute (preemption) sends outputs already recorded again: they are skipped."""
        first = max(self.num_prompt_tokens - start_position, 0)
        for offset in range(first, len(token_ids)):
            index = start_position + offset - self.num_prompt_tokens
            if index < len(self.outputs):
                continue
            token = token_ids[offset]
            if index > len(self.outputs) or token == PLACEHOLDER_TOKEN_ID:
                raise RuntimeError(f"output {index} reached the runner out of order or as a placeholder "
                                   f"(it has {len(self.outputs)}): a request with penalties or a grammar "
                                   "must be scheduled with its tokens known")
            self.outputs.append(token)


def banned_by_bad_words(bad_words: tuple[tuple[int, ...], ...], outputs: list[int]) -> list[int]:
    """Last tokens of the bad words whose other tokens are the outputs' tail (vLLM's rule)."""
    banned = []
    for word in bad_words:
        head = len(word) - 1
        if head == 0 or (len(outputs) >= head and tuple(outputs[-head:]) == word[:-1]):
            banned.append(word[-1])
    return banned


def apply_adjustments(
    logits: torch.Tensor,  # [n, vocab] fp32, modified in place
    specs: list[SamplingSpec],
    histories: list[OutputHistory | None],
) -> None:
    """Allowed tokens, bad words, logit bias and penalties of the rows whose spec has `adjust`."""
    n, vocab = logits.shape
    device = logits.device
    masked: list[tuple[int, int]] = []  # (row, token) set to -inf
    allowed: list[tuple[int, int]] = []
    allowed_rows: list[int] = []
    bias: list[tuple[int, int]] = []
    bias_values: list[float] = []
    penalised: list[int] = []
    for i, spec in enumerate(specs):
        adjust = spec.adjust
        if adjust is None:
            continue
        outputs = histories[i].outputs if histories[i] is not None else []
        if adjust.allowed_token_ids is not None:
            allowed_rows.append(i)
            allowed.extend((i, t) for t in adjust.allowed_token_ids if t < vocab)
        masked.extend((i, t) for t in banned_by_bad_words(adjust.bad_words, outputs) if t < vocab)
        for token, value in adjust.logit_bias:
            if token < vocab:
                bias.append((i, token))
                bias_values.append(value)
        if adjust.presence_penalty or adjust.frequency_penalty or adjust.repetition_penalty != 1.0:
            penalised.append(i)
    if allowed_rows:
        keep = torch.zeros((n, vocab), dtype=torch.bool, device=device)
        where = to_device(allowed, device, torch.int64).reshape(-1, 2)
        keep[where[:, 0], where[:, 1]] = True
        rows = to_device(allowed_rows, device, torch.int64)
        logits[rows] = logits[rows].masked_fill(~keep[rows], float("-inf"))
    if masked:
        where = to_device(masked, device, torch.int64)
        logits[where[:, 0], where[:, 1]] = float("-inf")
    if bias:
        where = to_device(bias, device, torch.int64)
        logits[where[:, 0], where[:, 1]] += to_device(bias_values, device, torch.float32)
    if penalised:
        _apply_penalties(logits, penalised, [specs[i].adjust for i in penalised],
                         [histories[i].outputs if histories[i] is not None else [] for i in penalised])


def rows_kept_to_allowed_tokens(specs: list[SamplingSpec]) -> list[int]:
    """Rows whose spec has allowed_token_ids and no grammar (a grammar row's fallback is its grammar's:
    `sampler`): those `keep_an_allowed_token` guards."""
    return [i for i, s in enumerate(specs)
            if s.adjust is not None and s.adjust.allowed_token_ids is not None and s.grammar is None]


def keep_an_allowed_token(logits: torch.Tensor, before: torch.Tensor, rows: list[int],
                          specs: list[SamplingSpec]) -> None:
    """Invariant: a row with allowed_token_ids samples one of them. Rows `rows` (`rows_kept_to_allowed_tokens`) that
    the bans left without any token (min_tokens' stop tokens, bad words: validation refuses the requests where that
    is certain, `SamplingParams.check_for_model`; a bad word of several tokens bans by context) take `before`, their
    logits ahead of the bans [len(rows), vocab], masked to their allowed tokens, where vLLM's sampler answers
    token 0 (the argmax of a row of -inf). Other rows are left as they are."""
    vocab = logits.shape[1]
    device = logits.device
    keep = torch.zeros((len(rows), vocab), dtype=torch.bool, device=device)
    where = to_device([(j, t) for j, i in enumerate(rows) for t in specs[i].adjust.allowed_token_ids if t < vocab],
                      device, torch.int64).reshape(-1, 2)
    keep[where[:, 0], where[:, 1]] = True
    index = to_device(rows, device, torch.int64)
    now = logits[index]
    fallback = before.masked_fill(~keep, float("-inf"))
    logits[index] = torch.where(torch.isneginf(now).all(dim=-1, keepdim=True), fallback, now)


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] float32: how often each token occurs in each row."""
    width = max((len(r) for r in rows), default=0)
    counts = torch.zeros((len(rows), vocab + 1), dtype=torch.float32, device=device)
    if width:
        padded = to_device([r + [vocab] * (width - len(r)) for r in rows], device, torch.int64)
        counts.scatter_add_(1, padded, torch.ones(padded.shape, dtype=torch.float32, device=device))
    return counts[:, :vocab]


def _apply_penalties(logits: torch.Tensor, rows: list[int], adjusts: list, outputs: list[list[int]]) -> None:
    """vLLM's penalties: repetition over prompt + outputs (positive logits / p, others * p), then
    frequency (- f * count) and presence (- p * [count > 0]) over the outputs."""
    vocab, device = logits.shape[1], logits.device
    index = to_device(rows, device, torch.int64)
    x = logits[index]
    output_counts = _token_counts(outputs, vocab, device)
    repetition = [a.repetition_penalty for a in adjusts]
    if any(r != 1.0 for r in repetition):
        seen = (output_counts + _token_counts([list(a.prompt_token_ids) for a in adjusts], vocab, device)) > 0
        r = to_device(repetition, device, torch.float32)[:, None].expand_as(x)
        r = torch.where(seen, r, torch.ones_like(r))
        x = torch.where(x > 0, x / r, x * r)
    frequency = to_device([a.frequency_penalty for a in adjusts], device, torch.float32)[:, None]
    presence = to_device([a.presence_penalty for a in adjusts], device, torch.float32)[:, None]
    x = x - frequency * output_counts - presence * (output_counts > 0).float()
    logits[index] = x


def apply_grammar_bitmask(
    logits: torch.Tensor,  # [n, vocab] fp32, modified in place
    bitmask: torch.Tensor,  # [m, ceil(vocab / 32)] int32 on the logits' device
    rows: torch.Tensor,  # [m] int64: the row of logits each bitmask row constrains
) -> None:
    """Set -inf where a constrained row's bit is 0 (xgrammar's layout: bit j of word w allows token
    32 * w + j)."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().reshape(bitmask.shape[0], -1)[:, :vocab]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
