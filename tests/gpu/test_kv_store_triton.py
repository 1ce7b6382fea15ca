"""The fused KV store (`attention/kv_store_triton.py`) on the device: the same bytes as the torch store
(`backend.store_kv`) in every slot of the cache, for 16-bit, float32 and fp8 caches, K/V as the
model passes them (strided views of one qkv buffer), scattered slots, graph padding rows (all to the
spare block's slot, with the same values), the scales as the model holds them, KV-head counts and
head dims that are not powers of two (the kernel's masked lanes), and a cache past 2^31 elements
(skipped with less than 6 GiB of free GPU memory).

    python3 -m pytest -q tests/gpu/test_kv_store_triton.py        (on the device; seconds)
"""

from __future__ import annotations

import pytest
import torch

from batchllm.attention.backend import store_kv
from batchllm.layers.fp8 import FP8

pytestmark = pytest.mark.gpu

BLOCK_SIZE = 16


def model_kv(n: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int, magnitude: float):
    """k, v [n, kv_heads, head_dim]: views into one [n, (heads + 2 kv_heads) * head_dim] buffer, as
    `decoder.Attention` hands them to the backend."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = (torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g, device="cuda") * magnitude).to(dtype)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(n, kv_heads, head_dim)
    return k, v


def random_cache(num_blocks: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int,
                 block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """[2, num_blocks + 1, block_size, kv_heads, head_dim] of random bytes (the last block: the spare
    one graph padding writes to), so untouched slots are compared too."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = torch.empty(0, dtype=dtype).element_size()
    shape = (2, num_blocks + 1, block_size, kv_heads, head_dim * width)
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8, device="cuda").view(dtype)


