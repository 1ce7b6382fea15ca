"""Issue 20: in 16-bit dtypes every elementwise op rounds once, at its outputs (ops.py, "Precision"):
its result equals the same op computed in float32 on the same inputs, then rounded. Transformers'
arithmetic (a rounding after every torch op) fails these equalities on a few percent of elements.
The Triton kernels are checked too, in Triton's interpreter made to round to nearest as the GPU
does (the interpreter truncates float32 -> bfloat16 by default)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from batchllm.layers.ops import TorchOps
from batchllm.layers.rotary import RotaryEmbedding
from tests.helpers import interpreter_rounds_to_nearest

BF16 = torch.bfloat16


def _policies():
    params = [pytest.param("torch", id="torch")]
    interpreted = (importlib.util.find_spec("triton") is not None and not torch.cuda.is_available()
                   and os.environ.get("TRITON_INTERPRET") == "1")
    params.append(pytest.param("triton", id="triton-interpreted",
                               marks=pytest.mark.skipif(not interpreted, reason="needs Triton's interpreter (CPU)")))
    return params


@pytest.fixture(params=_policies())
def ops(request):
    if request.param == "torch":
        return TorchOps()
    interpreter_rounds_to_nearest()
    from batchllm.layers.triton_ops import TritonOps

    return TritonOps()


def _data(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(BF16)


def test_add_rms_norm_rounds_once(ops):
    """The residual sum is normalised unrounded; the sum handed on is rounded once."""
    x, residual = _data(9, 576, scale=3), _data(9, 576, seed=1)
    weight = (1 + 0.3 * _data(576, seed=2).float()).to(BF16)
    out, summed = ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    want_out, want_sum = TorchOps().add_rms_norm(x.float(), residual.float(), weight.float(), 1e-5)
    assert out.dtype == summed.dtype == BF16
    assert torch.equal(summed, want_sum.to(BF16))
    torch.testing.assert_close(out, want_out.to(BF16), rtol=0, atol=0)


def test_rms_norm_rounds_once(ops):
    x, weight = _data(5, 576, scale=2), (1 + 0.3 * _data(576, seed=3).float()).to(BF16)
    want = TorchOps().rms_norm(x.float(), weight.float(), 1e-5).to(BF16)
    assert torch.equal(ops.rms_norm(x.clone(), weight, 1e-5), want)


def test_silu_and_mul_rounds_once(ops):
    gate_up = _data(6, 2 * 1536, scale=3, seed=4)
    want = TorchOps().silu_and_mul(gate_up.float()).to(BF16)
    assert torch.equal(ops.silu_and_mul(gate_up.clone()), want)


def test_rotary_rounds_once_with_float32_tables(ops):
    """q and k rotated with the float32 cos/sin (not tables rounded to bf16 first), one rounding."""
    table = RotaryEmbedding(64, 4096, 100000.0, None)
    qk = _data(11, 12, 64, seed=5)
    positions = torch.randint(0, 4096, (11,), generator=torch.Generator().manual_seed(6))
    want = TorchOps().step_rotary(table.cos, table.sin_signed, positions, torch.float32)(qk.float()).to(BF16)
    got = ops.step_rotary(table.cos, table.sin_signed, positions, BF16)(qk.clone())
    assert got.dtype == BF16
    assert torch.equal(got, want)


def test_hf_rounding_fails_these_checks():
    """The old arithmetic (transformers': round after every op) is distinguishable here, so the
    equalities above pin the single rounding."""
    x, residual = _data(9, 576, scale=3), _data(9, 576, seed=1)
    weight = (1 + 0.3 * _data(576, seed=2).float()).to(BF16)
    summed = x + residual  # rounded, then normalised: HF's order
    variance = summed.float().pow(2).mean(-1, keepdim=True)
    hf_out = weight * (summed.float() * torch.rsqrt(variance + 1e-5)).to(BF16)
    want_out, _ = TorchOps().add_rms_norm(x.float(), residual.float(), weight.float(), 1e-5)
    assert (hf_out != want_out.to(BF16)).float().mean() > 0.01


def test_float32_residual_stream_is_not_rounded(ops):
    """The decoder carries the residual stream in float32: the sum handed on keeps every bit."""
    x, residual = _data(4, 576, scale=3), _data(4, 576, seed=1).float() + 1e-3
    weight = _data(576, seed=2)
    out, summed = ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    want_out, want_sum = TorchOps().add_rms_norm(x.float(), residual, weight.float(), 1e-5)
    assert summed.dtype == torch.float32 and out.dtype == BF16
    assert torch.equal(summed, want_sum)
    assert torch.equal(out, want_out.to(BF16))
