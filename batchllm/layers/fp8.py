"""FP8 (float8_e4m3fn) linear layers: weights with one float32 scale per output channel, activations
quantized per token at run time (dynamic: scale = amax of the row / 448).

y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n], accumulated in float32, output in
the model dtype. On CUDA devices with FP8 tensor cores (compute capability >= 8.9) the sum runs in
torch's row-wise `_scaled_mm`; elsewhere (CPU, older GPUs, a K or N not a multiple of 16) the same
quantized operands are widened to float32 and multiplied, so CPU tests check the GPU path's math.

Per-output-channel scales keep tensor parallelism simple: a column-parallel shard takes its rows'
scales, a row-parallel shard (a slice of K) keeps every scale. Weights are quantized from the whole
checkpoint tensor, before sharding, so every tensor-parallel size runs the same quantized model.

Fused activation quantization (`fp8_fused_quant`, on by default: the same bits, ~6% faster on an H200): the
op before a layer (RMSNorm, SiLU-and-mul) hands it an `Fp8Input`, already quantized with the layer's
own quantizer's arithmetic, and the layer skips its quantize. `prepare_fp8` turns it on for a layer
(`takes_quantized`) only where the model's ops reproduce that quantizer bit for bit
(`ops.fused_quantizer()`: TorchOps -> `quantize_rows`, TritonOps -> `quantize_rows_triton`). Each
such layer's input has one consumer, so the unquantized tensor is never needed.

Deferred scales (`fp8_deferred_scales`, on by default): a layer that `defers_scales`, given at most
DEFERRED_SCALES_MAX_TOKENS tokens of a bfloat16 model, runs the product with unit scales (cuBLAS's
per-tensor-scaled FP8 kernels, 1.02-1.78x its row-scaled one at 16-512 tokens on an H200; no faster
on prefill-sized products) and returns an `Fp8Output`: the unscaled product with its two scale
vectors. The op that consumes it (the next RMSNorm, SiLU-and-mul, or the rotation of q, k and v)
applies the scales as it loads it (`ops.py`). `DecoderForCausalLM.match_deferred_scales` turns it on
where `_scaled_mm` runs and the model's ops scale on load (TritonOps), for layers whose output goes
straight to such an op: no bias, no all-reduce, no q/k norm.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from batchllm.layers.tp_layers import RowParallelLinear

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn."""
_MIN_SCALE = 1e-12
"""Floor of a scale, so an all-zero row quantizes to zeros instead of NaNs."""
DEFERRED_SCALES_MAX_TOKENS = 512
"""Most tokens a layer that `defers_scales` runs the unit-scaled product for: up to 512 tokens cuBLAS's
per-tensor FP8 kernels were 1.02-1.78x its row-scaled one on the 8B shapes; from 1,024 to 16,384 tokens
0.93-1.13x, the sign changing between leases (`benchmarks/fp8_gemm.py`'s "tens x", H200, sessions 25-26).
Deferring at every step size made the paper workload 0.7-1.1% slower end to end (docs/benchmarks.md,
session 26)."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, k] -> (float8 [rows, k], float32 scales [rows, 1]) with x ~= q * scale, each row
    scaled so its largest magnitude maps to 448 (relative rounding error <= 2^-4 per element,
    larger only for elements below e4m3's normal range, 2^-6 * scale). Each element is multiplied by
    the row's reciprocal 1 / scale (float32, one IEEE division a row) rather than divided by scale:
    the quotient may be 1 ulp apart, so a value at an e4m3 rounding tie may land one step away
    (0.04% of elements), and the fused SiLU quantizer ran 1.47x faster on an H200. Every step is an
    IEEE operation, on the CPU and on CUDA, as in `fp8_triton.quantize_row`: the same bits. Weights
    quantized at load (`channel_quantized`) take the same arithmetic."""
    amax = x.abs().amax(dim=-1, keepdim=True).to(torch.float32)
    # a divisor on the device (torch on CUDA multiplies by the reciprocal of a host scalar), made by a fill
    # kernel: a host tensor's copy would synchronize, which a CUDA graph's capture refuses
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp_(min=_MIN_SCALE)
    return quantize(x.to(torch.float32) * (1.0 / scale), None), scale


