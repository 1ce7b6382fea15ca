"""The elementwise operations of a decoder layer (RMSNorm with the residual add, SiLU-and-mul, rotary),
as a policy object the model is built with: `TorchOps` (any device; the arithmetic of transformers,
a few torch kernels per op) or `TritonOps` (CUDA; one kernel per op, same roundings: see
`triton_ops.py`). Choose with `make_ops`.

Contract shared by both: every op returns its results and callers use only those; an op may reuse
(overwrite) the buffers of its inputs, so an input is never read again after the call.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from batchllm.layers.rotary import StepRotary

KERNEL_CHOICES = ("auto", "torch", "triton")


class TorchOps:
    name = "torch"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * (x / rms(x)), the normalisation in float32, cast back before the weight (as HF)."""
        dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        return weight * (x32 * torch.rsqrt(variance + eps)).to(dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual): the sum rounded to the model dtype first, as HF's
        `hidden = residual + hidden` before the next norm."""
        summed = x + residual
        return self.rms_norm(summed, weight, eps), summed

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[n, 2 * i] (gate | up) -> silu(gate) * up, [n, i]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def step_rotary(self, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                    dtype: torch.dtype) -> StepRotary:
        """The rotation of one step's tokens, for every layer: the rows of the float32 tables
        [max_positions, head_dim] (see `RotaryEmbedding`) are gathered once, in the model dtype."""
        return StepRotary(cos[positions].to(dtype)[:, None, :], sin_signed[positions].to(dtype)[:, None, :])


def use_triton(choice: str, device: torch.device, setting: str) -> bool:
    """Whether a setting's choice ("auto" | "torch" | "triton") gets the Triton implementation:
    "auto" does on a CUDA device where Triton is installed; "triton" must, or is an error."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{setting} must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "torch":
        return False
    usable = device.type == "cuda" and torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
    if choice == "triton" and not usable:
        raise ValueError(f"{setting}='triton' needs Triton and a CUDA device")
    return usable


def make_ops(choice: str, device: torch.device):
    """The ops for a `kernels` choice (`use_triton`)."""
    if not use_triton(choice, device, "kernels"):
        return TorchOps()
    from batchllm.layers.triton_ops import TritonOps

    return TritonOps()
