"""Per-token FP8 quantization of activations as one Triton kernel (CUDA): one read of the row in
the model dtype, one write of float8 values and a float32 scale, where the torch form
(`fp8.quantize_rows`) runs amax, a division, a reciprocal, a float32 copy, a multiply, a clamp and a
cast as kernels of their own over the whole activation. Same arithmetic: scale = max(amax / 448,
1e-12) in float32, q = round-to-nearest-even(clamp(x * (1 / scale), +-448)), each step an IEEE
operation as torch's (the same bits; tests/gpu/test_fp8_gpu.py, tests/unit/test_triton_interpreted.py).
`quantize_row` is that arithmetic as a function of a row held in registers; the fused norm and SiLU
kernels (`triton_ops.py`, fp8_fused_quant) call it too, so their outputs are this quantizer's bits.
Imported only on CUDA where Triton is installed (`fp8.prepare_fp8` decides).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.layers.fp8 import _MIN_SCALE, FP8, FP8_MAX


@triton.jit
def quantize_row(x, fp8_max, min_scale):
    """x: a whole row, float32 (lanes past its end 0) -> (x * (1 / scale) clamped to +-448, float32; scale)."""
    # div_rn: IEEE division as torch's (Triton's `/` on float32 is the approximate PTX division); one a
    # row: a division per element held the fused SiLU quantizer to 2-3 TB/s (1.47x slower, session 23)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 0), fp8_max), min_scale)
    q = tl.minimum(tl.maximum(x * tl.math.div_rn(1.0, scale), -fp8_max), fp8_max)
    return q, scale


@triton.jit
def _quantize_rows_kernel(X, Q, Scale, stride_x, stride_q, n_cols, fp8_max, min_scale, BLOCK: tl.constexpr):
    """One row per program: the whole row is held (BLOCK >= n_cols)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    q, scale = quantize_row(x, fp8_max, min_scale)
    tl.store(Q + row * stride_q + cols, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(Scale + row, scale)


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """As `fp8.quantize_rows`: x [rows, k] (last dim contiguous) -> (float8 [rows, k], float32 [rows, 1])."""
    rows, k = x.shape
    q = torch.empty((rows, k), dtype=FP8, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(k)
        _quantize_rows_kernel[(rows,)](x, q, scale, x.stride(0), q.stride(0), k, FP8_MAX, _MIN_SCALE, BLOCK=block,
                                       num_warps=max(4, min(16, block // 1024)))
    return q, scale
