"""The KV cache's element type, and FP8 quantization of what is stored in it.

With `kv_cache_dtype="auto"` the cache holds K/V in the model's dtype and nothing here changes a
value (unless the checkpoint declares an FP8 cache: `engine.resolve_model` then resolves "auto" to
"fp8"). With "fp8" (alias "fp8_e4m3") it holds `torch.float8_e4m3fn`: one byte per element, so the
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
  for float8 types);
* layout: an fp8 cache of blocks of whole 64-key tiles (`values_keys_major`) stores each block's V
  keys-major, [kv_heads, head_dim, block_size] in the bytes where K keeps [block_size, kv_heads,
  head_dim]. The e4m3 product P x V sums over keys, and an 8-bit MMA operand must be contiguous
  along its sum: with V head-dim-major Triton reads it from shared memory one byte at a time. Every
  reader and writer takes V through `layer_caches`, a view with the K layout's indices; whole-block
  copies move the same bytes either way. Such a cache starts zeroed and every store is clamped, so
  the slots a sequence has not written hold finite values: the kernel reads V in whole unmasked
  tiles, and keys past a sequence's end get p = 0.
"""

from __future__ import annotations

import torch

from batchllm.layers.fp8 import FP8, dequantize, quantize

KV_CACHE_DTYPES = {"auto": None, "fp8": FP8, "fp8_e4m3": FP8, "bfloat16": None, "float16": None}
"""`kv_cache_dtype` option (CacheConfig checks its choices) -> the cache's element type (None: the model's dtype)."""


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8


def split_scales(cache: torch.Tensor, kv_scale: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(k_scale, v_scale) of an fp8 cache (None, None: 1.0, or a cache that is not fp8; no views
    are made then, for the 16-bit path's host time)."""
    if kv_scale is None or not is_fp8(cache):
        return None, None
    return kv_scale[0], kv_scale[1]


KEYS_MAJOR_BLOCK = 64
"""Block sizes that are multiples of this (the kernel's 64-key tiles then lie whole in a block) give
an fp8 cache keys-major V (module docstring)."""


def values_keys_major(kv_cache: torch.Tensor) -> bool:
    """Whether a layer's cache [2, num_blocks, block_size, kv_heads, head_dim] keeps V keys-major."""
    return is_fp8(kv_cache) and kv_cache.shape[2] % KEYS_MAJOR_BLOCK == 0


def layer_caches(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, V) of a layer's cache [2, num_blocks, block_size, kv_heads, head_dim], each a [num_blocks,
    block_size, kv_heads, head_dim] view: [b, s, h, d] is slot s of block b, whatever the layout (a
    keys-major V: strides (block_size * kv_heads * head_dim, 1, head_dim * block_size, block_size))."""
    keys, values = kv_cache[0], kv_cache[1]
    if values_keys_major(kv_cache):
        blocks, block_size, heads, dim = values.shape
        values = values.as_strided(values.shape, (block_size * heads * dim, 1, dim * block_size, block_size))
    return keys, values


def _slot_index(cache: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    block_size = cache.shape[1]
    return torch.div(slots, block_size, rounding_mode="floor"), slots % block_size


def store_slots(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor, scale: torch.Tensor | None) -> None:
    """cache [num_blocks, block_size, kv_heads, head_dim] (one layer's K or V, `layer_caches`): slots
    `slots` := x [n, kv_heads, head_dim], quantized when the cache is fp8 (x in the model's dtype)."""
    if is_fp8(cache):
        cache, x = cache.view(torch.uint8), quantize(x, scale).view(torch.uint8)
    if cache.is_contiguous():  # one index_copy_ over the flat slots
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, x)
    else:
        cache.index_put_(_slot_index(cache, slots), x)


def read_slots(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype,
               scale: torch.Tensor | None) -> torch.Tensor:
    """Slots `slots` of cache [num_blocks, block_size, kv_heads, head_dim] (`layer_caches`) as [n,
    kv_heads, head_dim] in `dtype`, dequantized when the cache is fp8."""
    fp8 = is_fp8(cache)
    raw = cache.view(torch.uint8) if fp8 else cache
    if raw.is_contiguous():
        rows = raw.view(-1, *raw.shape[2:]).index_select(0, slots)
    else:
        rows = raw[_slot_index(raw, slots)]
    return dequantize(rows.view(FP8), scale, dtype) if fp8 else rows


def quantize_cache(cache: torch.Tensor, kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's cache [2, num_blocks, block_size, kv_heads, head_dim] in a float dtype as the fp8
    cache of the same slots would hold it: each value quantized as the store writes it (kv_scale [2]:
    k_scale, v_scale; None: 1.0), V keys-major where `values_keys_major` (for tests and benchmarks
    that build a cache directly)."""
    out = torch.zeros(cache.shape, dtype=torch.uint8, device=cache.device).view(FP8)
    k_scale, v_scale = (None, None) if kv_scale is None else (kv_scale[0], kv_scale[1])
    for view, x, scale in zip(layer_caches(out), cache, (k_scale, v_scale)):
        view.view(torch.uint8).copy_(quantize(x, scale).view(torch.uint8))
    return out
