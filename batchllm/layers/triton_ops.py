"""The decoder's elementwise ops as one Triton kernel each (CUDA): RMSNorm fused with the residual
add, SiLU-and-mul, and rotary applied in place to q and k straight from the float32 tables.

The arithmetic of `TorchOps` (`ops.py`, "Precision"): inputs read in the model dtype, everything
computed in float32, one rounding per output (the rotary tables too stay float32). In float32 the
results equal torch's (transformers') but for the order of an RMSNorm's sum of squares and
contractions into fused multiply-adds; in 16-bit types likewise, hence a small share of elements
one unit in the last place apart.
Each op overwrites its input buffers where it can (`ops.py`: inputs are not read after a call).
With `quantize=True` (FP8, fp8_fused_quant) the norm and SiLU kernels are compiled with QUANT: the
output is rounded once to the model dtype as always, taken back to float32 and quantized per row by
`fp8_triton.quantize_row`, `quantize_rows_triton`'s arithmetic on the same values, so the float8
values and scales are that quantizer's bits; SiLU-and-mul then holds its whole row in one program.
Imported only where Triton is installed (`ops.make_ops` decides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.layers.fp8 import _MIN_SCALE, FP8, FP8_MAX, Fp8Input
from batchllm.layers.fp8_triton import quantize_row, quantize_rows_triton
from batchllm.layers.ops import TorchOps
from batchllm.layers.rotary import StepRotary

FUSED_QUANT_MAX_COLS = 32768
"""Widest SiLU output quantized in its kernel (a whole row per program); wider ones run the SiLU
kernel, then `quantize_rows_triton` (the same bits)."""


@triton.jit
def _store_row(Out, Scale, row, cols, mask, out, fp8_max, min_scale, QUANT: tl.constexpr):
    """Store one output row `out` (already rounded to the model dtype; Out points at the row);
    QUANT: quantized per row (Out float8 or, in tests, float32: the clamped products x * (1 / scale);
    fp8_max and min_scale as `quantize_rows_triton` passes them) with its scale at Scale[row]."""
    if QUANT:
        q, scale = quantize_row(out.to(tl.float32), fp8_max, min_scale)
        tl.store(Out + cols, q.to(Out.dtype.element_ty), mask=mask)
        tl.store(Scale + row, scale)
    else:
        tl.store(Out + cols, out, mask=mask)


@triton.jit
def _rms_norm_kernel(
    X, Residual, Weight, Out, Scale,
    stride_x, stride_r, stride_o,
    n_cols, eps, fp8_max, min_scale,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row per program. With a residual: h = x + residual in float32, stored back rounded as the
    next residual, and normalised unrounded; out = round(weight * (h / rms(h))), QUANT: quantized."""
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
    _store_row(Out + row * stride_o, Scale, row, cols, mask, (w * normed).to(dtype), fp8_max, min_scale, QUANT)


@triton.jit
def _silu_and_mul_kernel(GateUp, Out, Scale, stride_g, stride_o, n_cols, fp8_max, min_scale,
                         QUANT: tl.constexpr, BLOCK: tl.constexpr):
    """out[row, j] = round(silu(gate[j]) * up[j]); gate and up are the two halves of a row. QUANT:
    quantized, a whole row per program (BLOCK >= n_cols)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_raw = tl.load(GateUp + row * stride_g + cols, mask=mask, other=0.0)
    dtype = gate_raw.dtype
    gate = gate_raw.to(tl.float32)
    up = tl.load(GateUp + row * stride_g + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    silu = gate / (1.0 + tl.exp(-gate))
    _store_row(Out + row * stride_o, Scale, row, cols, mask, (silu * up).to(dtype), fp8_max, min_scale, QUANT)


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


def _fp8_buffers(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 [rows, cols], float32 [rows, 1]): a quantized output and its row scales."""
    return (torch.empty((rows, cols), dtype=FP8, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


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

    def fused_quantizer(self):
        return quantize_rows_triton

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float,
                 quantize: bool = False) -> torch.Tensor | Fp8Input:
        rows = _rows(x)
        if quantize:
            q, scale = _fp8_buffers(*rows.shape, rows.device)
            self._launch_norm(rows, rows, weight, q, eps, has_residual=False, scale=scale)
            return Fp8Input(q, scale, x.dtype)
        out = torch.empty_like(rows)
        self._launch_norm(rows, rows, weight, out, eps, has_residual=False)
        return out.view(x.shape)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float, quantize: bool = False) -> tuple[torch.Tensor | Fp8Input, torch.Tensor]:
        """The sum goes into residual's buffer, the normalised sum into x's (quantize: new buffers)."""
        assert x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
        rows, res = x.view(-1, x.shape[-1]), residual.view(-1, x.shape[-1])
        if quantize:
            q, scale = _fp8_buffers(*rows.shape, rows.device)
            self._launch_norm(rows, res, weight, q, eps, has_residual=True, scale=scale)
            return Fp8Input(q, scale, x.dtype), residual
        self._launch_norm(rows, res, weight, rows, eps, has_residual=True)
        return x, residual

    @staticmethod
    def _launch_norm(x, residual, weight, out, eps, has_residual, scale=None):
        """scale: [rows, 1] float32 for the row scales (QUANT; out float8 [rows, k]), or None."""
        if x.shape[0] == 0:
            return
        block = triton.next_power_of_2(x.shape[1])
        _rms_norm_kernel[(x.shape[0],)](
            x, residual, weight, out, out if scale is None else scale,
            x.stride(0), residual.stride(0), out.stride(0), x.shape[1], eps, FP8_MAX, _MIN_SCALE,
            HAS_RESIDUAL=has_residual, QUANT=scale is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )

    def silu_and_mul(self, gate_up: torch.Tensor, quantize: bool = False) -> torch.Tensor | Fp8Input:
        rows = _rows(gate_up)
        n_cols = rows.shape[1] // 2
        if quantize and n_cols <= FUSED_QUANT_MAX_COLS:
            q, scale = _fp8_buffers(rows.shape[0], n_cols, rows.device)
            self._launch_silu(rows, q, scale)
            return Fp8Input(q, scale, gate_up.dtype)
        out = torch.empty(rows.shape[0], n_cols, dtype=gate_up.dtype, device=gate_up.device)
        self._launch_silu(rows, out)
        if quantize:  # too wide for one program: the unfused pair, the same bits
            return Fp8Input(*quantize_rows_triton(out), gate_up.dtype)
        return out.view(*gate_up.shape[:-1], n_cols)

    @staticmethod
    def _launch_silu(rows, out, scale=None):
        """rows [n, 2 * i] -> out [n, i]; scale: [n, 1] float32 (QUANT, whole rows) or None (tiles of 1024)."""
        n_cols = out.shape[1]
        if rows.shape[0] == 0:
            return
        if scale is None:
            block, warps = min(triton.next_power_of_2(n_cols), 1024), 4
        else:
            block = triton.next_power_of_2(n_cols)
            warps = max(4, min(16, block // 1024))  # as quantize_rows_triton
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n_cols, block))](
            rows, out, out if scale is None else scale, rows.stride(0), out.stride(0), n_cols, FP8_MAX, _MIN_SCALE,
            QUANT=scale is not None, BLOCK=block, num_warps=warps,
        )

    def step_rotary(self, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                    dtype: torch.dtype) -> TritonStepRotary | StepRotary:
        if cos.shape[1] & (cos.shape[1] - 1):  # the kernel's halves are power-of-2 ranges
            return super().step_rotary(cos, sin_signed, positions, dtype)
        return TritonStepRotary(cos, sin_signed, positions)