def scattered_slots(n: int, pad: int, num_blocks: int, seed: int, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """n - pad distinct slots in random order over the pool, then pad rows at the spare block's first
    slot (the runner's `pad_slot`)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    real = torch.randperm(num_blocks * block_size, generator=g, device="cuda")[:n - pad]
    return torch.cat([real, torch.full((pad,), num_blocks * block_size, device="cuda")]).to(torch.int64)


def model_scales(k: float, v: float) -> torch.Tensor:
    """[2] float32 on the device, a 16-byte aligned row of a [layers, 4] tensor (as `set_kv_scales`)."""
    return torch.tensor([[1.0, 1.0, 0.0, 0.0], [k, v, 0.0, 0.0]], device="cuda")[1, :2]


SHAPES = [  # tokens, padding rows, query heads, kv heads, head dim
    (1, 0, 32, 8, 128),
    (16, 3, 32, 8, 128),
    (333, 0, 32, 8, 128),
    (2048, 0, 32, 8, 128),
    (5, 2, 8, 1, 64),
    (257, 0, 4, 1, 64),
    (64, 7, 16, 8, 64),
    (100, 0, 14, 2, 128),
    # head counts and widths that are not powers of two: the kernel pads them to one and masks
    (37, 2, 9, 3, 64),  # SmolLM2-135M (the default model): 3 KV heads
    (50, 0, 15, 5, 64),  # SmolLM2-360M: 5 KV heads
    (23, 4, 32, 8, 80),
    (64, 0, 12, 3, 96),
    (9, 1, 10, 5, 80),
]
PLAIN = [torch.bfloat16, torch.float16, torch.float32]
SCALES = [None, (1.0, 1.0), (0.37, 1.9), (0.011, 3.3)]


def _stores_alike(n, pad, heads, kv_heads, head_dim, dtype, cache_dtype, kv_scale, magnitude=1.0,
                  block_size=BLOCK_SIZE) -> None:
    from batchllm.attention.kv_store_triton import store_kv_triton

    seed = n * 131 + kv_heads * 7 + head_dim
    k, v = model_kv(n, heads, kv_heads, head_dim, dtype, seed, magnitude)
    if pad:  # padding rows: token 0 at position 0, so every one holds the same K/V
        k[n - pad:] = k[n - pad - 1]
        v[n - pad:] = v[n - pad - 1]
    num_blocks = -(-(n + 37) // block_size)
    slots = scattered_slots(n, pad, num_blocks, seed, block_size)
    cache = random_cache(num_blocks, kv_heads, head_dim, cache_dtype, seed, block_size)
    want = cache.clone()
    store_kv(k, v, want, slots, kv_scale)
    store_kv_triton(k, v, cache, slots, kv_scale)
    torch.cuda.synchronize()
    got, ref = cache.view(torch.uint8), want.view(torch.uint8)
    if not torch.equal(got, ref):
        bad = (got != ref).nonzero()
        raise AssertionError(f"{len(bad)} bytes differ from the torch store, the first at {bad[0].tolist()}")


@pytest.mark.parametrize("dtype", PLAIN, ids=str)
@pytest.mark.parametrize("n, pad, heads, kv_heads, head_dim", SHAPES)
def test_plain_cache_gets_the_same_bytes_as_the_torch_store(n, pad, heads, kv_heads, head_dim, dtype):
    _stores_alike(n, pad, heads, kv_heads, head_dim, dtype, dtype, None)


@pytest.mark.parametrize("scales", SCALES, ids=str)
@pytest.mark.parametrize("dtype", PLAIN, ids=str)
@pytest.mark.parametrize("n, pad, heads, kv_heads, head_dim", SHAPES)
def test_fp8_cache_gets_the_same_bytes_as_the_torch_store(n, pad, heads, kv_heads, head_dim, dtype, scales):
    """x / scale (IEEE), clamped to +-448, rounded to nearest even: bit for bit `fp8.quantize`."""
    kv_scale = None if scales is None else model_scales(*scales)
    _stores_alike(n, pad, heads, kv_heads, head_dim, dtype, FP8, kv_scale)


@pytest.mark.parametrize("scales", SCALES[::2], ids=str)
@pytest.mark.parametrize("n, pad, heads, kv_heads, head_dim", SHAPES[::2])
def test_fp8_cache_of_64_token_blocks_gets_the_same_bytes_as_the_torch_store(n, pad, heads, kv_heads, head_dim,
                                                                            scales):
    """V keys-major (`kv_quant.values_keys_major`): each value at its [block, head, dim, slot] byte."""
    kv_scale = None if scales is None else model_scales(*scales)
    _stores_alike(n, pad, heads, kv_heads, head_dim, torch.bfloat16, FP8, kv_scale, block_size=64)


@pytest.mark.parametrize("dtype", PLAIN, ids=str)
def test_fp8_store_clamps_like_the_torch_store(dtype):
    """Values far past 448 * scale (and e4m3's subnormals, below 2^-6 * scale) on both sides."""
    _stores_alike(300, 0, 32, 8, 128, dtype, FP8, model_scales(0.05, 2e-3), magnitude=60.0)
    _stores_alike(300, 0, 32, 8, 128, dtype, FP8, model_scales(1.0, 1.0), magnitude=1e-3)


def test_fp8_store_keeps_nans_as_the_torch_store_does():
    """torch's clamp propagates NaN (the hardware max/min would turn it into +-448)."""
    from batchllm.attention.kv_store_triton import store_kv_triton

    k, v = model_kv(4, 32, 8, 128, torch.bfloat16, 0, 1.0)
    k[1, 3, 5], v[2, 0, 0] = float("nan"), float("nan")
    slots = torch.tensor([0, 1, 2, 3], device="cuda")
    cache = random_cache(1, 8, 128, FP8, 0)
    store_kv_triton(k, v, cache, slots, model_scales(0.5, 2.0))
    got = cache[:, 0, :4].float()
    assert got.isnan().nonzero().tolist() == [[0, 1, 3, 5], [1, 2, 0, 0]]


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8], ids=str)
def test_negative_slots_write_nothing(cache_dtype):
    from batchllm.attention.kv_store_triton import store_kv_triton

    k, v = model_kv(6, 32, 8, 128, torch.bfloat16, 0, 1.0)
    slots = torch.tensor([5, -1, 40, -1, 7, 63], device="cuda")
    cache = random_cache(4, 8, 128, cache_dtype, 1)
    before = cache.clone()
    store_kv_triton(k, v, cache, slots, None)
    want = before.clone()
    keep = slots >= 0
    store_kv(k[keep], v[keep], want, slots[keep], None)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


