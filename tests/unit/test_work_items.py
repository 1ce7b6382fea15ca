"""The Triton backend's work plan, on CPU: coverage of every query's keys, and the plan executed in
torch (partials + log-sum-exp merge, as the kernels do) against the reference attention."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from batchllm.attention.torch_ref import TorchReferenceBackend
from batchllm.attention.work_items import MIN_SHARED_TOKENS, plan_work_items, split_length
from tests.attention_cases import group_decode, random_case


def covered_ranges(items):
    """token -> list of (lo, hi) key ranges the items give it (hi clipped at its position + 1)."""
    got: dict[int, list[tuple[int, int]]] = {}
    for w in range(items.num_items):
        a, n = items.q_off[w], items.q_len[w]
        for t, p in zip(items.q_tokens[a:a + n], items.q_pos[a:a + n]):
            got.setdefault(int(t), []).append((int(items.kv_lo[w]), min(int(items.kv_hi[w]), int(p) + 1)))
    return got


def layout(rng):
    """A random step: plain prefill chunks and decodes, and prefix groups (some nested in an outer
    group) decoding together. Per sequence: (cached, new, levels), levels outermost first."""
    specs = []
    next_group = 0
    for _ in range(rng.randint(0, 3)):
        outer, outer_share = next_group, rng.choice([1, 16, 100, 700])
        next_group += 1
        for _ in range(rng.randint(1, 3)):
            inner, inner_share = next_group, outer_share + rng.choice([0, 5, 64, 300, 2000])
            next_group += 1
            for _ in range(rng.randint(1, 30)):
                levels = [(outer, outer_share)] + ([(inner, inner_share)] if inner_share > outer_share else [])
                specs.append((levels[-1][1] + rng.randint(0, 50), 1, levels))
    for _ in range(rng.randint(0, 6)):
        specs.append((rng.randint(0, 3000), rng.choice([1, 1, 7, 64, 300]), []))
    if not specs:
        specs.append((0, 5, []))
    rng.shuffle(specs)
    return specs


def share_levels_of(specs):
    depth = max(len(levels) for *_, levels in specs)
    out = [([-1] * len(specs), [0] * len(specs)) for _ in range(depth)]
    for i, (*_, levels) in enumerate(specs):
        for d, (group, share) in enumerate(levels):
            out[d][0][i], out[d][1][i] = group, share
    return out or None


@pytest.mark.parametrize("seed", range(40))
def test_every_visible_key_is_covered_exactly_once(seed):
    rng = random.Random(seed)
    specs = layout(rng)
    loc = [0]
    for _, n, _ in specs:
        loc.append(loc[-1] + n)
    lens = [c + n for c, n, _ in specs]
    block_q = rng.choice([1, 4, 16])
    group_block_q = rng.choice([1, 4, 16])
    align = rng.choice([1, 1, 16, 64])
    items = plan_work_items(loc, lens, block_q, share_levels_of(specs), split_len=rng.choice([None, 64, 500]),
                            group_block_q=group_block_q, min_members=rng.choice([1, 4]),
                            min_shared=rng.choice([1, 64]), align=align, split_per_launch=rng.choice([False, True]))
    assert all(lo % align == 0 for lo in items.kv_lo), "every item's keys start at a multiple of align"
    got = covered_ranges(items)
    assert sorted(got) == list(range(loc[-1])), "every token is in some item"
    for i, (c, n, _) in enumerate(specs):
        for j in range(n):
            t, pos = loc[i] + j, c + j
            ranges = sorted(r for r in got[t] if r[1] > r[0])
            assert ranges[0][0] == 0 and ranges[-1][1] == pos + 1
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"gap or overlap for token {t}: {ranges}"
    p = items.num_prefix_items
    assert all(1 <= q <= group_block_q for q in items.q_len[:p]) and all(1 <= q <= block_q for q in items.q_len[p:])
    assert all(lo == 0 or items.part[w] >= 0 for w, lo in enumerate(items.kv_lo[:p]))
    merged = set(items.merge_tokens.tolist())
    for w in range(items.num_items):  # an item writes directly iff its tokens have no other item
        toks = items.q_tokens[items.q_off[w]:items.q_off[w] + items.q_len[w]].tolist()
        assert (items.part[w] < 0) == all(t not in merged for t in toks)


def test_a_group_reads_its_shared_keys_once_per_block_q_members():
    specs = group_decode(64, shared=4000, own=30)
    loc = list(range(65))
    lens = [c + n for c, n, _, _ in specs]
    items = plan_work_items(loc, lens, 16, [([0] * 64, [4000] * 64)], split_len=10**9)
    shared_reads = sum(int(items.kv_hi[w] - items.kv_lo[w]) for w in range(items.num_items) if items.kv_lo[w] == 0)
    assert shared_reads == 4 * 4000  # 64 members / 16 per item, instead of 64 * 4000
    assert items.num_group_items == 4


def test_aligned_plan_rounds_a_groups_reach_down_and_members_read_the_rest():
    """align=64 (64-token cache blocks): a group sharing 2,000 positions gets prefix items over
    [0, 1984) and each member's suffix item starts at 1984 (16 shared keys read per member), split-K
    pieces are multiples of 64; align=1 is the plan as before (prefix items over [0, 2000))."""
    specs = group_decode(16, shared=2000, own=30)
    loc = list(range(17))
    lens = [c + n for c, n, _, _ in specs]
    levels = [([0] * 16, [2000] * 16)]
    plain = plan_work_items(loc, lens, 16, levels, split_len=10**9)
    aligned = plan_work_items(loc, lens, 16, levels, split_len=10**9, align=64)
    p = plain.num_prefix_items
    assert set(plain.kv_hi[:p]) == {2000} and set(plain.kv_lo[p:]) == {2000}
    assert set(aligned.kv_hi[:p]) == {1984} and set(aligned.kv_lo[aligned.num_prefix_items:]) == {1984}
    split = plan_work_items(loc, lens, 16, levels, split_len=700, align=64)
    assert all(lo % 64 == 0 for lo in split.kv_lo) and split.num_items > aligned.num_items


def test_small_groups_and_short_prefixes_use_plain_tiles():
    lens = [MIN_SHARED_TOKENS - 1 + 5] * 4 + [500]
    loc = list(range(6))
    items = plan_work_items(loc, lens, 16, [([0, 0, 0, 0, 1], [MIN_SHARED_TOKENS - 1] * 4 + [400])], split_len=10**9)
    assert items.num_group_items == 0 and items.num_partials == 0 and items.num_items == 5


def test_split_per_launch_spreads_the_prefix_launch_by_its_own_keys():
    """32 groups of 8 decodes sharing 1,000 positions, each with 600 own: over the whole step's keys
    no item is long enough to cut; the prefix launch alone (32 items x 8 KV heads = 256 programs)
    is cut to fill about TARGET_PROGRAMS programs, the suffix launch (2,048 programs) is left whole."""
    n = 256
    loc, lens = list(range(n + 1)), [1601] * n
    levels = [([i // 8 for i in range(n)], [1000] * n)]
    joint = plan_work_items(loc, lens, 1, levels, group_block_q=16)
    apart = plan_work_items(loc, lens, 1, levels, group_block_q=16, split_per_launch=True)
    assert joint.num_group_items == apart.num_group_items == 32
    assert joint.num_prefix_items == 32 and joint.num_items == 32 + n
    assert apart.num_prefix_items == 32 * 2  # 1,000 keys in pieces of at most max(512, 32,000 x 8 / 512)
    assert apart.num_items - apart.num_prefix_items == n
    assert (apart.kv_hi - apart.kv_lo)[:64].max() == 500


def test_split_length_grows_with_the_step():
    assert split_length(16 * 16000, num_kv_heads=8) == 4000  # 16 long decodes: 4 pieces each
    assert split_length(1024 * 2200, num_kv_heads=8) > 2200  # a big decode batch fills the GPU unsplit
    assert split_length(100, num_kv_heads=8) == 512  # never cut below the minimum


def run_plan_in_torch(q, cache, md, items, scale):
    """What the two kernels compute, in fp32 torch: one partial (output, log-sum-exp) per item and
    query, then the log-sum-exp merge."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // cache.shape[3]
    bs = md.block_size
    out = torch.zeros(num_tokens, num_heads, head_dim)
    partials: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for w in range(items.num_items):
        table = md.block_tables_cpu[int(items.seq[w])]
        a, n = int(items.q_off[w]), int(items.q_len[w])
        for j in range(n):
            t, pos = int(items.q_tokens[a + j]), int(items.q_pos[a + j])
            keys = torch.arange(int(items.kv_lo[w]), min(int(items.kv_hi[w]), pos + 1))
            slots = torch.tensor([table[p // bs] * bs + p % bs for p in keys.tolist()], dtype=torch.long)
            k = cache[0].reshape(-1, *cache.shape[3:])[slots].float().repeat_interleave(group, 1)  # [n, h, d]
            v = cache[1].reshape(-1, *cache.shape[3:])[slots].float().repeat_interleave(group, 1)
            s = torch.einsum("hd,nhd->hn", q[t].float(), k) * scale
            lse = torch.logsumexp(s, dim=1) if len(keys) else torch.full((num_heads,), float("-inf"))
            o = torch.einsum("hn,nhd->hd", torch.softmax(s, 1), v) if len(keys) else torch.zeros(num_heads, head_dim)
            if items.part[w] < 0:
                out[t] = o
            else:
                partials[int(items.part[w]) + j] = (o, lse)
    for i, t in enumerate(items.merge_tokens.tolist()):
        rows = items.merge_parts[items.merge_ptr[i]:items.merge_ptr[i + 1]].tolist()
        lse = torch.stack([partials[r][1] for r in rows])  # [parts, h]
        o = torch.stack([partials[r][0] for r in rows])  # [parts, h, d]
        w = torch.softmax(lse, dim=0)
        out[t] = (w[..., None] * o).sum(0)
    return out


CASES = [
    ("group-of-5-plus-plain", group_decode(5, shared=70, own=9) + [(30, 1), (0, 20)]),
    ("two-groups-unaligned", group_decode(3, 100, 3, group=0) + group_decode(4, 67, 0, group=1)),
    ("empty-own-suffix", group_decode(4, 64, 0)),
    ("split-k-long-decode", [(3000, 1), (2500, 1), (40, 8)]),
    ("nested-groups", [(120 + j, 1, [(0, 50), (1 + j % 2, 90)]) for j in range(8)] + [(70, 1, [(0, 50)])] * 3
     + [(40, 3)]),
]


@pytest.mark.parametrize("align", [1, 16])
@pytest.mark.parametrize("name, specs", CASES, ids=[c[0] for c in CASES])
def test_plan_executed_in_torch_matches_reference(name, specs, align):
    q, k, v, cache, md = random_case(specs, 8, 2, 16, 16, torch.float32, seed=3, device="cpu")
    scale = 0.25
    ref = TorchReferenceBackend().forward(q, k, v, cache, md, scale)  # also stores the new K/V
    items = plan_work_items(md.query_start_loc_cpu, md.seq_lens_cpu, 4, md.share_levels_cpu,
                            split_len=1024 if "split" in name else None, min_members=1, min_shared=1, align=align)
    if "group" in name or "suffix" in name:
        assert items.num_group_items > 0
    if "nested" in name:  # inner groups' items start where the outer group's end (rounded down to align)
        assert (items.kv_lo[:items.num_prefix_items] == 50 // align * align).any()
    if "split" in name:
        assert len(items.merge_tokens) > 0
    got = run_plan_in_torch(q, cache, md, items, scale)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def item_rows(arrays, lo: int = 0, hi: int | None = None) -> list[tuple]:
    """Items lo .. hi - 1 of `arrays` (item field -> array) as sorted rows: the same items in any order."""
    from batchllm.attention.triton_backend import ITEM_FIELDS

    return sorted(zip(*(arrays[f][lo:hi].tolist() for f in ITEM_FIELDS)))


def test_triton_backend_plans_launches_on_cpu():
    """The backend's planning half needs neither Triton nor CUDA: launches cover every item once,
    prefix items run in 64-row programs and one-token items in 16-row ones (the "split" launch)."""
    from batchllm.attention.triton_backend import DECODE_TILE, ITEM_FIELDS, TritonBackend

    specs = group_decode(20, 300, 7, 0) + group_decode(3, 1000, 0, 1) + [(50, 1), (2000, 1)]
    *_, md = random_case(specs, 32, 8, 128, 16, torch.float32, seed=0, device="cpu")
    plan = TritonBackend()._plan(md, 4, 32, 128, 8)
    items = plan.items
    assert items.num_group_items > 0
    covered = [i for launch in plan.launches for i in range(launch.item_offset, launch.item_offset + launch.grid)]
    assert covered == list(range(items.num_items))
    assert [launch.block_q for launch in plan.launches] == [16, 1]
    assert all(launch.tile == DECODE_TILE for launch in plan.launches)
    # each launch's count (which its programs check on the device) is its number of items, as the merge's
    assert [int(launch.count) for launch in plan.launches] == [launch.grid for launch in plan.launches]
    assert plan.merge_grid == int(plan.merge_count) == len(items.merge_tokens) > 0
    assert all(c.data_ptr() % 16 == 0 for c in [plan.merge_count, *(launch.count for launch in plan.launches)])
    for name, values in plan.tensors.items():  # device copies of the plan, 16-byte aligned
        assert values.data_ptr() % 16 == 0
        if name not in ITEM_FIELDS:  # the item arrays are reordered: below
            assert values.tolist() == getattr(items, name).tolist()
    assert plan.part_out.shape == (max(items.num_partials, 1), 32, 128)
    for launch in plan.launches:  # each launch holds its own items (the same rows; their order: below)
        lo, hi = launch.item_offset, launch.item_offset + launch.grid
        assert item_rows(plan.tensors, lo, hi) == item_rows({f: getattr(items, f) for f in ITEM_FIELDS}, lo, hi)


def test_each_launch_runs_its_longest_key_ranges_first():
    """A causal prefill chunk's tiles and decodes of several lengths: each launch's items by key range
    in ORDER_KEYS units, longest first, plan order within a unit (a sequence's tiles side by side);
    with longest_first=False the device arrays are the plan's own."""
    from batchllm.attention.triton_backend import ITEM_FIELDS, ORDER_KEYS, TritonBackend

    specs = [(0, 4096), (64, 40), (100, 1), (3000, 1), (1500, 1), (5000, 1)]
    *_, md = random_case(specs, 32, 8, 128, 16, torch.float32, seed=0, device="cpu")
    plan = TritonBackend(split_len=10**9)._plan(md, 4, 32, 128, 8)
    t = {name: values.numpy() for name, values in plan.tensors.items()}
    for launch in plan.launches:
        lo, hi = launch.item_offset, launch.item_offset + launch.grid
        keys = t["kv_hi"][lo:hi] - t["kv_lo"][lo:hi]
        units = keys // ORDER_KEYS
        assert (np.diff(units) <= 0).all() and len(set(units.tolist())) > 1
        for unit in set(units.tolist()):  # within a unit: plan order (tokens ascending)
            q_off = t["q_off"][lo:hi][units == unit]
            assert (np.diff(q_off) > 0).all()
    md.backend_cache.clear()
    in_order = TritonBackend(split_len=10**9, longest_first=False)._plan(md, 4, 32, 128, 8)
    for name in ITEM_FIELDS:
        assert in_order.tensors[name].tolist() == getattr(in_order.items, name).tolist()


def test_mixed_step_launches_prefill_tiles_apart_from_one_query_items():
    """A step with prefill chunks, group decodes and plain decodes: three launches (prefix items,
    several-query tiles in the prefill shape, one-query items in 16-row programs); the device arrays
    hold the same items, reordered so that each launch's range holds only its kind."""
    from batchllm.attention.triton_backend import ITEM_FIELDS, TileConfig, TritonBackend

    specs = group_decode(8, 300, 7, 0) + [(0, 300), (50, 1), (2000, 1), (64, 40)]
    *_, md = random_case(specs, 32, 8, 128, 16, torch.float32, seed=0, device="cpu")
    backend = TritonBackend(prefill_launch=(128, 64, 4, 3))
    plan = backend._plan(md, 4, 32, 128, 8)
    items, t = plan.items, plan.tensors
    prefix, multi, single = plan.launches
    p, m, n_single = prefix.grid, multi.grid, single.grid
    m0, s0 = multi.item_offset, single.item_offset
    assert (prefix.item_offset, m0, s0) == (0, p, p + m) and p + m + n_single == items.num_items
    assert (prefix.block_q, multi.block_q, single.block_q) == (16, 32, 1) and multi.tile == TileConfig(64, 4, 3)
    q_len = t["q_len"].numpy()
    assert p == items.num_prefix_items and (q_len[m0:s0] > 1).all() and (q_len[s0:] == 1).all()
    assert item_rows(t) == item_rows({f: getattr(items, f) for f in ITEM_FIELDS})
