"""The Triton kernels' logic on the CPU, run by Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 where no GPU is; the interpreter is exact in float32, not in 16-bit types, so
bf16/fp16 are covered by tests/gpu on the device). Skipped where Triton is not installed."""

from __future__ import annotations

import os
import re

import pytest
import torch

from batchllm.attention.torch_ref import TorchReferenceBackend
from batchllm.attention.triton_backend import TileConfig
from batchllm.layers.ops import TorchOps
from tests.attention_cases import group_decode, poison_unwritten_slots, random_case

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="interpreter tests: CPU-only machines (the GPU runs the compiled kernels in tests/gpu)",
)


def _triton_ops():
    from batchllm.layers.triton_ops import TritonOps

    return TritonOps()


@pytest.mark.parametrize("rows, cols", [(7, 96), (1, 64), (3, 200)])
def test_rms_norm_and_residual_add_match_torch(rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    x, residual = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g)
    weight = torch.randn(cols, generator=g)
    torch.testing.assert_close(_triton_ops().rms_norm(x.clone(), weight, 1e-5), TorchOps().rms_norm(x, weight, 1e-5))
    want_out, want_sum = TorchOps().add_rms_norm(x, residual, weight, 1e-6)
    out, summed = _triton_ops().add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    torch.testing.assert_close(summed, want_sum)
    torch.testing.assert_close(out, want_out)


def test_silu_and_mul_matches_torch():
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(5, 2 * 1500, generator=g) * 4  # two column blocks of 1024, the second partial
    torch.testing.assert_close(_triton_ops().silu_and_mul(gate_up.clone()), TorchOps().silu_and_mul(gate_up))


def test_triton_quantizer_gives_the_host_quantizers_bits_at_rounding_ties():
    """`fp8_triton.quantize_row` (through its plain kernel, the products stored in float32 and cast by
    torch: the interpreter's float8 cast is not torch's) against `fp8.quantize_rows`, on values with
    bf16's 8 significant bits, as a model's activations have: many of them land within an ulp of an
    e4m3 rounding tie, where dividing by the scale instead of multiplying by its reciprocal rounds
    one step away (asserted here, so that the data can tell the two apart)."""
    from batchllm.layers.fp8 import _MIN_SCALE, FP8, FP8_MAX, quantize, quantize_rows
    from batchllm.layers.fp8_triton import _quantize_rows_kernel

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 2048, generator=g) * 3).to(torch.bfloat16).float()
    q_ref, s_ref = quantize_rows(x)
    assert (quantize(x, s_ref).view(torch.uint8) != q_ref.view(torch.uint8)).any(), "no ties: a weak test"
    products, scale = torch.empty_like(x), torch.empty(64, 1)
    _quantize_rows_kernel[(64,)](x, products, scale, x.stride(0), products.stride(0), 2048, FP8_MAX, _MIN_SCALE,
                                 BLOCK=2048)
    assert torch.equal(scale, s_ref)
    assert torch.equal(products.to(FP8).view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("rows, cols, residual", [(7, 96, True), (3, 200, False), (2, 64, True)])
def test_fused_fp8_norm_quantizes_the_norm_as_the_quantizer_does(rows, cols, residual):
    """QUANT: the kernel's clamped products x * (1 / scale) (stored into a float32 buffer: the
    interpreter's float8 cast is not torch's, see the KV-store test below), cast by torch, and its
    scales are exactly `quantize_rows`'s on the unfused kernel's output, an all-zero row included
    (rounding ties: the test above); the residual sum is still written; through TritonOps the float8 values are
    `quantize_rows_triton`'s of the unfused output, bit for bit."""
    from batchllm.layers.fp8 import FP8, Fp8Input, quantize_rows
    from batchllm.layers.fp8_triton import quantize_rows_triton
    from batchllm.layers.triton_ops import TritonOps

    g = torch.Generator().manual_seed(rows * cols)
    x, res = torch.randn(rows, cols, generator=g), torch.randn(rows, cols, generator=g) * 3
    x[1], res[1] = 0, 0
    weight = torch.randn(cols, generator=g)
    if residual:
        want, want_sum = TritonOps().add_rms_norm(x.clone(), res.clone(), weight, 1e-5)
    else:
        want = TritonOps().rms_norm(x.clone(), weight, 1e-5)
    q_ref, s_ref = quantize_rows(want)
    quotients, scale, summed = torch.empty(rows, cols), torch.empty(rows, 1), res.clone()
    TritonOps._launch_norm(x.clone(), summed if residual else x.clone(), weight, quotients, 1e-5, residual, scale)
    assert torch.equal(scale, s_ref) and s_ref[1].item() == pytest.approx(1e-12)
    assert torch.equal(quotients.to(FP8).view(torch.uint8), q_ref.view(torch.uint8))  # (cast by torch)
    if residual:
        assert torch.equal(summed, want_sum)
        got, summed2 = TritonOps().add_rms_norm(x.clone(), res.clone(), weight, 1e-5, quantize=True)
        assert torch.equal(summed2, want_sum)
    else:
        got = TritonOps().rms_norm(x.clone(), weight, 1e-5, quantize=True)
    q_tri, s_tri = quantize_rows_triton(want)
    assert isinstance(got, Fp8Input) and got.q.dtype == FP8 and got.dtype == torch.float32
    assert torch.equal(got.scale, s_tri) and torch.equal(got.q.view(torch.uint8), q_tri.view(torch.uint8))


@pytest.mark.parametrize("cols", [1500, 40])
def test_fused_fp8_silu_quantizes_whole_rows_as_the_quantizer_does(cols, monkeypatch):
    """QUANT: one program per row (1500 columns: wider than the unfused kernel's 1024-column tiles),
    clamped products (cast by torch) and scales exactly `quantize_rows`'s of the unfused output;
    through TritonOps the float8 values are
    `quantize_rows_triton`'s, also past FUSED_QUANT_MAX_COLS (the unfused pair)."""
    from batchllm.layers import triton_ops
    from batchllm.layers.fp8 import FP8, quantize_rows
    from batchllm.layers.fp8_triton import quantize_rows_triton

    g = torch.Generator().manual_seed(cols)
    gate_up = torch.randn(5, 2 * cols, generator=g) * 4
    gate_up[2] = 0
    want = triton_ops.TritonOps().silu_and_mul(gate_up.clone())
    q_ref, s_ref = quantize_rows(want)
    quotients, scale = torch.empty(5, cols), torch.empty(5, 1)
    triton_ops.TritonOps._launch_silu(gate_up.clone(), quotients, scale)
    assert torch.equal(scale, s_ref)
    assert torch.equal(quotients.to(FP8).view(torch.uint8), q_ref.view(torch.uint8))
    q_tri, s_tri = quantize_rows_triton(want)
    for widest in (triton_ops.FUSED_QUANT_MAX_COLS, cols - 1):
        monkeypatch.setattr(triton_ops, "FUSED_QUANT_MAX_COLS", widest)
        got = triton_ops.TritonOps().silu_and_mul(gate_up.clone(), quantize=True)
        assert torch.equal(got.scale, s_tri) and torch.equal(got.q.view(torch.uint8), q_tri.view(torch.uint8))


def test_rotary_rotates_strided_views_in_place_like_torch():
    """q and k as views into one qkv buffer (the model's layout): rotated in place, v untouched."""
    from batchllm.layers.rotary import RotaryEmbedding

    heads, kv_heads, head_dim, n = 4, 2, 32, 9
    table = RotaryEmbedding(head_dim, 512, 10000.0, None)
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim, generator=g)
    positions = torch.randint(0, 512, (n,), generator=g)
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(n, heads + kv_heads, head_dim)
    want = TorchOps().step_rotary(table.cos, table.sin_signed, positions, torch.float32)(qk)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    got = _triton_ops().step_rotary(table.cos, table.sin_signed, positions, torch.float32)(qk)
    assert got.data_ptr() == qk.data_ptr(), "in place"
    torch.testing.assert_close(got, want)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)


