"""The KV cache's element type, and FP8 quantization of what is stored in it.

With `kv_cache_dtype="auto"` the cache holds K/V in the model's dtype and nothing here changes a
value. With "fp8" (alias "fp8_e4m3") it holds `torch.float8_e4m3fn`: one byte per element, so the
same memory holds twice the tokens of a 16-bit cache. Each layer has one float32 scale for K and one
for V (`kv_scale`, a [2] tensor: k_scale, v_scale), 1.0 unless the checkpoint provides calibrated
ones (as vLLM does). Invariants:

* written: `layers/fp8.quantize` (x / scale, clamped to +-448, cast: the same cast as FP8 weights
  and activations), here by `store_slots`, or on CUDA in one Triton kernel for K and V
  (`kv_store_triton.py`, the same bytes);
* read: `x.to(dtype) * scale` by every attention path (`read_slots` here for the torch reference;
  the Triton kernel folds k_scale into the softmax scale and multiplies its output by v_scale,
  which is the same arithmetic since attention is linear in V);
* indexing (scatter of new tokens, gathers, copy-on-write block copies) goes through a uint8 view
  of the cache: the same bytes, and index kernels exist for uint8 on every device (not all exist
  for float8 types).
"""

from __future__ import annotations

import torch

from batchllm.layers.fp8 import FP8, dequantize, quantize

KV_CACHE_DTYPES = {"auto": None, "fp8": FP8, "fp8_e4m3": FP8}
"""`kv_cache_dtype` option (CacheConfig checks its choices) -> the cache's element type (None: the model's dtype)."""


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8


def split_scales(cache: torch.Tensor, kv_scale: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(k_scale, v_scale) of an fp8 cache (None, None: 1.0, or a cache that is not fp8; no views
    are made then, for the 16-bit path's host time)."""
    if kv_scale is None or not is_fp8(cache):
        return None, None
    return kv_scale[0], kv_scale[1]


def store_slots(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None) -> None:
    """cache [slots, kv_heads, head_dim] (a view of one layer's K or V): rows `slots` := x, quantized
    when the cache is fp8 (x in the model's dtype)."""
    if not is_fp8(cache):
        cache.index_copy_(0, slots, x)
        return
    cache.view(torch.uint8).index_copy_(0, slots, quantize(x, scale).view(torch.uint8))


def read_slots(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype,
               scale: torch.Tensor | None) -> torch.Tensor:
    """Rows `slots` of cache [slots, kv_heads, head_dim] in `dtype`, dequantized when the cache is fp8."""
    if not is_fp8(cache):
        return cache.index_select(0, slots)
    return dequantize(cache.view(torch.uint8).index_select(0, slots).view(FP8), scale, dtype)
