"""The Triton paged attention kernel against the torch reference, on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from batchllm.attention.backend import AttentionMetadata
from batchllm.attention.torch_ref import TorchReferenceBackend

pytestmark = pytest.mark.gpu


def random_case(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """specs: (cached tokens, new tokens) per sequence. Returns inputs, cache and metadata with a
    shuffled block assignment and a cache full of random values (context already 'computed')."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    blocks_per_seq = [math.ceil((c + n) / block_size) for c, n in specs]
    num_blocks = sum(blocks_per_seq) + 7
    perm = torch.randperm(num_blocks, generator=g, device=dev).tolist()
    tables, pos = [], 0
    for nb in blocks_per_seq:
        tables.append(perm[pos:pos + nb])
        pos += nb
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g, device=dev).to(dtype)
    total = sum(n for _, n in specs)
    q = torch.randn(total, num_heads, head_dim, generator=g, device=dev).to(dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g, device=dev).to(dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g, device=dev).to(dtype)
    slots, loc, lens = [], [0], []
    for (c, n), table in zip(specs, tables):
        for p in range(c, c + n):
            slots.append(table[p // block_size] * block_size + p % block_size)
        loc.append(loc[-1] + n)
        lens.append(c + n)
    width = max(len(t) for t in tables)
    md = AttentionMetadata(
        num_tokens=total, block_size=block_size,
        slot_mapping=torch.tensor(slots, device=dev, dtype=torch.long),
        query_start_loc=torch.tensor(loc, device=dev, dtype=torch.int32),
        seq_lens=torch.tensor(lens, device=dev, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=dev, dtype=torch.int32),
        max_query_len=max(n for _, n in specs), max_seq_len=max(lens),
        query_start_loc_cpu=loc, seq_lens_cpu=lens, block_tables_cpu=tables,
    )
    return q, k, v, cache, md


CASES = [
    # name, specs, heads, kv heads, head dim, block size
    ("decode-gqa4", [(37, 1), (300, 1), (1, 1), (4000, 1)], 32, 8, 128, 16),
    ("decode-mha", [(100, 1), (17, 1)], 8, 8, 64, 16),
    ("decode-gqa8-16k", [(16000, 1), (5, 1)], 32, 4, 128, 16),
    ("prefill-fresh", [(0, 77), (0, 1), (0, 300)], 32, 8, 128, 16),
    ("chunk-with-context", [(256, 64), (1000, 200), (3, 5)], 28, 4, 128, 32),
    ("mixed-decode-and-prefill", [(500, 1), (0, 129), (33, 1), (64, 64)], 9, 3, 64, 16),
    ("gqa7", [(50, 20), (200, 1)], 28, 4, 128, 16),
    ("gqa1-headdim80", [(70, 30)], 4, 4, 80, 16),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name, specs, heads, kv_heads, head_dim, block_size", CASES, ids=[c[0] for c in CASES])
def test_triton_matches_reference(name, specs, heads, kv_heads, head_dim, block_size, dtype):
    from batchllm.attention.triton_backend import TritonBackend

    for seed in range(2):  # fresh inputs each time
        q, k, v, cache, md = random_case(specs, heads, kv_heads, head_dim, block_size, dtype, seed)
        scale = head_dim ** -0.5
        ref_cache = cache.float()  # a float32 copy: the reference computes in float32
        tri_cache = cache.clone()
        ref = TorchReferenceBackend().forward(q.float(), k.float(), v.float(), ref_cache, md, scale)
        out = TritonBackend().forward(q, k, v, tri_cache, md, scale)
        torch.cuda.synchronize()
        assert not torch.isnan(out).any()
        assert torch.equal(tri_cache.float(), ref_cache), "the new K/V land in the same slots"
        err = (out.float() - ref).norm() / ref.norm()
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        assert err < tol, f"{name} {dtype}: relative error {err:.2e}"
