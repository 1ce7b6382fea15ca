"""The elementwise operations of a decoder layer (RMSNorm with the residual add, SiLU-and-mul, rotary),
as a policy object the model is built with: `TorchOps` (any device; the arithmetic of transformers,
a few torch kernels per op) or `TritonOps` (CUDA; one kernel per op, same roundings: see
`triton_ops.py`). Choose with `make_ops`.

Contract shared by both: every op returns its results and callers use only those; an op may reuse
(overwrite) the buffers of its inputs, so an input is never read again after the call.

Precision (issue 20): each op reads its inputs in the model dtype, computes in float32 and rounds
once, at its outputs; no intermediate value is rounded to the model dtype. In float32 that is
transformers' arithmetic, operation for operation (greedy parity stays exact). In bfloat16/float16
it is what vLLM's default (Inductor-fused) kernels compute, where transformers rounds after every
torch op (RMSNorm twice, rotary three times plus its tables, SiLU-and-mul twice): that extra
rounding cost 2-3 points of agreement with the float32 answer (benchmarks/bf16_agreement.py).

FP8 (`quantize=True`, asked for by the decoder where the next layer `takes_quantized`): RMSNorm and
SiLU-and-mul return their output quantized per token, an `Fp8Input`: the output rounded to the model
dtype as above, then quantized by `fused_quantizer()`'s arithmetic, so the FP8 layer computes what it
would have computed from the unquantized output (`layers/fp8.py`).

Deferred FP8 scales: add_rms_norm, silu_and_mul and the step rotation's `scale_and_rotate` take an
FP8 layer's `Fp8Output` (the unscaled product and its scales) where they would take its output, and
compute on the output it stands for (`Fp8Output.scaled()`'s values: the product times its scales in
float32, rounded once to the model dtype). TorchOps materializes it; TritonOps scales as it loads.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from batchllm.layers.fp8 import Fp8Input, Fp8Output, materialized, quantize_rows
from batchllm.layers.rotary import StepRotary


def _quantized(out: torch.Tensor) -> Fp8Input:
    """out [..., k] in the model dtype -> its rows quantized by `quantize_rows`, [rows, k]."""
    return Fp8Input(*quantize_rows(out.reshape(-1, out.shape[-1])), out.dtype)


class TorchOps:
    name = "torch"
    scales_on_load = False
    """Whether the ops apply an `Fp8Output`'s scales as they load it (TritonOps) rather than materializing
    it first: only then does deferring pay (`DecoderForCausalLM.match_deferred_scales`)."""

    def fused_quantizer(self):
        """The FP8 activation quantizer whose results this policy's `quantize=True` outputs equal
        bit for bit (`fp8.match_fused_quant`)."""
        return quantize_rows

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 quantize: bool = False) -> torch.Tensor | Fp8Input:
        """weight * (x / rms(x)) in float32, rounded once to x's dtype (in float32: HF's LlamaRMSNorm);
        quantize: that, quantized per row (an `Fp8Input`)."""
        out = self._normalize(x.to(torch.float32), weight, eps).to(x.dtype)
        return _quantized(out) if quantize else out

    def add_rms_norm(self, x: torch.Tensor | Fp8Output, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float, quantize: bool = False) -> tuple[torch.Tensor | Fp8Input, torch.Tensor]:
        """(rms_norm(x + residual), x + residual): the sum in float32, normalised unrounded; the sum
        handed on as the next residual is rounded to the residual's dtype (HF's `hidden = residual +
        hidden` in float32). quantize: the first one quantized per row (an `Fp8Input`)."""
        x = materialized(x)
        summed = x.to(torch.float32) + residual.to(torch.float32)
        out = self._normalize(summed, weight, eps).to(x.dtype)
        return _quantized(out) if quantize else out, summed.to(residual.dtype)

    @staticmethod
    def _normalize(x32: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """float32 in, float32 out: weight * (x * rsqrt(mean(x^2) + eps)), HF's order of operations."""
        variance = x32.pow(2).mean(-1, keepdim=True)
        return weight.to(torch.float32) * (x32 * torch.rsqrt(variance + eps))

    def silu_and_mul(self, gate_up: torch.Tensor | Fp8Output, quantize: bool = False) -> torch.Tensor | Fp8Input:
        """[n, 2 * i] (gate | up) -> silu(gate) * up, [n, i], in float32, rounded once; quantize: that,
        quantized per row (an `Fp8Input`)."""
        gate_up = materialized(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        out = (F.silu(gate.to(torch.float32)) * up.to(torch.float32)).to(gate_up.dtype)
        return _quantized(out) if quantize else out

    def step_rotary(self, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                    dtype: torch.dtype) -> StepRotary:
        """The rotation of one step's tokens, for every layer: the rows of the float32 tables
        [max_positions, head_dim] (see `RotaryEmbedding`) are gathered once, kept in float32
        (`dtype`, the model's, is what the rotation rounds to)."""
        del dtype  # StepRotary rounds to the dtype of what it rotates
        return StepRotary(cos[positions][:, None, :], sin_signed[positions][:, None, :])


def use_triton(choice: str, device: torch.device, setting: str) -> bool:
    """Whether a setting's choice ("auto" | "torch" | "triton", checked by its config option) gets the
    Triton implementation: "auto" does on a CUDA device where Triton is installed; "triton" must, or is an error."""
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
