"""The KV store as one Triton kernel (CUDA): each new token's K and V written into their slots of the
paged cache in one launch, where `backend.store_kv` runs, per K and per V, a quantize (a float32 copy,
a divide, a clamp, a cast: a kernel each) and an `index_copy_`.

Same bytes as `store_kv` (`kv_quant.store_slots`):
* a 16-bit or float32 cache: the rows copied bit for bit (moved as integers of the same width);
* an fp8 cache: q = cast_e4m3(clamp(x / scale, +-448)) from x in float32, the arithmetic of
  `layers/fp8.quantize`: the division is IEEE (`div_rn`), as torch's on CUDA with a scale that is a
  device tensor (the model's `kv_scale` rows; torch takes the reciprocal only of a *host* scalar,
  the case of `fp8_triton.py`'s per-token scales, not this one), and the cast rounds to nearest
  even; no scale (None) is 1.0, which divides exactly. tests/gpu/test_kv_store_triton.py holds it
  to bit equality.

Slots are those of `AttentionMetadata.slot_mapping`; padding rows of a CUDA-graph decode batch
carry the spare block's slot (`runner/cuda_graphs.py`) and are written there like any row. A
negative slot is skipped (vLLM's mark of a row without a slot; the runner makes none, and torch's
`index_copy_` would refuse one) so that such a row can never write outside the cache.
Imported only where Triton is installed; `TritonBackend` calls it for caches on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchllm.attention.kv_quant import layer_caches
from batchllm.layers.fp8 import FP8, FP8_MAX

_BITS = {2: torch.int16, 4: torch.int32}
"""Element size -> the integer type a plain (16/32-bit) cache's rows are copied as."""


@triton.jit
def _store_kv_kernel(
    Key, Value, KCache, VCache, Slots, Scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_vcd, stride_scale,
    num_kv_heads, head_dim, fp8_max,
    QUANTIZE: tl.constexpr, HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """One token per program: its [num_kv_heads, head_dim] K and V rows (last dim contiguous) to
    cache slot Slots[token] (caches [blocks, BLOCK_SIZE, num_kv_heads, head_dim] views; K's last dim
    contiguous, V's head-dim stride stride_vcd: 1, or BLOCK_SIZE for a keys-major V, `kv_quant.py`)."""
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + tok).to(tl.int64)
    if slot < 0:
        return
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim)
    k = tl.load(Key + tok * stride_kt + heads * stride_kh + dims, mask=mask)
    v = tl.load(Value + tok * stride_vt + heads * stride_vh + dims, mask=mask)
    if QUANTIZE:
        k_scale = tl.load(Scale)
        v_scale = tl.load(Scale + stride_scale)
        # clamp first: past e4m3's range the cast is NaN on some devices (as `fp8.quantize`); a NaN
        # stays NaN, as through torch's clamp
        k = tl.clamp(tl.math.div_rn(k.to(tl.float32), k_scale), -fp8_max, fp8_max, tl.PropagateNan.ALL)
        v = tl.clamp(tl.math.div_rn(v.to(tl.float32), v_scale), -fp8_max, fp8_max, tl.PropagateNan.ALL)
        k = k.to(KCache.dtype.element_ty)
        v = v.to(VCache.dtype.element_ty)
    tl.store(KCache + block * stride_kcb + offset * stride_kcs + heads * stride_kch + dims, k, mask=mask)
    tl.store(VCache + block * stride_vcb + offset * stride_vcs + heads * stride_vch + dims * stride_vcd, v, mask=mask)


def _unit_scales(device: torch.device) -> torch.Tensor:
    return torch.ones(2, dtype=torch.float32, device=device)


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                    kv_scale: torch.Tensor | None = None) -> None:
    """As `backend.store_kv`, in one launch: key, value [num_tokens, num_kv_heads, head_dim] (any
    token and head strides, last dim contiguous); kv_cache [2, num_blocks, block_size, num_kv_heads,
    head_dim] (its V keys-major where `kv_quant.values_keys_major`); slot_mapping [num_tokens] int64;
    kv_scale [2] float32 (k_scale, v_scale) of an fp8 cache, None: 1.0 (ignored for other caches).
    With a CUDA graph, pass kv_scale (the model's): None allocates the unit scales."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    k_cache, v_cache = layer_caches(kv_cache)  # [blocks, block_size, kv_heads, head_dim] views
    quantize = kv_cache.dtype == FP8
    if quantize:
        scale = kv_scale if kv_scale is not None else _unit_scales(key.device)
    else:  # copied as integers: exact for every 16/32-bit type, whatever the arithmetic would do
        if kv_cache.dtype != key.dtype:
            raise ValueError(f"K/V of {key.dtype} into a {kv_cache.dtype} cache: a plain cache holds the model's dtype")
        bits = _BITS.get(key.element_size())
        if bits is None:
            raise ValueError(f"the fused store takes a 16/32-bit or fp8 cache, got {kv_cache.dtype}")
        key, value, k_cache, v_cache = key.view(bits), value.view(bits), k_cache.view(bits), v_cache.view(bits)
        scale = slot_mapping  # not read without QUANTIZE: any tensor stands in
    for name, t in (("key", key), ("value", value), ("k cache", k_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"the store needs {name} contiguous in its last dim, got strides {t.stride()}")
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *k_cache.stride()[:3], *v_cache.stride(), scale.stride(0),
        num_kv_heads, head_dim, FP8_MAX,
        QUANTIZE=quantize, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1],
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1,
    )
