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
With SCALED (deferred FP8 scales, an `Fp8Output` in, `ops.py`) a kernel reads the unscaled bfloat16
product and scales each element as it loads it, x * x_scale[row] * w_scale[col] in float32 rounded
once to the model dtype (`Fp8Output.scaled()`'s arithmetic), then goes on as with that output.
Imported only where Triton is installed (`ops.make_ops` decides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.layers.fp8 import _MIN_SCALE, FP8, FP8_MAX, Fp8Input, Fp8Output
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
def _load_scaled(ptrs, mask, XScale, WScale, row, w_cols, SCALED: tl.constexpr):
    """Elements at ptrs, in float32. SCALED: the unscaled product of an FP8 layer (`Fp8Output`), times
    XScale[row] * WScale[w_cols] in float32 and rounded once to its dtype (bfloat16, the model's), as
    the layer's output would be."""
    raw = tl.load(ptrs, mask=mask, other=0.0)
    x = raw.to(tl.float32)
    if SCALED:
        w_scale = tl.load(WScale + w_cols, mask=mask, other=0.0)
        x = (x * tl.load(XScale + row) * w_scale).to(raw.dtype).to(tl.float32)
    return x


@triton.jit
def _rms_norm_kernel(
    X, Residual, Weight, Out, Scale, XScale, WScale,
    stride_x, stride_r, stride_o,
    n_cols, eps, fp8_max, min_scale,
    HAS_RESIDUAL: tl.constexpr,
    QUANT: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One row per program. With a residual: h = x + residual in float32, stored back rounded as the
    next residual, and normalised unrounded; out = round(weight * (h / rms(h))), QUANT: quantized.
    SCALED: x is an `Fp8Output`'s product, scaled on load (`_load_scaled`)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = X.dtype.element_ty
    h = _load_scaled(X + row * stride_x + cols, mask, XScale, WScale, row, cols, SCALED)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = h + r
        tl.store(Residual + row * stride_r + cols, h.to(Residual.dtype.element_ty), mask=mask)
    variance = tl.sum(h * h, axis=0) / n_cols
    normed = h * tl.rsqrt(variance + eps)
    w = tl.load(Weight + cols, mask=mask, other=0.0).to(tl.float32)
    _store_row(Out + row * stride_o, Scale, row, cols, mask, (w * normed).to(dtype), fp8_max, min_scale, QUANT)


@triton.jit
def _silu_and_mul_kernel(GateUp, Out, Scale, XScale, WScale, stride_g, stride_o, n_cols, fp8_max, min_scale,
                         QUANT: tl.constexpr, SCALED: tl.constexpr, BLOCK: tl.constexpr):
    """out[row, j] = round(silu(gate[j]) * up[j]); gate and up are the two halves of a row. QUANT:
    quantized, a whole row per program (BLOCK >= n_cols). SCALED: gate_up is an `Fp8Output`'s
    product, scaled on load (`_load_scaled`)."""
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = GateUp.dtype.element_ty
    gate = _load_scaled(GateUp + row * stride_g + cols, mask, XScale, WScale, row, cols, SCALED)
    up = _load_scaled(GateUp + row * stride_g + n_cols + cols, mask, XScale, WScale, row, n_cols + cols, SCALED)
    silu = gate / (1.0 + tl.exp(-gate))
    _store_row(Out + row * stride_o, Scale, row, cols, mask, (silu * up).to(dtype), fp8_max, min_scale, QUANT)


@triton.jit
def _rotary_kernel(
    X, Positions, Cos, SinSigned, XScale, WScale,
    stride_xt, stride_xh, stride_table,
    num_heads, rotated_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    SCALED: tl.constexpr,
):
    """In place, for one token and BLOCK_H heads: with x = (x1 | x2) and the float32 table rows
    (c | c), (-s | s): out1 = round(x1 c + x2 (-s)), out2 = round(x2 c + x1 s), products and sum in
    float32 (torch's x * cos + roll(x) * sin_signed). Heads from `rotated_heads` on are not rotated.
    SCALED: X is an `Fp8Output`'s product (head h's column j at h * 2 HALF + j, stride_xh = 2 HALF),
    scaled on load (`_load_scaled`): its heads past `rotated_heads` (v's) are only scaled."""
    tok = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, HALF)
    pos = tl.load(Positions + tok).to(tl.int64)
    ptr1 = X + tok * stride_xt + heads[:, None] * stride_xh + d[None, :]
    mask = (heads < num_heads)[:, None]
    col1 = heads[:, None] * (2 * HALF) + d[None, :]
    dtype = X.dtype.element_ty
    x1 = _load_scaled(ptr1, mask, XScale, WScale, tok, col1, SCALED)
    x2 = _load_scaled(ptr1 + HALF, mask, XScale, WScale, tok, col1 + HALF, SCALED)
    c1 = tl.load(Cos + pos * stride_table + d).to(tl.float32)[None, :]
    c2 = tl.load(Cos + pos * stride_table + HALF + d).to(tl.float32)[None, :]
    s1 = tl.load(SinSigned + pos * stride_table + d).to(tl.float32)[None, :]
    s2 = tl.load(SinSigned + pos * stride_table + HALF + d).to(tl.float32)[None, :]
    rotated = (heads < rotated_heads)[:, None]
    out1 = tl.where(rotated, x1 * c1 + x2 * s1, x1)
    out2 = tl.where(rotated, x2 * c2 + x1 * s2, x2)
    tl.store(ptr1, out1.to(dtype), mask=mask)
    tl.store(ptr1 + HALF, out2.to(dtype), mask=mask)


def _fp8_buffers(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 [rows, cols], float32 [rows, 1]): a quantized output and its row scales."""
    return (torch.empty((rows, cols), dtype=FP8, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


def _unwrapped(x: torch.Tensor | Fp8Output) -> tuple[torch.Tensor, Fp8Output | None]:
    """(the tensor a kernel reads, the `Fp8Output` it stands in for or None): an `Fp8Output`'s product."""
    return (x.product, x) if isinstance(x, Fp8Output) else (x, None)


def _scale_args(scaled: Fp8Output | None, unused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel's (XScale, WScale) arguments: `scaled`'s scale vectors, or with SCALED off any tensor
    (`unused`: never read)."""
    return (unused, unused) if scaled is None else (scaled.x_scale, scaled.w_scale)


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
        self._launch(x, num_heads, head_dim, num_heads, None)
        return x

    def scale_and_rotate(self, qkv: Fp8Output, rotated_heads: int, head_dim: int) -> torch.Tensor:
        """`StepRotary.scale_and_rotate` in one pass, in place: the product's buffer becomes the output."""
        out = qkv.product
        num_tokens, width = out.shape
        if num_tokens > 0:
            assert out.stride(1) == 1 and head_dim % 2 == 0 and head_dim & (head_dim - 1) == 0, "head_dim: a power of 2"
            self._launch(out.view(num_tokens, width // head_dim, head_dim), width // head_dim, head_dim,
                         rotated_heads, qkv)
        return out

    def _launch(self, x: torch.Tensor, num_heads: int, head_dim: int, rotated_heads: int,
                scaled: Fp8Output | None) -> None:
        """x [num_tokens, heads, head_dim]; scaled: the `Fp8Output` whose product x views (SCALED), or None."""
        block_h = min(triton.next_power_of_2(num_heads), 16)
        x_scale, w_scale = _scale_args(scaled, x)
        _rotary_kernel[(x.shape[0], triton.cdiv(num_heads, block_h))](
            x, self.positions, self.cos, self.sin_signed, x_scale, w_scale,
            x.stride(0), x.stride(1), self.cos.stride(0), num_heads, rotated_heads,
            HALF=head_dim // 2, BLOCK_H=block_h, SCALED=scaled is not None, num_warps=4,
        )


class TritonOps(TorchOps):
    """TorchOps with each op as one kernel; what a kernel cannot take falls back to TorchOps."""

    name = "triton"
    scales_on_load = True

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

    def add_rms_norm(self, x: torch.Tensor | Fp8Output, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float, quantize: bool = False) -> tuple[torch.Tensor | Fp8Input, torch.Tensor]:
        """The sum goes into residual's buffer, the normalised sum into x's (an `Fp8Output`'s product;
        quantize: new buffers)."""
        x, scaled = _unwrapped(x)
        assert x.is_contiguous() and residual.is_contiguous() and x.shape == residual.shape
        rows, res = x.view(-1, x.shape[-1]), residual.view(-1, x.shape[-1])
        if quantize:
            q, scale = _fp8_buffers(*rows.shape, rows.device)
            self._launch_norm(rows, res, weight, q, eps, has_residual=True, scale=scale, scaled=scaled)
            return Fp8Input(q, scale, x.dtype), residual
        self._launch_norm(rows, res, weight, rows, eps, has_residual=True, scaled=scaled)
        return x, residual

    @staticmethod
    def _launch_norm(x, residual, weight, out, eps, has_residual, scale=None, scaled=None):
        """scale: [rows, 1] float32 for the row scales (QUANT; out float8 [rows, k]), or None.
        scaled: the `Fp8Output` whose product x is (SCALED), or None."""
        if x.shape[0] == 0:
            return
        block = triton.next_power_of_2(x.shape[1])
        x_scale, w_scale = _scale_args(scaled, x)
        _rms_norm_kernel[(x.shape[0],)](
            x, residual, weight, out, out if scale is None else scale, x_scale, w_scale,
            x.stride(0), residual.stride(0), out.stride(0), x.shape[1], eps, FP8_MAX, _MIN_SCALE,
            HAS_RESIDUAL=has_residual, QUANT=scale is not None, SCALED=scaled is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16),
        )

    def silu_and_mul(self, gate_up: torch.Tensor | Fp8Output, quantize: bool = False) -> torch.Tensor | Fp8Input:
        gate_up, scaled = _unwrapped(gate_up)
        rows = _rows(gate_up)
        n_cols = rows.shape[1] // 2
        if quantize and n_cols <= FUSED_QUANT_MAX_COLS:
            q, scale = _fp8_buffers(rows.shape[0], n_cols, rows.device)
            self._launch_silu(rows, q, scale, scaled)
            return Fp8Input(q, scale, gate_up.dtype)
        out = torch.empty(rows.shape[0], n_cols, dtype=gate_up.dtype, device=gate_up.device)
        self._launch_silu(rows, out, scaled=scaled)
        if quantize:  # too wide for one program: the unfused pair, the same bits
            return Fp8Input(*quantize_rows_triton(out), gate_up.dtype)
        return out.view(*gate_up.shape[:-1], n_cols)

    @staticmethod
    def _launch_silu(rows, out, scale=None, scaled=None):
        """rows [n, 2 * i] -> out [n, i]; scale: [n, 1] float32 (QUANT, whole rows) or None (tiles of 1024).
        scaled: the `Fp8Output` whose product rows is (SCALED), or None."""
        n_cols = out.shape[1]
        if rows.shape[0] == 0:
            return
        if scale is None:
            block, warps = min(triton.next_power_of_2(n_cols), 1024), 4
        else:
            block = triton.next_power_of_2(n_cols)
            warps = max(4, min(16, block // 1024))  # as quantize_rows_triton
        x_scale, w_scale = _scale_args(scaled, rows)
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(n_cols, block))](
            rows, out, out if scale is None else scale, x_scale, w_scale, rows.stride(0), out.stride(0), n_cols,
            FP8_MAX, _MIN_SCALE, QUANT=scale is not None, SCALED=scaled is not None, BLOCK=block, num_warps=warps,
        )

    def step_rotary(self, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
                    dtype: torch.dtype) -> TritonStepRotary | StepRotary:
        if cos.shape[1] & (cos.shape[1] - 1):  # the kernel's halves are power-of-2 ranges
            return super().step_rotary(cos, sin_signed, positions, dtype)
        return TritonStepRotary(cos, sin_signed, positions)