def fp8_case(specs, block_size: int = 16, seed: int = 3):
    """random_case's inputs (8 heads, 2 KV heads, head dim 64, float32, CPU) over an fp8 cache with
    non-trivial scales: (q, k, v, cache, metadata, kv_scale)."""
    from batchllm.attention.kv_quant import quantize_cache

    q, k, v, cache, md = random_case(specs, 8, 2, 64, block_size, torch.float32, seed=seed, device="cpu")
    kv_scale = torch.ones(4)[:2] * torch.tensor([0.75, 1.5])
    return q, k, v, quantize_cache(cache, kv_scale), md, kv_scale


ATTENTION_CASES = [
    ("decode-and-prefill", [(37, 1), (300, 1), (0, 77), (64, 40)], {}),
    ("groups", group_decode(6, 300, 20) + [(90, 1)], dict(min_members=1, min_shared=1)),
    ("nested-groups", [(610 + j, 1, [(0, 300), (1 + j % 3, 600)]) for j in range(6)] + [(350, 1, [(0, 300)])] * 2,
     dict(min_members=1, min_shared=1)),
    ("split-k", [(1500, 1), (700, 3)] + group_decode(4, 600, 90), dict(split_len=128)),
    # other tiles of the one-query and prefix launches (attention_bench.py --decode-sweep), split-K per launch
    ("groups-decode-tile-32", group_decode(6, 300, 20) + [(90, 1)],
     dict(min_members=1, min_shared=1, decode_tile=TileConfig(32, 2, 3), split_per_launch=True)),
    ("split-k-decode-tile-128", [(1500, 1), (700, 3)] + group_decode(4, 600, 90),
     dict(split_len=128, decode_tile=TileConfig(128, 4, 2))),
    ("groups-decode-tile-fp8", group_decode(6, 300, 20) + [(90, 1)], dict(min_members=1, min_shared=1,
                                                                         decode_tile=TileConfig(128, 4, 3))),
]


@pytest.mark.parametrize("name, specs, options", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_kernel_matches_reference(name, specs, options):
    from batchllm.attention.triton_backend import TritonBackend

    q, k, v, cache, md = random_case(specs, 8, 2, 64, 16, torch.float32, seed=3, device="cpu")
    ref = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125)
    out = TritonBackend(**options).forward(q, k, v, cache, md, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    if "min_members" in options:
        assert plan.items.num_group_items > 0, "the prefix-shared path ran"
    if "split_len" in options:
        assert len(plan.items.merge_tokens) > 0, "split-K partials were merged"


@pytest.mark.parametrize("name, specs, options", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_kernel_over_fp8_cache_matches_reference(name, specs, options):
    """Every item kind (tiles, prefix and suffix items, split-K pieces and their merge) over an fp8
    cache with non-trivial scales: the reference over the same cache, dequantized (k_scale folded
    into the softmax scale and v_scale on the output give the same numbers); the new tokens are
    stored as the same bytes."""
    from batchllm.attention.triton_backend import TritonBackend

    q, k, v, cache, md, kv_scale = fp8_case(specs)
    ref_cache = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, ref_cache, md, 0.125, kv_scale)
    out = TritonBackend(**options).forward(q, k, v, cache, md, 0.125, kv_scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    if "min_members" in options:
        assert plan.items.num_group_items > 0, "the prefix-shared path ran"
    if "split_len" in options:
        assert len(plan.items.merge_tokens) > 0, "split-K partials were merged"


@pytest.mark.parametrize("name, specs, options", ATTENTION_CASES[:4], ids=[c[0] for c in ATTENTION_CASES[:4]])
def test_fp8_attention_errs_like_its_emulation(name, specs, options):
    """fp8_attention over an fp8 cache (FP8_DOTS: q quantized per token and head, both dots on e4m3
    operands, p scaled by 448): against exact attention over the same cache its error is the size of
    `torch_ref.fp8_attention`'s (the kernel quantizes p against the running maximum, the emulation
    against the row's: the two differ by about as much as either differs from exact), and it is not
    zero (the FP8 dots ran)."""
    from batchllm.attention.triton_backend import TritonBackend

    q, k, v, cache, md, kv_scale = fp8_case(specs)
    exact = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
    emulated = TorchReferenceBackend(fp8_attention=True).forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
    out = TritonBackend(fp8_attention=True, **options).forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
    emulation_error = (emulated - exact).abs().max().item()
    error = (out - exact).abs().max().item()
    assert 0 < emulation_error < 0.05 * exact.abs().max().item()
    assert 1e-4 < error <= 1.5 * emulation_error
    assert (out - exact).abs().mean() <= 1.5 * (emulated - exact).abs().mean()


def test_fp8_dots_only_where_the_program_fills_an_fp8_mma():
    """fp8_attention takes e4m3 operands in programs of 64 rows or more with key tiles of 32 or more
    (Triton casts a 16-row program's operands to fp16 anyway, and 8-bit dots need K >= 32), with the
    head dim padded to 32: one-query decode items keep the exact cast-up path."""
    from batchllm.attention.kv_quant import quantize_cache
    from batchllm.attention.triton_backend import TritonBackend, dot_head_dim, fp8_dots_fit

    assert fp8_dots_fit(64, 64) and fp8_dots_fit(256, 32)
    assert not fp8_dots_fit(16, 64) and not fp8_dots_fit(64, 16)
    assert dot_head_dim(16) == 16 and dot_head_dim(16, fp8_dots=True) == 32 and dot_head_dim(80, True) == 128
    specs = [(300, 1), (37, 1), (5, 1)]  # decodes only: 16-row programs
    q, k, v, cache, md = random_case(specs, 8, 2, 64, 16, torch.float32, seed=3, device="cpu")
    cache = quantize_cache(cache, torch.ones(2))
    exact = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125)
    out = TritonBackend(fp8_attention=True).forward(q, k, v, cache.clone(), md, 0.125)
    torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-5)


