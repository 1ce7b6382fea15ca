"""The FP8 product of `fp8.fp8_mm` as a Triton kernel, for the small token counts of decode steps.

y [m, n] = (xq [m, k] @ wq [n, k]^T) * x_scale [m, 1] * w_scale [n], e4m3 operands, float32
accumulation, bfloat16 output: the arithmetic of torch's row-wise `_scaled_mm`. For m up to a few
hundred the product is bound by reading the weight (n * k bytes), and cuBLAS's FP8 kernels read it
at about half the rate of its bf16 ones on an H200 (benchmarks/fp8_gemm.py, session 11): they tile n
by 128, so a 4,096-row weight makes 32 programs for 132 SMs. Here the program tile is narrow in n
(`Fp8GemmTile.block_n`, 32 or 64: 64-128 programs for such a weight) and pipelined over k, so every
SM streams a slice of the weight. Imported only on CUDA where Triton is installed (`fp8.prepare_fp8`).

Invariants: k is a multiple of `block_k` (checked by `fits`); rows of x past m and columns past n
are masked; the weight is row-major [n, k] (its k contiguous: the e4m3 MMA's K-major operand).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl


class Fp8GemmTile(NamedTuple):
    """A launch shape: rows of x, rows of the weight and columns of k per program step; warps; stages."""
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int


SMALL_M_TILES = {  # largest m -> tile; m above the last bound goes to _scaled_mm
    64: Fp8GemmTile(64, 32, 128, 4, 6),
    128: Fp8GemmTile(64, 64, 128, 4, 5),
    256: Fp8GemmTile(128, 64, 128, 4, 4),
}
"""The tile per token count (the first bound at or above m)."""


@triton.jit
def _fp8_gemm_kernel(X, XScale, W, WScale, Y, m, n, k, stride_x, stride_w, stride_y,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y per program; program axis 0 over n, axis 1 over m."""
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < m, cols < n
    x_ptrs = X + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    w_ptrs = W + cols[None, :].to(tl.int64) * stride_w + ks[:, None]  # [BLOCK_K, BLOCK_N], k contiguous
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, k, BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    x_scale = tl.load(XScale + rows, mask=row_ok, other=0.0)
    w_scale = tl.load(WScale + cols, mask=col_ok, other=0.0)
    y = acc * x_scale[:, None] * w_scale[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def small_m_tile(m: int) -> Fp8GemmTile | None:
    """The tile for a product of m tokens: the first bound of SMALL_M_TILES at or above m (None
    above them all)."""
    return next((tile for bound, tile in SMALL_M_TILES.items() if m <= bound), None)


def fits(weight: torch.Tensor, tile: Fp8GemmTile) -> bool:
    """Whether the kernel takes this weight with this tile (k a multiple of block_k, k contiguous)."""
    return weight.shape[1] % tile.block_k == 0 and weight.stride(1) == 1


def fp8_mm_triton(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                  tile: Fp8GemmTile) -> torch.Tensor:
    """xq [m, k] float8 (k contiguous) with x_scale [m, 1] float32, weight [n, k] float8 with
    weight_scale [n] float32 -> [m, n] bfloat16 (the caller checks `fits`)."""
    m, k = xq.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=torch.bfloat16, device=xq.device)
    grid = (triton.cdiv(n, tile.block_n), triton.cdiv(m, tile.block_m))
    _fp8_gemm_kernel[grid](xq, x_scale.view(m), weight, weight_scale, y, m, n, k, xq.stride(0), weight.stride(0),
                           y.stride(0), BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                           num_warps=tile.warps, num_stages=tile.stages)
    return y


def small_gemm(max_tokens: int):
    """`fp8.fp8_mm`'s small-product path for the fp8_small_gemm_tokens setting: a function
    (xq, x_scale, weight, weight_scale) -> the bf16 product, or None where it does not apply (more
    than max_tokens or every SMALL_M_TILES bound, no tokens, a weight the kernel does not fit)."""
    def gemm(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
             weight_scale: torch.Tensor) -> torch.Tensor | None:
        m = xq.shape[0]
        tile = small_m_tile(m) if 0 < m <= max_tokens else None
        if tile is None or not fits(weight, tile):
            return None
        return fp8_mm_triton(xq, x_scale, weight, weight_scale, tile)

    return gemm
