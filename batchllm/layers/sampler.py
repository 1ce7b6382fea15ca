"""Token sampling for one step: greedy, temperature, min-p, top-k, top-p, per-request seeds, logprobs.

Order of operations (as vLLM): banned tokens -> temperature -> min-p -> top-k -> top-p -> sample.
Sampling draws exponential noise E and takes argmax(p / E), which samples from p exactly. A seeded
request draws its noise from its own generator, one vocab-sized draw per sampled token, so its
tokens do not depend on what else is in the batch; unseeded requests share the engine's generator.
Log-probabilities are those of the raw model distribution (before any processing).
"""

from __future__ import annotations

import torch

from batchllm.outputs import SamplingSpec, TokenLogprobs


def sample(
    logits: torch.Tensor,  # [n, vocab_size]
    specs: list[SamplingSpec],
    generators: list[torch.Generator | None],
    default_generator: torch.Generator,
) -> tuple[list[int], list[TokenLogprobs | None]]:
    n = logits.shape[0]
    want_logprobs = [s.num_logprobs is not None for s in specs]
    if not any(want_logprobs) and all(s.is_greedy and not s.banned_token_ids for s in specs):
        # the common batch case: argmax in the model's dtype (exact: bf16/fp16 -> fp32 is lossless),
        # with no fp32 copy of the [n, vocab] logits
        return logits.argmax(dim=-1).tolist(), [None] * n
    logits = logits.to(torch.float32)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None

    logits = logits.clone()
    for i, spec in enumerate(specs):
        if spec.banned_token_ids:
            logits[i, list(spec.banned_token_ids)] = float("-inf")

    tokens = torch.empty(n, dtype=torch.long, device=logits.device)
    greedy = [i for i, s in enumerate(specs) if s.is_greedy]
    random = [i for i, s in enumerate(specs) if not s.is_greedy]
    if greedy:
        tokens[greedy] = logits[greedy].argmax(dim=-1)
    if random:
        rows = logits[random]
        probs = processed_probs(rows, [specs[i] for i in random])
        noise = torch.empty_like(probs)
        unseeded = []
        for j, i in enumerate(random):
            if generators[i] is None:
                unseeded.append(j)
            else:
                noise[j].exponential_(generator=generators[i])
        if unseeded:
            noise[unseeded] = torch.empty(
                (len(unseeded), probs.shape[1]), device=probs.device
            ).exponential_(generator=default_generator)
        tokens[random] = (probs / noise).argmax(dim=-1)

    token_list = tokens.tolist()
    results: list[TokenLogprobs | None] = [None] * n
    if raw_logprobs is not None:
        for i, spec in enumerate(specs):
            if spec.num_logprobs is None:
                continue
            row = raw_logprobs[i]
            sampled_lp = row[token_list[i]]
            rank = int((row > sampled_lp).sum().item()) + 1
            k = min(spec.num_logprobs, row.shape[0])
            top = torch.topk(row, k) if k > 0 else None
            results[i] = TokenLogprobs(
                sampled_logprob=float(sampled_lp.item()),
                sampled_rank=rank,
                top_token_ids=top.indices.tolist() if top is not None else [],
                top_logprobs=top.values.tolist() if top is not None else [],
            )
    return token_list, results


def processed_probs(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """The distribution a non-greedy request samples from: [n, vocab] probabilities."""
    device = logits.device
    temperature = torch.tensor([s.temperature for s in specs], device=device, dtype=torch.float32)
    logits = logits / temperature[:, None]

    min_p = torch.tensor([s.min_p for s in specs], device=device, dtype=torch.float32)
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))

    top_k = [s.top_k for s in specs]
    top_p = torch.tensor([s.top_p for s in specs], device=device, dtype=torch.float32)
    if any(k > 0 for k in top_k) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        k = torch.tensor([k if k > 0 else vocab for k in top_k], device=device)
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
