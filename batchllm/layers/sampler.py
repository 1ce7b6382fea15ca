"""Token sampling for one step: greedy, temperature, min-p, top-k, top-p, per-request seeds, logprobs.

Order of operations (as vLLM): grammar mask -> banned tokens -> allowed tokens, bad words, logit
bias, penalties (`logits_processors.py`) -> temperature -> min-p -> top-k -> top-p -> sample.
Sampling draws exponential noise E and takes argmax(p / E), which samples from p exactly. A seeded
request's noise is a hash of its seed and the position of the token it samples (`seeded_noise.py`:
one call for all seeded rows), so its tokens do not depend on what else is in the batch;
unseeded requests share the engine's generator.
Log-probabilities are those of the model's distribution under the grammar's mask (as vLLM's, whose mask is
applied before its sampler: a structured request's alternatives are what its grammar allows), before any other
processing. Where min_tokens, allowed_token_ids or bad_words ban the only tokens a grammar allows, the grammar wins;
without a grammar, where min_tokens or bad_words ban every token allowed_token_ids allows, those tokens are sampled
as before the bans (`keep_an_allowed_token`): a token outside allowed_token_ids is never sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from batchllm.layers.logits_processors import (
    OutputHistory,
    apply_adjustments,
    apply_grammar_bitmask,
    keep_an_allowed_token,
    rows_kept_to_allowed_tokens,
)
from batchllm.layers.seeded_noise import seeded_exponential
from batchllm.layers.transfer import to_device
from batchllm.outputs import SamplingSpec, TokenLogprobs

LOGITS_PER_SLICE = 1 << 26
"""The most logits (rows x vocabulary) one slice of a step's sampling rows (`row_slices`) or prompt-logprob rows
puts through the LM head and the steps after it: 256 MiB per fp32 copy, so a step's working memory is bounded
whatever its row count. In one piece, a step of ~8,000 sampling rows of a 128K vocabulary with top-p and logprobs
asked for 2.3 GiB more beyond ~6 GiB already held, and ran out of memory on an H100 (Llama-3.1-8B shape, 12,000
short prompts; docs/benchmarks.md, session 47)."""

FORBIDDEN_LOGPROB = -9999.0
"""The logprob of a token a request's grammar forbids (its mask makes it -inf), as vLLM's server writes it."""


@dataclass
class SampledTokens:
    """One step's sampled tokens, and the logprobs of the rows that asked for them, as tensors:
    on the device until `to_host` (which does not wait for the device) and `lists`."""

    tokens: torch.Tensor  # [n] int64
    logprob_rows: list[int] = field(default_factory=list)
    """Rows that asked for logprobs, and how many top tokens each wants."""
    num_top: list[int] = field(default_factory=list)
    sampled_logprob: torch.Tensor | None = None  # [m] fp32
    rank: torch.Tensor | None = None  # [m] int64
    top_logprobs: torch.Tensor | None = None  # [m, max(num_top)] fp32
    top_ids: torch.Tensor | None = None  # [m, max(num_top)] int64

    def to_host(self) -> SampledTokens:
        """Copies into pinned host memory, queued behind the sampling kernels (non-blocking on
        CUDA): read them once the stream has reached this point."""
        def copy(t):
            return None if t is None else t.to("cpu", non_blocking=t.is_cuda)
        return SampledTokens(copy(self.tokens), self.logprob_rows, self.num_top, copy(self.sampled_logprob),
                             copy(self.rank), copy(self.top_logprobs), copy(self.top_ids))

    def lists(self) -> tuple[list[int], list[TokenLogprobs | None]]:
        tokens = self.tokens.tolist()
        results: list[TokenLogprobs | None] = [None] * len(tokens)
        if self.logprob_rows:
            sampled, ranks = self.sampled_logprob.tolist(), self.rank.tolist()
            top_values, top_ids = self.top_logprobs.tolist(), self.top_ids.tolist()
            for j, (row, k) in enumerate(zip(self.logprob_rows, self.num_top)):
                results[row] = TokenLogprobs(
                    sampled_logprob=sampled[j], sampled_rank=ranks[j],
                    top_token_ids=top_ids[j][:k], top_logprobs=top_values[j][:k],
                )
        return tokens, results


def row_slices(num_rows: int, vocab_size: int) -> list[tuple[int, int]]:
    """[begin, end) ranges of consecutive rows, in order, each of at most LOGITS_PER_SLICE logits (one row at least),
    covering num_rows rows (none for none)."""
    per_slice = max(1, LOGITS_PER_SLICE // vocab_size)
    return [(begin, min(begin + per_slice, num_rows)) for begin in range(0, num_rows, per_slice)]


def joined(parts: list[SampledTokens], starts: list[int]) -> SampledTokens:
    """The SampledTokens of consecutive slices of rows as one (`starts`: each slice's first row): tokens in row
    order, logprob rows renumbered; top-k tables of different widths are padded to the widest (with zeros that
    `SampledTokens.lists` cuts off by each row's num_top)."""
    if len(parts) == 1 and starts[0] == 0:
        return parts[0]
    tokens = torch.cat([p.tokens for p in parts])
    with_logprobs = [(p, start) for p, start in zip(parts, starts) if p.logprob_rows]
    if not with_logprobs:
        return SampledTokens(tokens)
    width = max(p.top_ids.shape[1] for p, _ in with_logprobs)

    def stacked(name: str) -> torch.Tensor:
        tables = [getattr(p, name) for p, _ in with_logprobs]
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) if t.dim() == 2 else t for t in tables])
    return SampledTokens(tokens, [start + row for p, start in with_logprobs for row in p.logprob_rows],
                         [k for p, _ in with_logprobs for k in p.num_top], sampled_logprob=stacked("sampled_logprob"),
                         rank=stacked("rank"), top_logprobs=stacked("top_logprobs"), top_ids=stacked("top_ids"))