BLOCK_TILE_CASES = [  # on caches whose blocks hold whole tiles: items starting on and off a tile boundary
    ("aligned-prefill", [(0, 150), (0, 64), (0, 1)], {}),
    ("prefill-after-cache", [(100, 50), (192, 70)], {}),
    ("suffix-misaligned", group_decode(4, 100, 30) + [(1000, 1), (0, 40)], dict(min_members=1, min_shared=1)),
    ("suffix-aligned", group_decode(4, 128, 40) + group_decode(3, 256, 7, group=1) + [(0, 40)],
     dict(min_members=1, min_shared=1)),
    ("split-k", [(1023, 1), (1500, 1), (700, 3)] + group_decode(4, 600, 90), dict(split_len=128)),
]
BLOCK_TILE_LAUNCHES = [  # (block size, prefill launch): the prefill tiles (and, of 64 keys, the others) fit a block
    (64, (256, 64, 8, 3)), (128, (256, 64, 8, 3)), (32, (64, 32, 4, 2)),
]


def _item_alignment(plan, block_size: int) -> tuple[int, int]:
    """(items whose tiles each lie in one cache block, items that gather a block index per key),
    as the kernel decides: the launch's tile width divides the block size and the item's first key."""
    aligned = gathered = 0
    kv_lo = plan.tensors["kv_lo"].numpy()  # in launch order
    for launch in plan.launches:
        lo = kv_lo[launch.item_offset:launch.item_offset + launch.grid]
        if block_size % launch.tile.block_n == 0:
            aligned += int((lo % launch.tile.block_n == 0).sum())
            gathered += int((lo % launch.tile.block_n != 0).sum())
        else:
            gathered += len(lo)
    return aligned, gathered


