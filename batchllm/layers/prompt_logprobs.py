"""Prompt logprobs on the device: LM-head logits for the rows a step asks for, and only those.

`core/prompt_logprobs.py` decides which rows (positions) of which requests need logits; this
computes, per row, the top-k logprobs of the raw model distribution (fp32 log-softmax, as the
sample logprobs in `sampler.py`) and the logprob and rank of each target token. Rows go through
the LM head in slices of at most `sampler.LOGITS_PER_SLICE` logits, so a long prefill chunk never holds a
[chunk, vocab] fp32 tensor at once. Nothing here reads a device value back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.layers.sampler import rank_among, row_slices
from batchllm.layers.transfer import to_device
from batchllm.outputs import PromptLogprobsRows, ScheduledRequest


@dataclass
class PromptLogprobTensors:
    """One step's prompt-logprob results as tensors (on the device until `to_host`)."""

    requests: list[tuple[str, int, list[tuple[int, ...]]]]
    """(request id, its num_top, its targets per row) in row order."""
    top_logprobs: torch.Tensor  # [rows, max_k] fp32
    top_ids: torch.Tensor  # [rows, max_k] int64
    target_logprobs: torch.Tensor  # [pairs] fp32, every row's targets in order
    target_ranks: torch.Tensor  # [pairs] int64

    def to_host(self) -> PromptLogprobTensors:
        def copy(t):
            return t.to("cpu", non_blocking=t.is_cuda)
        return PromptLogprobTensors(self.requests, copy(self.top_logprobs), copy(self.top_ids),
                                    copy(self.target_logprobs), copy(self.target_ranks))

    def lists(self) -> dict[str, PromptLogprobsRows]:
        """Per request, its rows with its own `num_top` alternatives."""
        top_lp, top_ids = self.top_logprobs.tolist(), self.top_ids.tolist()
        target_lp, target_rank = self.target_logprobs.tolist(), self.target_ranks.tolist()
        out: dict[str, PromptLogprobsRows] = {}
        row = pair = 0
        for request_id, k, targets in self.requests:
            rows = range(row, row + len(targets))
            lps, ranks = [], []
            for t in targets:
                lps.append(target_lp[pair:pair + len(t)])
                ranks.append(target_rank[pair:pair + len(t)])
                pair += len(t)
            out[request_id] = PromptLogprobsRows([top_ids[r][:k] for r in rows], [top_lp[r][:k] for r in rows],
                                                 lps, ranks)
            row += len(targets)
        return out


def token_rows(prompt_rows: list[tuple[int, ScheduledRequest]]) -> np.ndarray:
    """Token indices in the step of every prompt-logprob row, in order; prompt_rows holds (token
    index of a request's first row, its ScheduledRequest)."""
    return np.concatenate([np.arange(first, first + s.prompt_logprobs.num_rows) for first, s in prompt_rows])


def compute_prompt_logprobs(
    compute_logits, vocab_size: int, hidden: torch.Tensor, prompt_rows: list[tuple[int, ScheduledRequest]], *,
    driver: bool = True,
) -> PromptLogprobTensors | None:
    """compute_logits: the model's LM head (under tensor parallelism every rank calls it on the
    same slices: it all-gathers); hidden: [num_tokens, hidden] of the step. None off the driver."""
    device = hidden.device
    rows = to_device(token_rows(prompt_rows), device, torch.int64)
    targets = [t for _, s in prompt_rows for t in s.prompt_logprobs.targets]
    pair_rows = np.repeat(np.arange(len(targets)), [len(t) for t in targets])
    pair_tokens = np.asarray([tok for t in targets for tok in t], dtype=np.int64)
    max_k = min(vocab_size, max(s.prompt_logprobs.num_top for _, s in prompt_rows))
    tops, top_ids, target_lps, ranks = [], [], [], []
    for begin, end in row_slices(len(targets), vocab_size):
        logits = compute_logits(hidden[rows[begin:end]])  # [r, vocab_size]
        if not driver:
            continue
        logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
        top = torch.topk(logprobs, max_k, dim=-1)
        tops.append(top.values)
        top_ids.append(top.indices)
        in_slice = (pair_rows >= begin) & (pair_rows < end)
        if in_slice.any():
            r = to_device(pair_rows[in_slice] - begin, device, torch.int64)
            chosen = logprobs[r, to_device(pair_tokens[in_slice], device, torch.int64)]  # [pairs in slice]
            target_lps.append(chosen)
            ranks.append(rank_among(logprobs[r], chosen[:, None]))
    if not driver:
        return None
    requests = [(s.request_id, s.prompt_logprobs.num_top, s.prompt_logprobs.targets) for _, s in prompt_rows]
    return PromptLogprobTensors(
        requests, torch.cat(tops), torch.cat(top_ids),
        torch.cat(target_lps) if target_lps else torch.empty(0, device=device),
        torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.int64, device=device))