def sample_on_device(
    logits: torch.Tensor,  # [n, vocab_size]
    specs: list[SamplingSpec],
    positions: list[int] | None,
    default_generator: torch.Generator,
    histories: list[OutputHistory | None] | None = None,
    grammar_mask: tuple[torch.Tensor, torch.Tensor] | None = None,
    uniform: SamplingSpec | None = None,
) -> SampledTokens:
    """Sample one token per row and, where asked for, its logprobs, without reading anything back:
    no step of it waits for the device (`SampledTokens.lists` reads them).

    positions: per row, the position of the token it samples (where a seeded row's noise comes
    from); None where no row is both seeded and non-greedy.
    histories: each row's output tokens, where its spec has `adjust` (`logits_processors.py`);
    grammar_mask: (bitmask [m, words] int32, rows [m] int64) on the device, for structured rows.
    uniform: the one spec object every row holds, where the caller knows it (`model_runner._uniform`): the
    tests of the rows' settings below then read it once."""
    vocab = logits.shape[1]
    device = logits.device
    kinds = specs if uniform is None else (uniform,)  # the settings to test: every row's, or the one they share
    logprob_rows = ([i for i, s in enumerate(specs) if s.num_logprobs is not None]
                    if any(s.num_logprobs is not None for s in kinds) else [])
    adjusted = histories is not None and any(s.adjust is not None for s in kinds)
    if (not logprob_rows and grammar_mask is None and not adjusted
            and all(s.is_greedy and not s.banned_token_ids for s in kinds)):
        # the common batch case: argmax in the model's dtype (exact: bf16/fp16 -> fp32 is lossless),
        # with no fp32 copy of the [n, vocab] logits
        return SampledTokens(logits.argmax(dim=-1))
    logits = logits.to(torch.float32, copy=True)  # (changed in place below)
    if grammar_mask is not None:
        apply_grammar_bitmask(logits, *grammar_mask)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if logprob_rows else None
    if raw_logprobs is not None and grammar_mask is not None:
        raw_logprobs.clamp_(min=FORBIDDEN_LOGPROB)  # (JSON has no -inf: a forbidden token reads as in vLLM)
    _apply_bans(logits, specs, histories if adjusted else None, grammar_mask)
    tokens = _greedy_and_drawn(logits, specs, positions, default_generator)
    if not logprob_rows:
        return SampledTokens(tokens)
    num_top = [min(specs[i].num_logprobs, vocab) for i in logprob_rows]
    rows = to_device(logprob_rows, device, torch.int64)
    raw = raw_logprobs[rows]
    sampled = raw.gather(1, tokens[rows, None])  # [m, 1]
    top_values, top_ids = torch.topk(raw, max(num_top), dim=-1)
    named = [(j, specs[i].logprob_token_ids) for j, i in enumerate(logprob_rows) if specs[i].logprob_token_ids]
    if named:
        top_values, top_ids = _with_named_tokens(raw, top_values, top_ids, named)
    return SampledTokens(
        tokens, logprob_rows, num_top,
        sampled_logprob=sampled[:, 0], rank=rank_among(raw, sampled),
        top_logprobs=top_values, top_ids=top_ids,
    )