@pytest.mark.parametrize("aligned_plan", [True, False], ids=["aligned-plan", "unaligned-plan"])
@pytest.mark.parametrize("block_size, launch", BLOCK_TILE_LAUNCHES, ids=["bs64", "bs128", "bs32-n32"])
@pytest.mark.parametrize("name, specs, options", BLOCK_TILE_CASES, ids=[c[0] for c in BLOCK_TILE_CASES])
def test_attention_kernel_with_a_block_index_per_tile_matches_reference(name, specs, options, block_size, launch,
                                                                         aligned_plan, monkeypatch):
    """TILE_IN_BLOCK (block size a multiple of the tile width): items starting at a multiple of the
    tile width read one block index per tile, the others one per key; both against the reference,
    the masked last tile included. The backend's plan starts every item on a tile boundary where
    its one-query tiles fit a block (`key_alignment`: blocks a multiple of the decode tile's keys); with that turned
    off (unaligned-plan) suffix items after a prefix of 100 tokens and split-K pieces of 126 keys
    start off a boundary, so the kernel's per-key path runs beside the per-tile one."""
    from batchllm.attention import triton_backend

    if not aligned_plan:
        monkeypatch.setattr(triton_backend, "key_alignment", lambda block_size, block_n: 1)
    q, k, v, cache, md = random_case(specs, 8, 2, 64, block_size, torch.float32, seed=5, device="cpu")
    ref = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125)
    out = triton_backend.TritonBackend(prefill_launch=launch, **options).forward(q, k, v, cache, md, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    aligned, gathered = _item_alignment(plan, block_size)
    assert aligned > 0, "some item read one block index per tile"
    if aligned_plan and block_size % 64 == 0:
        assert gathered == 0 and (plan.items.kv_lo % 64 == 0).all(), "every item starts on a tile boundary"
    elif not aligned_plan and name in ("suffix-misaligned", "split-k"):
        assert gathered > 0 and (plan.items.kv_lo % 64 != 0).any(), "some item started off a tile boundary"


@pytest.mark.parametrize("name, specs, options", BLOCK_TILE_CASES, ids=[c[0] for c in BLOCK_TILE_CASES])
def test_tma_tiles_match_reference_and_read_no_unwritten_slot(name, specs, options, monkeypatch):
    """tma=True on 64-token blocks: the unmasked tiles of items on a tile boundary load K and V
    through tensor descriptors (whole boxes, no mask), the rest as before; against the reference over
    a cache whose unwritten slots hold NaN (the masked tiles, where a sequence's last keys end inside
    a box, must not take the box). The prefill programs take TMA_PREFILL_LAUNCH."""
    from batchllm.attention import triton_backend

    described = []
    describe = triton_backend.tma_descriptors
    monkeypatch.setattr(triton_backend, "tma_descriptors",
                        lambda cache, block_n: described.append(block_n) or describe(cache, block_n))
    q, k, v, cache, md = random_case(specs, 8, 2, 64, 64, torch.float32, seed=11, device="cpu")
    poison_unwritten_slots(cache, md)
    ref = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125)
    out = triton_backend.TritonBackend(tma=True, **options).forward(q, k, v, cache, md, 0.125)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert described == [64], "one pair of descriptors, for the 64-key tiles of every launch"
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    p = plan.items.num_prefix_items
    multi = [launch for launch in plan.launches if launch.block_q > 1 and launch.item_offset >= p]
    rows, block_n, warps, stages = triton_backend.TMA_PREFILL_LAUNCH
    assert all(launch.block_q == rows // 4 and launch.tile == TileConfig(block_n, warps, stages) for launch in multi)


@pytest.mark.parametrize("fp8_attention", [False, True], ids=["cast-up", "fp8-dots"])
@pytest.mark.parametrize("name, specs, options", BLOCK_TILE_CASES, ids=[c[0] for c in BLOCK_TILE_CASES])
def test_tma_tiles_over_fp8_cache(name, specs, options, fp8_attention, monkeypatch):
    """tma=True over an fp8 cache of 64-token blocks (V keys-major: its box is a block's [head dim,
    keys] for one KV head), K's unwritten slots NaN. Cast up: against the reference over the same
    cache. FP8 dots (`fp8_attention`): the same numbers as the kernel without TMA (the same
    arithmetic on the same e4m3 tiles), and within FP8 attention's error of exact."""
    from batchllm.attention import triton_backend

    described = []
    describe = triton_backend.tma_descriptors
    monkeypatch.setattr(triton_backend, "tma_descriptors",
                        lambda cache, block_n: described.append(block_n) or describe(cache, block_n))
    q, k, v, cache, md, kv_scale = fp8_case(specs, block_size=64, seed=11)
    poison_unwritten_slots(cache, md, halves=(0,))
    options = dict(options, fp8_attention=fp8_attention)
    out = triton_backend.TritonBackend(tma=True, **options).forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
    assert described == [64], "one pair of descriptors, for the 64-key tiles of every launch"
    exact = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
    if not fp8_attention:
        torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-5)
        return
    pointers = triton_backend.TritonBackend(tma=False, **options).forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
    torch.testing.assert_close(out, pointers, rtol=1e-5, atol=1e-6)
    assert (out - exact).abs().max() < 0.05 * exact.abs().max()


