"""The decoder's elementwise ops as one Triton kernel each (CUDA): RMSNorm fused with the residual
add, SiLU-and-mul, and rotary applied in place to q and k straight from the float32 tables.

The arithmetic of `TorchOps` (`ops.py`, "Precision"): inputs read in the model dtype, everything
computed in float32, one rounding per output (the rotary tables too stay float32). In float32 the
results equal torch's (transformers') but for the order of an RMSNorm's sum of squares and
contractions into fused multiply-adds; in 16-bit types likewise, hence a small share of elements
one unit in the last place apart.
Each op overwrites its input buffers where it can (`ops.py`: inputs are not read after a call).
Imported only where Triton is installed (`ops.make_ops` decides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.layers.ops import TorchOps
from batchllm.layers.rotary import StepRotary


@triton.jit
def _rms_norm_kernel(
    X, Residual, Weight, Out,
    stride_x, stride_r, stride_o,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row per program. With a residual: h = x + residual in float32, stored back rounded as the
    next residual, and normalised unrounded; out = round(weight * (h / rms(h)))."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_raw = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x_raw.dtype
    h = x_raw.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = h + r
        tl.store(Residual + row * stride_r + cols, h.to(Residual.dtype.element_ty), mask=mask)
    variance = tl.sum(h * h, axis=0) / n_cols
    normed = h * tl.rsqrt(variance + eps)
    w = tl.load(Weight + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (w * normed).to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(GateUp, Out, stride_g, stride_o, n_cols, BLOCK: tl.constexpr):
    """out[row, j] = round(silu(gate[j]) * up[j]); gate and up are the two halves of a row."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_raw = tl.load(GateUp + row * stride_g + cols, mask=mask, other=0.0)
    dtype = gate_raw.dtype
    gate = gate_raw.to(tl.float32)
    up = tl.load(GateUp + row * stride_g + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))
    tl.store(Out + row * stride_o + cols, (silu * up).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    X, Positions, Cos, SinSigned,
    stride_xt, stride_xh, stride_table,
    num_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """In place, for one token and BLOCK_H heads: with x = (x1 | x2) and the float32 table rows
    (c | c), (-s | s): out1 = round(x1 c + x2 (-s)), out2 = round(x2 c + x1 s), products and sum in
    float32 (torch's x * cos + roll(x) * sin_signed)."""
    tok = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    pos = tl.load(Positions + tok).to(tl.int64)
    ptr1 = X + tok * stride_xt + heads[:, None] * stride_xh + d[None, :]
    mask = (heads < num_heads)[:, None]
    x1_raw = tl.load(ptr1, mask=mask, other=0.0)
    dtype = x1_raw.dtype
    x1 = x1_raw.to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(Cos + pos * stride_table + d).to(tl.float32)[None, :]
    c2 = tl.load(Cos + pos * stride_table + HALF + d).to(tl.float32)[None, :]
    s1 = tl.load(SinSigned + pos * stride_table + d).to(tl.float32)[None, :]
    s2 = tl.load(SinSigned + pos * stride_table + HALF + d).to(tl.float32)[None, :]
    out1 = x1 * c1 + x2 * s1
    out2 = x2 * c2 + x1 * s2
    tl.store(ptr1, out1.to(dtype), mask=mask)
    tl.store(ptr1 + HALF, out2.to(dtype), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with unit stride along the last dim (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


class TritonStepRotary:
    """One step's rotation: reads each token's cos/sin rows from the float32 tables by position and
    rotates x in place (any [num_tokens, heads, head_dim] view with unit stride along head_dim)."""

    def __init__(self, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor) -> None:
        self.cos, self.sin_signed, self.positions = cos, sin_signed, positions

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens, num_heads, head_dim = x.shape
        if num_tokens == 0:
            return x
        assert x.stride(2) == 1 and head_dim % 2 == 0 and head_dim & (head_dim - 1) == 0, "head_dim: a power of 2"
        block_h = min(triton.next_power_of_2(num_heads), 16)
        _rotary_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
            x, self.positions, self.cos, self.sin_signed,
            x.stride(0), x.stride(1), self.cos.stride(0), num_heads,
            HALF=head_dim // 2, BLOCK_H=block_h, num_warps=4,
        )
        return x


class TritonOps(TorchOps):
    """TorchOps with each op as one kernel; what a kernel cannot take falls back to TorchOps."""

    name = "triton"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = _rows(x)
        out = torch.empty_like(rows)
        self._launch_norm(rows, rows, weight, out, eps, has_residual=False)
        return out.view(x.shape)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum goes into residual's buffer, the normalised sum into x's."""
        assert x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
        rows, res = x.view(-1, x.shape[-1]), residual.view(-1, x.shape[-1])
        self._launch_norm(rows, res, weight, rows, eps, has_residual=True)
        return x, residual

    @staticmethod
    def _launch_norm(x, residual, weight, out, eps, has_residual):
        if x.shape[0] == 0:
            return
        block = triton.next_power_of_2(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](
            x, residual, weight, out, x.stride(0), residual.stride(0), out.stride(0), x.shape[1], eps,
            HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=min(max(block // 256, 1), 16),
        )

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows = _rows(gate_up)
        n_cols = rows.shape[1] // 2
        out = torch.empty(rows.shape[0], n_cols, dtype=gate_up.dtype, device=gate_up.device)
        if rows.shape[0]:
            block = min(triton.next_power_of_2(n_cols), 1024)
            _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n_cols, block))](
                rows, out, rows.stride(0), out.stride(0), n_cols, BLOCK=block, num_warps=4,
            )
        return out.view(*gate_up.shape[:-1], n_cols)

    def step_rotary(self, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                    dtype: torch.dtype) -> TritonStepRotary | StepRotary:
        if cos.shape[1] & (cos.shape[1] - 1):  # the kernel's halves are power-of-2 ranges
            return super().step_rotary(cos, sin_signed, positions, dtype)
        return TritonStepRotary(cos, sin_signed, positions)