def _apply_bans(logits: torch.Tensor, specs: list[SamplingSpec], histories: list[OutputHistory | None] | None,
                grammar_mask: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Ban min_tokens' stop tokens (`banned_token_ids`) and apply the rows' adjustments (histories: None where no
    row has any), in place on fp32 `logits` already under the grammar's mask. Invariant: a row the bans leave no
    token keeps one it may take: a grammar row what its grammar allows (the grammar wins: a token outside it would
    leave the request unconstrained), else its allowed_token_ids (`keep_an_allowed_token`). A banned id outside
    [0, vocabulary) names no token (stop_token_ids take any integer, as in vLLM 0.26): nothing to ban, and it is
    never used as an index (it would be out of range, or wrap around to another token)."""
    device, vocab = logits.device, logits.shape[-1]
    banned = [(i, t) for i, s in enumerate(specs) for t in s.banned_token_ids if 0 <= t < vocab]
    adjusted = histories is not None
    grammar_rows = grammar_mask[1] if grammar_mask is not None and (banned or adjusted) else None
    allowed_by_grammar = logits[grammar_rows] if grammar_rows is not None else None  # (a copy: indexed by rows)
    kept_rows = rows_kept_to_allowed_tokens(specs) if adjusted else []
    before_bans = logits[to_device(kept_rows, device, torch.int64)] if kept_rows else None  # (a copy, as above)
    if banned:
        where = to_device(banned, device, torch.int64)
        logits[where[:, 0], where[:, 1]] = float("-inf")
    if adjusted:
        apply_adjustments(logits, specs, histories)
    if kept_rows:
        keep_an_allowed_token(logits, before_bans, kept_rows, specs)
    if allowed_by_grammar is not None:
        now = logits[grammar_rows]
        logits[grammar_rows] = torch.where(torch.isneginf(now).all(dim=-1, keepdim=True), allowed_by_grammar, now)


def rank_among(logprobs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """[m] int64: each row's count of tokens whose logprob is at least its chosen token's [m, 1], as vLLM ranks:
    a token tied with others takes the last place among them (ties are common in bfloat16)."""
    return (logprobs >= chosen).sum(dim=-1)


def _with_named_tokens(raw: torch.Tensor, top_values: torch.Tensor, top_ids: torch.Tensor,
                       named: list[tuple[int, tuple[int, ...]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k logprobs [m, k] with the rows in `named` (row j of `raw`, its tokens: at most k of them, as
    `num_top` counts them) replaced by those tokens' logprobs, in the order given; the rest of such a row is
    padding that `SampledTokens.lists` cuts off."""
    width = top_ids.shape[1]
    rows = to_device([j for j, _ in named], raw.device, torch.int64)
    ids = to_device([list(t) + [0] * (width - len(t)) for _, t in named], raw.device, torch.int64)
    return top_values.index_copy(0, rows, raw[rows].gather(1, ids)), top_ids.index_copy(0, rows, ids)


def _greedy_and_drawn(logits: torch.Tensor, specs: list[SamplingSpec], positions: list[int] | None,
                      default_generator: torch.Generator) -> torch.Tensor:
    """One token per row of the processed float32 logits [n, vocab]: argmax for greedy rows, `_draw`
    for the others (only the rows of each kind go to each)."""
    n, device = logits.shape[0], logits.device
    greedy = [i for i, s in enumerate(specs) if s.is_greedy]
    random = [i for i, s in enumerate(specs) if not s.is_greedy]
    if len(greedy) == n:
        return logits.argmax(dim=-1)
    if len(random) == n:
        return _draw(logits, specs, positions, default_generator)
    tokens = torch.empty(n, dtype=torch.long, device=device)
    rows = to_device(greedy, device, torch.int64)
    tokens[rows] = logits[rows].argmax(dim=-1)
    rows = to_device(random, device, torch.int64)
    tokens[rows] = _draw(logits[rows], [specs[i] for i in random],
                         None if positions is None else [positions[i] for i in random], default_generator)
    return tokens


def _draw(logits: torch.Tensor, specs: list[SamplingSpec], positions: list[int] | None,
          default_generator: torch.Generator) -> torch.Tensor:
    """One sampled token per row of logits [m, vocab] (all rows non-greedy): argmax(p / E) with
    exponential noise E of the row's seed and position (`seeded_noise.seeded_exponential`, one call
    for the seeded rows), or from the engine's generator for unseeded rows (one draw for all)."""
    probs = processed_probs(logits, specs)
    vocab = probs.shape[1]
    seeded = [j for j, s in enumerate(specs) if s.seed is not None]
    if seeded and positions is None:
        raise ValueError("seeded rows are sampled at their positions: positions must be given")
    unseeded = [j for j, s in enumerate(specs) if s.seed is None]
    drawn = None if not unseeded else torch.empty((len(unseeded), vocab), device=probs.device).exponential_(
        generator=default_generator)
    hashed = None if not seeded else seeded_exponential([specs[j].seed for j in seeded],
                                                        [positions[j] for j in seeded], vocab, probs.device)
    if drawn is None or hashed is None:
        noise = hashed if drawn is None else drawn
    else:
        noise = torch.empty_like(probs)
        noise[to_device(unseeded, probs.device, torch.int64)] = drawn
        noise[to_device(seeded, probs.device, torch.int64)] = hashed
    return (probs / noise).argmax(dim=-1)


def processed_probs(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """The distribution a non-greedy request samples from: [n, vocab] probabilities."""
    device = logits.device
    temperature = to_device([s.temperature for s in specs], device, torch.float32)
    logits = logits / temperature[:, None]

    if any(s.min_p > 0 for s in specs):
        min_p = to_device([s.min_p for s in specs], device, torch.float32)
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))

    top_k = [s.top_k for s in specs]
    if any(k > 0 for k in top_k) or any(s.top_p < 1.0 for s in specs):
        top_p = to_device([s.top_p for s in specs], device, torch.float32)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        k = to_device([k if k > 0 else vocab for k in top_k], device, torch.int64)
        ranks = torch.arange(vocab, device=device)[None, :]
        # Ties with the k-th value are kept (the support is "value >= k-th largest").
        kth_value = sorted_logits.gather(1, (k.clamp(max=vocab) - 1)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_value, float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # A token is dropped once the tokens ranked above it already reach top_p; the first never is.
        drop = (mass_before >= top_p[:, None]) & (ranks > 0)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    return torch.softmax(logits, dim=-1)