STAGED_CASES = [
    ("prefill-decode-and-split", [(37, 1), (300, 1), (0, 77), (64, 40), (130, 200), (1500, 1)], dict(split_len=256)),
    # two prefill chunks under one shared prefix (its blocks staged once) beside decoding members
    ("groups-with-prefill-members", [(256, 70, 0, 256), (256, 50, 0, 256)] + group_decode(5, 256, 20),
     dict(min_members=1, min_shared=1)),
]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("block_size", [16, 64], ids=["bs16", "bs64-v-keys-major"])
@pytest.mark.parametrize("name, specs, options", STAGED_CASES, ids=[c[0] for c in STAGED_CASES])
def test_staged_prefill_over_fp8_cache_computes_what_the_direct_launch_does(name, specs, options, block_size, tma):
    """stage_fp8_prefill: the prefill launch reads an fp16 copy of the blocks its items need (V in K's
    layout), the other launches the fp8 cache; on the same tiles the output is the direct launch's bit
    for bit, and the reference's within rounding. Blocks a prefix group's members share are copied once."""
    from batchllm.attention.triton_backend import TMA_PREFILL_LAUNCH, TritonBackend

    q, k, v, cache, md, kv_scale = fp8_case(specs, block_size=block_size, seed=5)
    outputs, plans = {}, {}
    for stage in (False, True):
        md.backend_cache.clear()
        backend = TritonBackend(stage_fp8_prefill=stage, prefill_launch=TMA_PREFILL_LAUNCH, tma=tma, **options)
        outputs[stage] = backend.forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
        [plans[stage]] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    assert torch.equal(outputs[True], outputs[False])
    ref = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
    torch.testing.assert_close(outputs[True], ref, rtol=1e-4, atol=1e-5)
    plan = plans[True]
    assert [launch.staged for launch in plan.launches] == [launch.block_q > 1 and launch.item_offset
                                                           >= plan.items.num_prefix_items for launch in plan.launches]
    assert any(launch.staged for launch in plan.launches) and plans[False].staged_blocks is None
    prefill = [i for i, (c, n, *_) in enumerate(specs) if n > 1]
    reached = [md.block_tables_cpu[i][:-(-(c + n) // block_size)] for i, (c, n, *_) in enumerate(specs) if n > 1]
    assert sorted(plan.staged_blocks.tolist()) == sorted({b for table in reached for b in table})
    assert all(plan.staged_tables[i, j] == plan.staged_blocks.tolist().index(b)
               for i, table in zip(prefill, reached) for j, b in enumerate(table))


@pytest.mark.parametrize("block_size, kv_heads, head_dim", [(16, 2, 16), (64, 2, 32), (24, 3, 24)],
                         ids=["bs16", "bs64-v-keys-major", "ragged"])
def test_stage_blocks_copies_the_cache_values_into_k_layout(block_size, kv_heads, head_dim):
    """stage_blocks (one Triton launch): the chosen blocks' K and V as fp16 [block, slot, head, dim]
    rows, in the order asked, each value the fp8 cache's exactly, whatever V's layout (keys-major
    with 64-token blocks) and with sizes not powers of two."""
    from batchllm.attention.kv_quant import layer_caches, values_keys_major
    from batchllm.attention.triton_backend import stage_blocks
    from batchllm.layers.fp8 import FP8

    g = torch.Generator().manual_seed(block_size)
    cache = torch.randint(0, 126, (2, 9, block_size, kv_heads, head_dim), generator=g, dtype=torch.uint8).view(FP8)
    assert values_keys_major(cache) == (block_size == 64)
    blocks = torch.tensor([6, 0, 3, 8])
    staged = stage_blocks(cache, blocks)
    assert staged.dtype == torch.float16 and staged.shape == (2, 4, block_size, kv_heads, head_dim)
    for half, view in enumerate(layer_caches(cache)):
        assert torch.equal(staged[half], view[blocks].to(torch.float16))
    assert stage_blocks(cache, blocks[:0]).shape == (2, 0, block_size, kv_heads, head_dim)


def test_a_step_past_the_staging_limit_reads_the_cache_with_the_direct_launchs_tiles(monkeypatch):
    """A step whose prefill items reach more than STAGE_MAX_BYTES of blocks is planned again for the
    cache itself: no staged launch, and the prefill tiles of the direct launch (PREFILL_LAUNCH, pointer
    loads) instead of the staged copy's (TMA_PREFILL_LAUNCH where, as on Hopper, the copy loads by TMA);
    the output agrees to rounding (other tiles, another summation order)."""
    from batchllm.attention import triton_backend as tb

    monkeypatch.setattr(tb, "tma_available", lambda device: True)  # as on Hopper
    name, specs, options = STAGED_CASES[0]
    q, k, v, cache, md, kv_scale = fp8_case(specs, block_size=64, seed=5)
    outputs, prefill, default = {}, {}, tb.STAGE_MAX_BYTES
    for limit in (default, 1):
        monkeypatch.setattr(tb, "STAGE_MAX_BYTES", limit)
        md.backend_cache.clear()
        outputs[limit] = tb.TritonBackend(stage_fp8_prefill=True, **options).forward(
            q, k, v, cache.clone(), md, 0.125, kv_scale)
        [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
        [prefill[limit]] = [launch for launch in plan.launches if launch.block_q > 1 and not launch.item_offset
                            < plan.items.num_prefix_items]
    staged, direct = prefill[default], prefill[1]
    assert staged.staged and staged.tile == tb.TileConfig(*tb.TMA_PREFILL_LAUNCH[1:])
    assert not direct.staged and direct.tile == tb.TileConfig(*tb.PREFILL_LAUNCH[1:])
    assert staged.block_q * tb.PREFILL_LAUNCH[0] == direct.block_q * tb.TMA_PREFILL_LAUNCH[0]  # rows a program
    torch.testing.assert_close(outputs[1], outputs[default], rtol=1e-4, atol=1e-5)


def test_staging_plan_copies_each_block_once_and_stops_at_its_limit():
    import numpy as np

    from batchllm.attention.triton_backend import staging_plan

    tables = [[7, 3, 9], [4, 4, 4], [7, 3, 5, 6]]  # sequences 0 and 2 share blocks 7 and 3
    blocks, staged = staging_plan(np.array([0, 2, 0]), np.array([40, 50, 20]), tables, 16, 5, max_keys=1000)
    assert blocks.tolist() == [7, 3, 9, 5, 6]  # sequence 2 reaches 50 keys: 4 blocks, 2 of them already in
    assert staged.tolist() == [[0, 1, 2, 0, 0], [0, 0, 0, 0, 0], [0, 1, 3, 4, 0]]
    assert staging_plan(np.array([0, 2]), np.array([40, 50]), tables, 16, 5, max_keys=5 * 16) is not None
    assert staging_plan(np.array([0, 2]), np.array([40, 50]), tables, 16, 5, max_keys=5 * 16 - 1) is None


def test_tma_only_where_the_cache_allows_it():
    """tma=None takes TMA on a Hopper GPU only (never on the CPU); tma=True wherever the descriptors can
    describe the cache (16-bit or fp8, contiguous): not a head dim the dot pads; tma=False never."""
    from batchllm.attention import triton_backend
    from batchllm.layers.fp8 import FP8

    cache = torch.zeros(2, 3, 64, 2, 64)
    on, auto, off = (triton_backend.TritonBackend(tma=tma) for tma in (True, None, False))
    assert on.uses_tma(cache, 64) and not auto.uses_tma(cache, 64) and not off.uses_tma(cache, 64)
    assert on.uses_tma(cache.to(FP8), 64) and not auto.uses_tma(cache.to(FP8), 64)
    assert not on.uses_tma(torch.zeros(2, 3, 64, 2, 24), 24)  # padded to 32 in the dot
    assert not on.uses_tma(cache[:, :, :, :1], 64)  # a view that is not contiguous
    assert on.prefill_launch_for(True) == triton_backend.TMA_PREFILL_LAUNCH
    assert on.prefill_launch_for(False) == triton_backend.PREFILL_LAUNCH
    assert triton_backend.TritonBackend(prefill_launch=(64, 64, 4, 2)).prefill_launch_for(True) == (64, 64, 4, 2)


@pytest.mark.parametrize("aligned_plan", [True, False], ids=["aligned-plan", "unaligned-plan"])
@pytest.mark.parametrize("name, specs, options", BLOCK_TILE_CASES, ids=[c[0] for c in BLOCK_TILE_CASES])
def test_attention_kernel_with_a_block_index_per_tile_over_fp8_cache(name, specs, options, aligned_plan, monkeypatch):
    """The FP8_KV variant with TILE_IN_BLOCK over an fp8 cache of 64-token blocks, whose V is
    keys-major (`kv_quant.values_keys_major`): aligned items read V in whole unmasked tiles (the
    slots past a sequence's end hold other finite values here: they must get p = 0), misaligned
    ones (unaligned-plan) gather V a key at a time; against the reference over the same cache, and
    the new tokens stored as the same bytes."""
    from batchllm.attention import triton_backend
    from batchllm.attention.kv_quant import values_keys_major

    if not aligned_plan:
        monkeypatch.setattr(triton_backend, "key_alignment", lambda block_size, block_n: 1)
    q, k, v, cache, md, kv_scale = fp8_case(specs, block_size=64, seed=7)
    assert values_keys_major(cache) and cache[1].view(torch.uint8).any(), "stale bytes in every slot"
    ref_cache = cache.clone()
    ref = TorchReferenceBackend().forward(q, k, v, ref_cache, md, 0.125, kv_scale)
    out = triton_backend.TritonBackend(**options).forward(q, k, v, cache, md, 0.125, kv_scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))


def test_fp8_decode_tile_on_128_token_blocks_reads_one_block_index_per_tile():
    """DECODE_TILE_FP8 (128 keys) over an fp8 cache of 128-token blocks: the plan aligns items at 128
    (`key_alignment`), so one-query and prefix tiles lie in one block (TILE_IN_BLOCK); against the
    reference over the same cache."""
    from batchllm.attention.triton_backend import DECODE_TILE_FP8, TritonBackend

    specs = [(0, 90), (1023, 1), (300, 1)] + group_decode(4, 300, 30)
    q, k, v, cache, md, kv_scale = fp8_case(specs, block_size=128, seed=9)
    ref = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
    backend = TritonBackend(min_members=1, min_shared=1, split_len=256, decode_tile=DECODE_TILE_FP8)
    out = backend.forward(q, k, v, cache, md, 0.125, kv_scale)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    assert plan.items.num_group_items > 0 and (plan.items.kv_lo % 128 == 0).all()


TRITON_PATH_CASES = [  # model, block size, step tokens, shared prefix, members, max_tokens, a plain prompt
    ("llama", 16, 32, 40, 4, 6, 20),
    ("qwen3", 16, 32, 40, 4, 6, 20),
    # one block index per tile for prefill tiles, decodes and (aligned at 128) suffix items
    ("llama", 64, 96, 130, 3, 5, 70),
]


@pytest.mark.parametrize("name, block_size, step_tokens, shared_len, members, max_tokens, plain_len",
                         TRITON_PATH_CASES, ids=["llama", "qwen3", "llama-block64"])
def test_triton_path_gives_hf_greedy_tokens(tiny_model_factory, name, block_size, step_tokens, shared_len, members,
                                            max_tokens, plain_len):
    """The whole GPU path (Triton attention with prefix groups, Triton norm/rotary/SiLU) on the CPU:
    the same greedy tokens as HF transformers, through prefill chunks, shared prefixes and decode,
    on 16- and 64-token blocks."""
    from batchllm import LLM, SamplingParams
    from batchllm.attention.triton_backend import TritonBackend
    from tests.helpers import hf_greedy

    model_dir = tiny_model_factory(name)
    llm = LLM(model_dir, device="cpu", dtype="float32", max_num_batched_tokens=step_tokens, block_size=block_size,
              skip_tokenizer_init=True)
    llm.engine.model.use_ops(_triton_ops())
    llm.engine.runner.backend = TritonBackend(min_members=1, min_shared=1)
    shared = list(range(100, 100 + shared_len))
    prompts = [shared + [7 + i, 300 + i] for i in range(members)] + [list(range(500, 500 + plain_len))]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                           SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
    assert llm.engine.kv_spec.block_size == block_size
    assert llm.last_stats["prefill_tokens_computed"] < sum(map(len, prompts)), "the prefix was shared"
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(model_dir, prompts, max_tokens, stop_at_eos=False)


def _model_kv(n: int, kv_heads: int, head_dim: int, values: torch.Tensor, g: torch.Generator,
              scales: tuple[float, float] = (1.0, 1.0)):
    """k, v [n, kv_heads, head_dim] drawn from `values` (k's times scales[0], v's times scales[1]):
    strided views of one qkv-like buffer (4 query heads), as the model passes them."""
    qkv = values[torch.randint(len(values), (n, (4 + 2 * kv_heads) * head_dim), generator=g)]
    qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim] *= scales[0]  # scaled in the buffer: k, v stay views
    qkv[:, (4 + kv_heads) * head_dim:] *= scales[1]
    k = qkv[:, 4 * head_dim:(4 + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    return k, qkv[:, (4 + kv_heads) * head_dim:].view(n, kv_heads, head_dim)


def _scattered_slots(n: int, pad: int, pool: int, g: torch.Generator) -> torch.Tensor:
    """n - pad distinct slots in random order below `pool`, then pad rows at slot `pool` (the spare
    block's, where graph padding rows write)."""
    return torch.cat([torch.randperm(pool, generator=g)[:n - pad], torch.full((pad,), pool)])


STORE_SHAPES = [  # tokens, padding rows, kv heads, head dim; 3 and 5 heads, 80 and 96 wide: masked lanes
    (9, 3, 2, 64), (20, 0, 1, 128), (4, 1, 8, 64), (7, 2, 3, 64), (5, 1, 5, 96), (6, 0, 3, 80),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, pad, kv_heads, head_dim", STORE_SHAPES)
def test_fused_kv_store_copies_a_plain_cache_like_the_torch_store(n, pad, kv_heads, head_dim, dtype):
    """A 16/32-bit cache: the rows copied bit for bit (as integers: exact in the interpreter too)
    to scattered slots; padding rows (equal values, one slot) included; other slots untouched,
    including the lanes past a head count or head dim that is not a power of two."""
    from batchllm.attention.backend import store_kv
    from batchllm.attention.kv_store_triton import store_kv_triton

    g = torch.Generator().manual_seed(n)
    k, v = _model_kv(n, kv_heads, head_dim, torch.randn(1000, generator=g).to(dtype), g)
    k[n - pad:], v[n - pad:] = k[0], v[0]
    blocks = -(-(n + 20) // 16)
    slots = _scattered_slots(n, pad, blocks * 16, g)
    cache = torch.randn(2, blocks + 1, 16, kv_heads, head_dim, generator=g).to(dtype)
    want = cache.clone()
    store_kv(k, v, want, slots)
    store_kv_triton(k, v, cache, slots)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.parametrize("block_size", [16, 64], ids=["bs16", "bs64-v-keys-major"])
@pytest.mark.parametrize("scales", [None, (0.5, 2.0), (0.25, 0.0078125)], ids=str)
@pytest.mark.parametrize("n, pad, kv_heads, head_dim", [(12, 2, 2, 64), (10, 3, 3, 80), (9, 1, 5, 96)])
def test_fused_kv_store_quantizes_an_fp8_cache_like_the_torch_store(n, pad, kv_heads, head_dim, scales, block_size):
    """An fp8 cache: x / scale clamped to +-448, cast. Values are e4m3 numbers times powers of two
    (some past 448 after the division, so the clamp acts), K/V strided views of one buffer with or
    without scales, into 16-token blocks and into 64-token ones (V keys-major: the kernel's V addresses
    from the view's strides). Only exactly representable quotients, because the interpreter's float8 cast
    (Triton 3.9 `_convert_float`) is not torch's: it rounds ties away from zero (1.0625 -> 1.125,
    torch 1.0), and a round-up that carries out of the mantissa is ORed into the exponent field, so
    the carry is lost where the biased exponent is odd (1.95 -> 1.0, 0.484375 -> 0.25 where torch
    gives 2.0, 0.5; 3.9 -> 4.0 is right). Rounding itself is held to bit equality on the device
    (tests/gpu/test_kv_store_triton.py); here the slots, strides, masked lanes, scales and clamp are."""
    from batchllm.attention.backend import store_kv
    from batchllm.attention.kv_store_triton import store_kv_triton
    from batchllm.layers.fp8 import FP8

    g = torch.Generator().manual_seed(1)
    e4m3 = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    normal = e4m3[torch.isfinite(e4m3) & ((e4m3.abs() >= 2 ** -6) | (e4m3 == 0))]
    kv_scale = None if scales is None else torch.tensor([*scales, 0.0, 0.0])[:2]
    k, v = _model_kv(n, kv_heads, head_dim, torch.cat([normal, normal * 8]), g, scales or (1.0, 1.0))
    assert not k.is_contiguous() and not v.is_contiguous(), "the model's strided views"
    blocks = -(-(n + 20) // block_size)
    slots = _scattered_slots(n, pad, blocks * block_size, g)
    k[n - pad:], v[n - pad:] = k[0], v[0]
    cache = torch.randint(0, 126, (2, blocks + 1, block_size, kv_heads, head_dim), generator=g,
                          dtype=torch.uint8).view(FP8)
    want = cache.clone()
    store_kv(k, v, want, slots, kv_scale)
    store_kv_triton(k, v, cache, slots, kv_scale)
    assert (want.view(torch.uint8) == 0x7E).any() and (want.view(torch.uint8) == 0xFE).any(), "clamped at +-448"
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


def test_fused_kv_store_skips_negative_slots():
    from batchllm.attention.kv_store_triton import store_kv_triton

    k = torch.randn(3, 2, 64)
    cache = torch.zeros(2, 2, 16, 2, 64)
    store_kv_triton(k, k + 1, cache, torch.tensor([-1, 4, -1]))
    assert torch.equal(cache[0, 0, 4], k[1]) and torch.equal(cache[1, 0, 4], k[1] + 1)
    cache[:, 0, 4] = 0
    assert not cache.any(), "rows with slot -1 wrote nothing"


@pytest.mark.parametrize("key_dtype, cache_dtype, message", [
    (torch.float64, torch.float64, "a 16/32-bit or fp8 cache, got torch.float64"),
    (torch.int8, torch.int8, "a 16/32-bit or fp8 cache, got torch.int8"),
    (torch.float32, torch.bfloat16, "K/V of torch.float32 into a torch.bfloat16 cache"),
])
def test_fused_kv_store_names_a_cache_it_cannot_take(key_dtype, cache_dtype, message):
    """A ValueError naming the dtype (an 8-byte one was a KeyError from the bit-width table)."""
    from batchllm.attention.kv_store_triton import store_kv_triton

    k = torch.zeros(3, 2, 64, dtype=key_dtype)
    with pytest.raises(ValueError, match=re.escape(message)):
        store_kv_triton(k, k, torch.zeros(2, 2, 16, 2, 64, dtype=cache_dtype), torch.tensor([0, 1, 2]))


def test_bf16_queries_over_an_fp8_cache_take_fp16_dots():
    """A bf16 query over an fp8 cache: the kernel's dots take fp16 operands (e4m3 is exact in fp16,
    and casts to it fast); the output is the reference's (fp32 over the dequantized cache) to bf16's
    precision, through prefix items, suffix items and tiles. A query component past fp16's range is
    clamped: that token's output stays finite."""
    from batchllm.attention.triton_backend import TritonBackend

    specs = group_decode(4, 300, 20) + [(90, 1), (0, 40)]
    q, k, v, cache, md, kv_scale = fp8_case(specs)
    q, k, v = q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float()  # what the bf16 run sees
    ref = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 0.125, kv_scale)
    backend = TritonBackend(min_members=1, min_shared=1)
    out = backend.forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), cache.clone(), md, 0.125, kv_scale)
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    assert plan.items.num_group_items > 0, "the prefix-shared path ran"
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    q[0, 0, 0] = 1e5  # a bf16 number, not an fp16 one
    md.backend_cache.clear()
    out = backend.forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), cache.clone(), md, 0.125, kv_scale)
    assert torch.isfinite(out.float()).all()


def test_engine_takes_the_decode_tile_of_its_cache():
    """DECODE_TILE_FP8 over an fp8 cache of 16-token blocks (where it was measured) and of 128-token
    blocks (whole in a block), for narrow rows; DECODE_TILE_TMA where tiles load by TMA and over an fp8
    cache of 64-token blocks (one index per tile, as the default tile's); DECODE_TILE over a 16-bit
    cache without TMA and for float32 rows of head dim 128; the HEAD_256 tiles for head dim 256 (the 64-row prefix
    programs' shared memory: tests/sm90_compile.py)."""
    from batchllm.attention.triton_backend import (
        DECODE_TILE,
        DECODE_TILE_FP8,
        DECODE_TILE_TMA,
        HEAD_256_DECODE_TILE,
        HEAD_256_FP32_DECODE_TILE,
        decode_tile_for,
    )
    from batchllm.layers.fp8 import FP8

    assert DECODE_TILE_FP8 == TileConfig(128, 4, 3)  # the groups-decode-tile-fp8 case's
    assert decode_tile_for(FP8, 16, torch.bfloat16, 128) == DECODE_TILE_FP8
    assert decode_tile_for(FP8, 16, torch.float32, 64) == DECODE_TILE_FP8  # the tiny models' float32 rows
    assert decode_tile_for(torch.bfloat16, 16, torch.bfloat16, 128) == DECODE_TILE
    assert decode_tile_for(FP8, 64, torch.bfloat16, 128) == DECODE_TILE_TMA  # one more tile in flight (measured)
    assert decode_tile_for(FP8, 64, torch.bfloat16, 256) == HEAD_256_DECODE_TILE  # head dim 256
    assert decode_tile_for(FP8, 128, torch.bfloat16, 128) == DECODE_TILE_FP8  # whole in a block again
    assert decode_tile_for(FP8, 128, torch.bfloat16, 256) == decode_tile_for(FP8, 16, torch.bfloat16, 256)
    assert decode_tile_for(FP8, 16, torch.float32, 256) == HEAD_256_FP32_DECODE_TILE
    assert decode_tile_for(FP8, 16, torch.float32, 128) == DECODE_TILE  # wide rows
    # where the tiles load by TMA (a 16-bit cache of 64-token blocks on Hopper): one stage more
    assert DECODE_TILE_TMA == TileConfig(DECODE_TILE.block_n, DECODE_TILE.num_warps, DECODE_TILE.num_stages + 1)
    assert decode_tile_for(torch.bfloat16, 64, torch.bfloat16, 128, tma=True) == DECODE_TILE_TMA
    assert decode_tile_for(torch.bfloat16, 16, torch.bfloat16, 128, tma=True) == DECODE_TILE  # no tile in a block
    assert decode_tile_for(torch.bfloat16, 64, torch.float32, 128, tma=True) == DECODE_TILE  # wide rows


@pytest.mark.parametrize("kv_cache_dtype, block_size, tile", [("fp8", 16, "fp8"), ("auto", 16, "default"),
                                                               ("fp8", 64, "tma"), ("fp8", 128, "fp8")])
def test_engine_builds_its_triton_backend_with_the_decode_tile_of_its_cache(tiny_model_factory, monkeypatch,
                                                                            kv_cache_dtype, block_size, tile):
    """build_runner's Triton branch (CUDA only in use) run on the CPU interpreter: the engine hands the
    backend `decode_tile_for` its cache, and decodes the tokens the torch reference decodes over the
    same cache dtype."""
    from batchllm import LLM, SamplingParams
    from batchllm import engine as engine_module
    from batchllm.attention.triton_backend import DECODE_TILE, DECODE_TILE_FP8, DECODE_TILE_TMA, TritonBackend

    model_dir = tiny_model_factory("llama")
    prompts = [{"prompt_token_ids": [5 + i, 40, 41, 42, 300 + i]} for i in range(3)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)

    def run():
        llm = LLM(model_dir, device="cpu", dtype="float32", kv_cache_dtype=kv_cache_dtype, block_size=block_size,
                  skip_tokenizer_init=True, kv_cache_memory_gib=0.01)
        return llm, [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]

    _, reference = run()
    monkeypatch.setattr(engine_module, "use_triton", lambda choice, device, setting: setting == "attention_backend")
    llm, triton_tokens = run()
    backend = llm.engine.runner.backend
    assert isinstance(backend, TritonBackend)
    assert backend.decode_tile == {"fp8": DECODE_TILE_FP8, "tma": DECODE_TILE_TMA, "default": DECODE_TILE}[tile]
    assert triton_tokens == reference


def test_seeded_noise_kernel_is_the_host_hash():
    """The Triton kernel's uint32 arithmetic gives the host form's integers (only float32 `log` may
    round apart), over one block, a ragged last block and seeds of every range."""
    import numpy as np

    from batchllm.layers.seeded_noise import row_keys, seeded_exponential_host
    from batchllm.layers.seeded_noise_triton import seeded_exponential_triton

    keys = row_keys([0, 1, 0, -5, 2**64 - 1], [0, 0, 1, 7, 10**6]).tolist()
    for vocab in (1, 1000, 2500):
        torch.testing.assert_close(seeded_exponential_triton(torch.tensor(keys), vocab),
                                   seeded_exponential_host(np.array(keys, dtype=np.uint32), vocab),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tiles", ["float32", "16-bit"])
def test_head_dim_256_launches_match_reference(tiles, monkeypatch):
    """The launches head dim 256 takes (`head_256`: 32-key tiles; 32 query rows with one stage in float32, 64 in
    16 bits, run here over float32 values: the interpreter's bf16 is not the GPU's) over prefill chunks, prefix
    groups and decodes, against the reference."""
    from batchllm.attention import triton_backend as tb

    if tiles == "16-bit":
        monkeypatch.setattr(tb, "HEAD_256_FP32_PREFILL_LAUNCH", tb.HEAD_256_PREFILL_LAUNCH)
        monkeypatch.setattr(tb, "HEAD_256_FP32_DECODE_TILE", tb.HEAD_256_DECODE_TILE)
    specs = group_decode(4, 300, 20) + [(90, 1), (0, 70), (64, 40)]
    q, k, v, cache, md = random_case(specs, 4, 2, 256, 64, torch.float32, seed=7, device="cpu")
    ref = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, 256 ** -0.5)
    decode_tile = tb.decode_tile_for(torch.float32, 64, torch.float32, 256)
    out = tb.TritonBackend(decode_tile=decode_tile, min_members=1, min_shared=1).forward(q, k, v, cache, md,
                                                                                        256 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    [plan] = [p for key, p in md.backend_cache.items() if key[0] == "triton_items"]
    assert plan.items.num_group_items > 0 and {launch.tile.block_n for launch in plan.launches} == {32}
    rows = {launch.block_q * 2 for launch in plan.launches if launch.block_q > 1}  # (GQA 2: two rows per query)
    assert rows == ({64} if tiles == "16-bit" else {64, 32}), "prefix programs: 64 rows; prefill: the launch's"
