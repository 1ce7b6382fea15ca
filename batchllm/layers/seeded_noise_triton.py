"""`seeded_noise.seeded_exponential_host` as one Triton kernel (CUDA): the same uint32 hash in native
uint32 arithmetic (wrapping products, logical shifts), one program per row and block of the
vocabulary, each writing its E values once. Imported only on CUDA where Triton is installed."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.layers import seeded_noise

BLOCK = 1024
_M1 = tl.constexpr(seeded_noise._M1)
_M2 = tl.constexpr(seeded_noise._M2)
_TOKEN_SALT = tl.constexpr(seeded_noise.TOKEN_SALT)
_UNIT = tl.constexpr(seeded_noise._UNIT)


@triton.jit
def _mix(x):
    """lowbias32 of uint32 values (`seeded_noise`'s `mix`: its numpy form is `_mix_array`)."""
    x ^= x >> 16
    x *= tl.full(x.shape, _M1, tl.uint32)
    x ^= x >> 15
    x *= tl.full(x.shape, _M2, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _seeded_exponential_kernel(Keys, Out, stride_out, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    key = tl.load(Keys + row).to(tl.uint32)
    h = _mix(key ^ _mix(tokens.to(tl.uint32) + tl.full(tokens.shape, _TOKEN_SALT, tl.uint32)))
    u = ((h >> 9).to(tl.float32) + 0.5) * _UNIT
    tl.store(Out + row.to(tl.int64) * stride_out + tokens, -tl.log(u), mask=tokens < vocab)


def seeded_exponential_triton(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """E [m, vocab] float32 for the row keys [m] (int64 holding uint32 values), as the host form."""
    out = torch.empty((keys.shape[0], vocab), dtype=torch.float32, device=keys.device)
    if keys.shape[0]:
        _seeded_exponential_kernel[(keys.shape[0], triton.cdiv(vocab, BLOCK))](keys, out, out.stride(0), vocab,
                                                                              BLOCK=BLOCK, num_warps=4)
    return out
