"""RMSNorm, computed in float32 and cast back (the same arithmetic as HF's LlamaRMSNorm), optionally
fused with the residual add before it; the arithmetic itself is the model's ops policy (`ops.py`)."""

from __future__ import annotations

import torch
from torch import nn

from batchllm.layers.ops import TorchOps


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops or TorchOps()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, quantize: bool = False):
        """norm(x); with a residual: (norm(x + residual), x + residual), the next layer's residual.
        quantize: the norm comes quantized per token for an FP8 layer (`ops.py`, an `Fp8Input`)."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps, quantize)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps, quantize)
