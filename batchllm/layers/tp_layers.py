"""Layers whose weights are split over tensor-parallel ranks (`parallel/tensor_parallel.py`).

Without a TP group (tp=None) each is the plain layer with the same arithmetic as torch's
(`F.linear` with its bias, `F.embedding`), so single-GPU results do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W_r^T, plus the bias once. Each rank holds the input columns of
    its shard (`tp_shard_dims`: the weight is split along dim 1; the bias is replicated)."""

    tp_shard_dims = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, bias: bool, tp=None) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in / tp]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [rank * local, (rank + 1) * local) of the (padded) vocabulary; a token
    outside them contributes zeros, and one all-reduce sums the ranks' rows."""

    tp_shard_dims = {"weight": 0}

    def __init__(self, num_embeddings_local: int, embedding_dim: int, tp=None) -> None:
        super().__init__()
        self.tp = tp
        self.start = 0 if tp is None else tp.rank * num_embeddings_local
        self.weight = nn.Parameter(torch.empty(num_embeddings_local, embedding_dim))  # [vocab / tp, hidden]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)
