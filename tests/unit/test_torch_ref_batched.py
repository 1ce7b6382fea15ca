"""The batched reference attention equals one SDPA call per sequence (its definition), and its
grouping keeps padding bounded."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchllm.attention.torch_ref import GROUP_MIN_AREA, GROUP_SLACK, TorchReferenceBackend, plan_groups
from tests.attention_cases import group_decode, random_case


def attend_per_sequence(query, kv_cache, md, scale):
    """The definition: each sequence's queries against its own keys 0..seq_len-1, causally."""
    num_heads, head_dim, num_kv_heads = query.shape[1], query.shape[2], kv_cache.shape[3]
    out = torch.empty_like(query)
    starts = md.query_start_loc_cpu
    for i, seq_len in enumerate(md.seq_lens_cpu):
        q_start, q_end = starts[i], starts[i + 1]
        blocks = torch.tensor(md.block_tables_cpu[i][: -(-seq_len // md.block_size)])
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)[None]
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].transpose(0, 1)[None]
        q = query[q_start:q_end].transpose(0, 1)[None]
        q_pos = torch.arange(seq_len - (q_end - q_start), seq_len)[:, None]
        mask = torch.arange(seq_len)[None, :] <= q_pos
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=num_heads != num_kv_heads)
        out[q_start:q_end] = o[0].transpose(0, 1)
    return out


CASES = [
    ("decodes-mixed-lengths", [(c, 1) for c in (0, 5, 16, 17, 40, 300, 301, 900)]),
    ("decodes-one-length", [(63, 1)] * 6),
    ("fresh-prefills-one-length", [(0, 24)] * 3),
    ("fresh-prefills-ragged", [(0, n) for n in (1, 2, 7, 33, 130)]),
    ("chunked-prefill-and-decodes", [(64, 64), (128, 40), (10, 1), (500, 1), (0, 90), (3, 2)]),
    ("shared-prefix-groups", group_decode(5, shared=70, own=9) + [(30, 1), (0, 20)]),
]


@pytest.mark.parametrize("name, specs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa", "mha"])
def test_batched_equals_per_sequence(name, specs, heads):
    num_heads, num_kv_heads = heads
    q, k, v, cache, md = random_case(specs, num_heads, num_kv_heads, 32, 16, torch.float32, seed=5, device="cpu")
    # Slots never written (beyond each sequence's length) hold NaN: padding must never read them.
    written = torch.zeros(cache.shape[1] * cache.shape[2], dtype=torch.bool)
    for table, n in zip(md.block_tables_cpu, md.seq_lens_cpu):
        for p in range(n):
            written[table[p // 16] * 16 + p % 16] = True
    cache.view(2, -1, num_kv_heads, 32)[:, ~written] = float("nan")
    got = TorchReferenceBackend().forward(q, k, v, cache, md, 0.2)  # stores the new K/V, then attends
    expected = attend_per_sequence(q, cache, md, 0.2)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_groups_cover_every_sequence_once_and_keep_kinds_apart():
    qlens = [1, 1, 1, 1, 40, 40, 1, 200]
    slens = [10, 12, 9000, 11, 40, 50, 9500, 200]
    groups = plan_groups(qlens, slens)
    assert sorted(i for g in groups for i in g) == list(range(len(qlens)))
    assert groups == [[0, 3, 1], [2, 6], [4, 5], [7]]


def test_group_padding_stays_within_slack():
    slens = [10 + 37 * i for i in range(60)]
    for qlens in ([1] * 60, [min(n, 64) for n in slens]):
        for g in plan_groups(qlens, slens):
            real = sum(qlens[i] * slens[i] for i in g)
            padded = len(g) * max(qlens[i] for i in g) * max(slens[i] for i in g)
            assert padded <= GROUP_SLACK * real + GROUP_MIN_AREA
        assert len(plan_groups(qlens, slens)) < 20  # far fewer calls than sequences