def test_triton_backend_stores_through_the_fused_kernel(monkeypatch):
    """On CUDA `TritonBackend` calls the fused store (and not `store_kv`); `fused_store=False` the
    torch one; both leave the same bytes and the same attention output."""
    import batchllm.attention.triton_backend as tb
    from tests.attention_cases import random_case

    calls = []
    fused = tb.store_kv_triton
    monkeypatch.setattr(tb, "store_kv_triton", lambda *a: calls.append("fused") or fused(*a))
    monkeypatch.setattr(tb, "store_kv", lambda *a: calls.append("torch") or store_kv(*a))
    q, k, v, cache, md = random_case([(37, 1), (0, 20), (300, 1)], 32, 8, 128, 16, torch.bfloat16, seed=5)
    kv_scale = model_scales(0.75, 1.5)
    cache = torch.zeros_like(cache, dtype=torch.uint8).view(FP8)
    outputs, caches = [], []
    for fused_store in (True, False):
        c = cache.clone()
        outputs.append(tb.TritonBackend(fused_store=fused_store).forward(q, k, v, c, md, 128 ** -0.5, kv_scale))
        caches.append(c.view(torch.uint8))
    assert calls == ["fused", "torch"]
    assert torch.equal(caches[0], caches[1])
    assert torch.equal(outputs[0], outputs[1])


def test_fp8_store_reaches_slots_past_2_31_elements():
    """A cache whose K half holds more than 2^31 elements (140k blocks of 16 x 8 x 128 fp8: 4.6 GB in
    all), written at its last slots: their offsets pass int32, so the kernel must compute them in
    int64. Slots come as the runner's int64 and as int32 (where the kernel's own cast to int64 is
    what keeps the offset right); the bytes are `store_kv`'s and nothing else in the cache changes."""
    from batchllm.attention.kv_store_triton import store_kv_triton

    num_blocks, kv_heads, head_dim = 140_000, 8, 128
    assert num_blocks * BLOCK_SIZE * kv_heads * head_dim > 2 ** 31
    if torch.cuda.mem_get_info()[0] < 6 * 2 ** 30:
        pytest.skip("needs about 5 GB of free GPU memory")
    cache = torch.zeros(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=torch.uint8, device="cuda").view(FP8)
    k, v = model_kv(40, 32, kv_heads, head_dim, torch.bfloat16, 3, 1.0)
    last = num_blocks * BLOCK_SIZE
    slots = last - 1 - torch.randperm(40, generator=torch.Generator().manual_seed(0)).to("cuda")  # the last 40
    kv_scale = model_scales(0.37, 1.9)
    tail = cache[:, -3:].view(2, -1, kv_heads, head_dim)  # the last 48 slots of K and of V
    for slot_dtype in (torch.int64, torch.int32):
        store_kv_triton(k, v, cache, slots.to(slot_dtype), kv_scale)
        got = tail.view(torch.uint8).clone()
        tail.view(torch.uint8).zero_()
        store_kv(k, v, cache, slots, kv_scale)
        want = tail.view(torch.uint8).clone()
        tail.view(torch.uint8).zero_()
        assert want[:, -40:].any(), "the torch store wrote the last slots"
        assert torch.equal(got, want), f"{slot_dtype} slots: the last slots differ from the torch store"
        assert not any(chunk.any() for chunk in cache.view(torch.uint8).flatten().split(2 ** 28)), \
            f"{slot_dtype} slots: bytes written outside the last slots"