class Fp8Input(NamedTuple):
    """An activation already quantized per token for an `Fp8Linear`: what its quantizer would make
    of the model-dtype tensor the op would otherwise have returned."""

    q: torch.Tensor  # [m, k] float8_e4m3fn
    scale: torch.Tensor  # [m, 1] float32
    dtype: torch.dtype  # the model dtype: the layer's output dtype


class Fp8Output(NamedTuple):
    """An FP8 layer's output with its scales not yet applied (`Fp8Linear.defers_scales`): the layer's
    output is `scaled()`, round(round_bf16(product) * x_scale[m] * w_scale[n]) in `dtype`, computed
    in float32. The consumer of the layer's output applies them (`ops.py`)."""

    product: torch.Tensor  # [m, n] bfloat16: sum_k xq[m, k] * wq[n, k], accumulated in float32, rounded once
    x_scale: torch.Tensor  # [m, 1] float32: the input's per-token scales
    w_scale: torch.Tensor  # [n] float32: the weight's per-channel scales
    dtype: torch.dtype  # the model dtype (bfloat16: the only one that defers)

    def scaled(self) -> torch.Tensor:
        """The layer's output [m, n] in `dtype` (a new tensor)."""
        return (self.product.to(torch.float32) * self.x_scale * self.w_scale.view(1, -1)).to(self.dtype)


def materialized(x):
    """x, or the output an `Fp8Output` stands for: what an op that does not apply deferred scales
    itself takes."""
    return x.scaled() if isinstance(x, Fp8Output) else x


