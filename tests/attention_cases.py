"""Random attention inputs over a paged cache, for the kernel tests (GPU) and the work-plan tests (CPU).

A case is a list of sequences `(cached, new, group, share)`: `cached` tokens already in the cache,
`new` tokens computed this step, and, for members of a prefix group (group >= 0), `share` leading
positions whose KV is the group's. Members hold the group's full blocks by reference, and a copy of
its partial last block (copy-on-write, as the scheduler does), so the layout is the engine's.
"""

from __future__ import annotations

import math

import torch

from batchllm.attention.backend import AttentionMetadata


def random_case(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, device="cuda"):
    """specs: (cached, new) or (cached, new, group, share) per sequence, or (cached, new, levels) with
    levels = [(group, share), ...] outermost first (nested groups). Returns q, k, v, a cache full
    of random values (the context already 'computed') and the step's metadata, with a shuffled
    block assignment."""
    if any(len(s) == 3 for s in specs):
        return _nested_case(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, device)
    specs = [tuple(s) + (-1, 0) if len(s) == 2 else tuple(s) for s in specs]
    g = torch.Generator(device=device).manual_seed(seed)
    counted: set[int] = set()  # groups whose shared blocks are already in `need`
    need = 7
    for c, n, grp, share in specs:
        need += math.ceil((c + n) / block_size) - (share // block_size if grp >= 0 else 0)
        if grp >= 0 and grp not in counted:
            counted.add(grp)
            need += share // block_size + 1
    perm = torch.randperm(need, generator=g, device=device).tolist()
    cache = torch.randn(2, need, block_size, num_kv_heads, head_dim, generator=g, device=device).to(dtype)
    taken = 0

    def take(n):
        nonlocal taken
        taken += n
        return perm[taken - n:taken]

    group_src: dict[int, tuple[list[int], int | None]] = {}
    for _c, _n, grp, share in specs:
        if grp >= 0 and grp not in group_src:
            full, partial = divmod(share, block_size)
            group_src[grp] = (take(full), take(1)[0] if partial else None)
    tables = []
    for c, n, grp, share in specs:
        nb = math.ceil((c + n) / block_size)
        if grp < 0:
            tables.append(take(nb))
            continue
        assert share <= c, "members share only cached positions"
        full_blocks, partial_src = group_src[grp]
        table = list(full_blocks)
        if partial_src is not None:  # copy-on-write: the same KV in the shared slots of a private block
            [dst] = take(1)
            cache[:, dst] = cache[:, partial_src]
            table.append(dst)
        tables.append(table + take(nb - len(table)))
    total = sum(s[1] for s in specs)
    q = torch.randn(total, num_heads, head_dim, generator=g, device=device).to(dtype)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g, device=device).to(dtype)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g, device=device).to(dtype)
    slots, loc, lens = [], [0], []
    for (c, n, _, _), table in zip(specs, tables):
        for p in range(c, c + n):
            slots.append(table[p // block_size] * block_size + p % block_size)
        loc.append(loc[-1] + n)
        lens.append(c + n)
    width = max(len(t) for t in tables)
    grouped = any(s[2] >= 0 for s in specs)
    md = AttentionMetadata(
        num_tokens=total, block_size=block_size,
        slot_mapping=torch.tensor(slots, device=device, dtype=torch.long),
        query_start_loc=torch.tensor(loc, device=device, dtype=torch.int32),
        seq_lens=torch.tensor(lens, device=device, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device, dtype=torch.int32),
        max_query_len=max(s[1] for s in specs), max_seq_len=max(lens),
        query_start_loc_cpu=loc, seq_lens_cpu=lens, block_tables_cpu=tables,
        share_levels_cpu=[([s[2] for s in specs], [s[3] for s in specs])] if grouped else None,
    )
    return q, k, v, cache, md


def poison_unwritten_slots(cache: torch.Tensor, md, halves: tuple[int, ...] = (0, 1)) -> None:
    """NaN in every cache slot no sequence of the step holds a key in (past each sequence's length,
    and blocks nobody holds), in K and V or in the `halves` named (an fp8 cache's keys-major V is read
    in whole tiles by design: its unwritten slots must stay finite): a kernel that reads one unmasked
    turns its outputs to NaN."""
    written = torch.zeros(cache.shape[1] * cache.shape[2], dtype=torch.bool)
    for table, length in zip(md.block_tables_cpu, md.seq_lens_cpu):
        for position in range(length):
            written[table[position // md.block_size] * md.block_size + position % md.block_size] = True
    slots, nan = cache.view(2, -1, *cache.shape[3:]), float("nan")
    if cache.element_size() == 1:  # fp8 (e4m3fn): NaN is the byte 0x7f (no index_put for float8 on CPU)
        slots, nan = slots.view(torch.uint8), 0x7F
    for half in halves:
        slots[half, ~written.to(cache.device)] = nan


def group_decode(num_members, shared, own, group=0, new=1):
    """`num_members` sequences sharing `shared` positions, each with `own` more cached tokens."""
    return [(shared + own, new, group, shared) for _ in range(num_members)]


def _nested_case(specs, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, device):
    """Nested groups by content: every sequence has blocks of its own, and each member's shared
    positions are copied from the first member of its group, level by level (outer first)."""
    specs = [(s[0], s[1], list(s[2]) if len(s) == 3 else ([(s[2], s[3])] if len(s) == 4 else []))
             for s in specs]
    flat = [(c, n) for c, n, _ in specs]
    q, k, v, cache, md = random_case(flat, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, device)
    first: dict[int, int] = {}
    depth = max(len(levels) for _, _, levels in specs)
    share_levels = [([-1] * len(specs), [0] * len(specs)) for _ in range(depth)]
    for i, (c, _, levels) in enumerate(specs):
        for d, (group, share) in enumerate(levels):
            assert share <= c, "members share only cached positions"
            share_levels[d][0][i], share_levels[d][1][i] = group, share
            src = first.setdefault(group, i)
            for p in range(share):
                a, b = md.block_tables_cpu[src], md.block_tables_cpu[i]
                cache[:, b[p // block_size], p % block_size] = cache[:, a[p // block_size], p % block_size]
    md.share_levels_cpu = share_levels
    return q, k, v, cache, md