def quantize(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x / scale in float32, clamped to +-448, cast to float8_e4m3fn (scale: broadcastable to x, or
    None: 1.0). The clamp because a cast of a value past e4m3's range is NaN on some devices, where
    torch's CPU cast saturates. The one quantizing cast of weights, activations and the KV cache."""
    x = x.to(torch.float32)
    if scale is not None:
        x = x / scale
    return x.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8 q times scale, taken in float32 and rounded once to `dtype`. scale: one per row of q
    ([rows] or [rows, 1]), one value (a 0-d tensor: a KV cache's per-layer scale), or None (1.0)."""
    x = q.to(torch.float32)
    if scale is not None:
        x = x * (scale.reshape(-1, 1) if scale.dim() == 1 else scale)
    return x.to(dtype)


def dequantize_blocks(q: torch.Tensor, block_scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A block-wise checkpoint weight: q [n, k] float8, block_scale [ceil(n/bn), ceil(k/bk)] (the
    last block of a row or column may be ragged) -> float32 [n, k]."""
    n, k = q.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    if tuple(block_scale.shape) != (rows, cols):
        raise ValueError(f"block scale of shape {tuple(block_scale.shape)} for a [{n}, {k}] weight with "
                         f"{bn}x{bk} blocks; expected ({rows}, {cols})")
    full = block_scale.to(torch.float32).repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return q.to(torch.float32) * full


def channel_quantized(weight: torch.Tensor, scale: torch.Tensor | None, strategy: str,
                      block: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint weight [n, k] in the engine's layout: (float8 [n, k], float32 scales [n]).

    A 16/32-bit weight (scale None) is quantized per row. A float8 weight keeps its values when
    its scale is per tensor (one value, repeated over the rows) or per channel (n values); a
    block-wise one ([ceil(n/bn), ceil(k/bk)] scales) is dequantized and requantized per row."""
    n = weight.shape[0]
    if weight.dtype != FP8:
        q, s = quantize_rows(weight)
        return q, s.view(n)
    if scale is None:
        raise ValueError("a float8 weight without its scale")
    if strategy == "block":
        q, s = quantize_rows(dequantize_blocks(weight, scale, block))
        return q, s.view(n)
    if strategy == "tensor" and scale.numel() == 1:
        return weight, scale.to(torch.float32).reshape(1).expand(n).contiguous()
    if strategy == "channel" and scale.numel() == n:
        return weight, scale.to(torch.float32).reshape(n).contiguous()
    raise ValueError(f"a {strategy} weight scale of shape {tuple(scale.shape)} for a weight of {n} rows")


def dequantized(weight: torch.Tensor, scale: torch.Tensor, strategy: str,
                block: tuple[int, int] | None = None) -> torch.Tensor:
    """A float8 checkpoint weight [n, k] times its checkpoint scale (per tensor: one value; per channel: n;
    block-wise: one per `block` tile), in float32: the weight a weight-only (W8A16) layer runs with. Exact: the
    per-tensor and per-channel forms are `channel_quantized`'s layout dequantized, block-wise tiles are dequantized
    as they are (that layout would round them again)."""
    if strategy == "block":
        return dequantize_blocks(weight, scale, block)
    return dequantize(*channel_quantized(weight, scale, strategy))


def scaled_mm_supported(device: torch.device) -> bool:
    """FP8 tensor cores reachable through torch._scaled_mm (CUDA, compute capability 8.9 or later)."""
    return (device.type == "cuda" and hasattr(torch, "_scaled_mm")
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               use_scaled_mm: bool, quantize=quantize_rows) -> torch.Tensor:
    """x [m, k] (model dtype) times the quantized weight [n, k] float8 with scales [n] float32 ->
    [m, n] in x's dtype; x is quantized per row here by `quantize` (`quantize_rows` or its Triton
    kernel, the same arithmetic)."""
    xq, x_scale = quantize(x)  # [m, k] float8, [m, 1] float32
    return fp8_mm(xq, x_scale, x.dtype, weight, weight_scale, use_scaled_mm)


def fp8_mm(xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype, weight: torch.Tensor,
           weight_scale: torch.Tensor, use_scaled_mm: bool) -> torch.Tensor:
    """The product of quantized operands: xq [m, k] float8 with scales [m, 1], the weight [n, k]
    float8 with scales [n] -> [m, n] in `dtype`, accumulated in float32."""
    n, k = weight.shape
    if use_scaled_mm and n % 16 == 0 and k % 16 == 0:
        # Row-wise scaling: mat2 column-major (the transpose of the row-major [n, k] weight), scales
        # [m, 1] and [1, n] float32, bfloat16 output (the only one row-wise scaling supports).
        y = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, n),
                             out_dtype=torch.bfloat16)
        return y if dtype == torch.bfloat16 else y.to(dtype)
    y = (xq.to(torch.float32) @ weight.to(torch.float32).t()) * x_scale * weight_scale.view(1, n)
    return y.to(dtype)


def unit_scaled_mm(xq: torch.Tensor, weight: torch.Tensor, one: torch.Tensor | None) -> torch.Tensor:
    """xq [m, k] float8 times the float8 weight [n, k] with no scales -> [m, n] bfloat16 (float32
    accumulation, one rounding). one: a float32 1.0 on the device for `_scaled_mm`'s per-tensor scales
    (the FP8 tensor cores), or None: the same sum widened to float32 (CPU, older GPUs)."""
    if one is not None:
        return torch._scaled_mm(xq, weight.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    return (xq.to(torch.float32) @ weight.to(torch.float32).t()).to(torch.bfloat16)


class Fp8Linear(nn.Module):
    """A linear layer with float8 weights [out, in] and per-output-channel float32 scales [out];
    the bias (if any) stays in the model dtype. `row_parallel`: the layer is a row-parallel shard
    (its weight holds this rank's input columns, `tp_shard_dims`); the ranks' outputs are summed by
    one all-reduce and the bias is added once, after it."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp=None, row_parallel: bool = False) -> None:
        super().__init__()
        self.tp = tp if row_parallel else None
        self.tp_shard_dims = {"weight": 1} if row_parallel else {}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.use_scaled_mm = False
        self.quantize = quantize_rows
        """Both set by `prepare_fp8` once the module is on its device."""
        self.fuse_quant = False
        """The fp8_fused_quant setting (`prepare_fp8`)."""
        self.takes_quantized = False
        """Whether an op before this layer that can quantize its output (a norm, SiLU-and-mul) should
        hand it an `Fp8Input` (`match_fused_quant`: the setting is on and the model's ops reproduce
        `self.quantize`); a plain tensor is accepted either way (o_proj always gets one)."""
        self.defers_scales = False
        """Whether the layer returns an `Fp8Output` for decode-sized inputs of a bfloat16 model (set by
        `match_deferred_scales`: its output goes straight into an op that applies the scales)."""
        self.unit_scale: torch.Tensor | None = None
        """A float32 1.0 on the device where `_scaled_mm` runs (`prepare_fp8`): the unit scales."""

    def defers_for(self, m: int, dtype: torch.dtype) -> bool:
        """Whether an input of m tokens in `dtype` gets an `Fp8Output` (see the module docstring)."""
        n, k = self.weight.shape
        return (self.defers_scales and dtype == torch.bfloat16 and m <= DEFERRED_SCALES_MAX_TOKENS
                and n % 16 == 0 and k % 16 == 0 and self.tp is None and self.bias is None)

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor | Fp8Output:
        if not isinstance(x, Fp8Input) and x.dim() == 2 and self.defers_for(x.shape[0], x.dtype):
            x = Fp8Input(*self.quantize(x), x.dtype)  # quantized here: the product below is deferred
        if isinstance(x, Fp8Input):  # quantized by the op before (fused) or above: [m, k]
            if self.defers_for(x.q.shape[0], x.dtype):
                return Fp8Output(unit_scaled_mm(x.q, self.weight, self.unit_scale), x.scale, self.weight_scale, x.dtype)
            y = fp8_mm(x.q, x.scale, x.dtype, self.weight, self.weight_scale, self.use_scaled_mm)
        else:
            shape = x.shape
            y = fp8_matmul(x.reshape(-1, shape[-1]), self.weight, self.weight_scale, self.use_scaled_mm,
                           self.quantize)
            y = y.view(*shape[:-1], y.shape[-1])
        if self.tp is not None:
            y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


def restore_fp8_dtypes(model: nn.Module) -> None:
    """After `model.to(dtype)` (which casts every floating tensor, float8 included) put the FP8
    layers' weights and scales back to float8 / float32. Run on the meta device: it costs nothing."""
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.weight.data = module.weight.data.to(FP8)
            module.weight_scale.data = module.weight_scale.data.to(torch.float32)


def prepare_fp8(model: nn.Module, device: torch.device, ops=None, fuse_quant: bool = False,
                defer_scales: bool = False) -> None:
    """Choose the matmul path and the activation quantizer of every FP8 layer for `device` (once,
    at load): on FP8 GPUs `_scaled_mm`, and the Triton quantizer where Triton is installed.
    fuse_quant (the fp8_fused_quant setting): layers whose quantizer `ops` (the model's op policy)
    reproduce take their input quantized by the op before them (`match_fused_quant`).
    defer_scales (the fp8_deferred_scales setting): where `_scaled_mm` runs, the model's layers that
    can hand their scales to the next op do, where its ops apply them as they load
    (`match_deferred_scales`; elsewhere the unit-scaled product would only add a pass)."""
    fast = scaled_mm_supported(device)
    one = torch.ones((), dtype=torch.float32, device=device) if fast else None
    quantize = quantize_rows
    if fast:
        try:
            from batchllm.layers.fp8_triton import quantize_rows_triton as quantize
        except ImportError:
            pass
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.use_scaled_mm = fast
            module.unit_scale = one
            module.quantize = quantize
            module.fuse_quant = fuse_quant
    if ops is not None:
        match_fused_quant(model, ops)
    if hasattr(model, "match_deferred_scales"):
        model.fp8_deferred_scales = defer_scales and fast
        model.match_deferred_scales()


def match_fused_quant(model: nn.Module, ops) -> None:
    """Set each FP8 layer's `takes_quantized` for the op policy `ops` (at load, and again when the
    model switches ops): on only with the setting and where `ops.fused_quantizer()` is the layer's
    quantizer, so a fused op's output is bit for bit what the layer would have made of its input."""
    fused = ops.fused_quantizer()
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.takes_quantized = module.fuse_quant and module.quantize is fused


def make_linear(fp8: bool):
    """The decoder's linear-layer factory: (in, out, bias, tp, row_parallel) -> a module. Without
    FP8: nn.Linear for column-parallel layers (their sharding is in the shard spec) and
    RowParallelLinear for row-parallel ones."""
    def build(in_features: int, out_features: int, bias: bool, tp=None, row_parallel: bool = False) -> nn.Module:
        if fp8:
            return Fp8Linear(in_features, out_features, bias, tp, row_parallel)
        if row_parallel:
            return RowParallelLinear(in_features, out_features, bias, tp)
        return nn.Linear(in_features, out_features, bias=bias)

    return build
