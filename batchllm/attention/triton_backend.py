"""Triton attention over the paged KV cache (GPU): varlen, causal, GQA of any ratio, prefill and decode,
prefix-shared attention for prefix groups, and split-K for long contexts.

One kernel serves every work item of a step (see `work_items.py`: tiles of prefill chunks and decode
tokens, prefix items of a group's shared keys, suffix items, split-K pieces), in one launch. A
program handles one item for one KV head: its rows are (query, query head of that KV head's group)
pairs, so each K/V tile is read once for the whole GQA group (and, in a prefix item, once for up to
BLOCK_Q members of the group), and a decode token with 8 query heads per KV head still fills an MMA
tile. A program walks its key range through one block table row in tiles of BLOCK_N keys with an
online softmax in fp32 (exp2, log2(e) folded into the scale), masking keys after each query's
position (causal). On a cache whose blocks hold whole tiles (block size a multiple of BLOCK_N, the
TILE_IN_BLOCK constexpr: e.g. `--block-size 64`), items whose keys start at a multiple of BLOCK_N read
one block index per tile and address it as a base plus slot offsets (in a copy of this kernel, 7-11%
faster long prefill on an H200: docs/benchmarks.md, session 9); other items, and the default 16-token
blocks, gather one block index per key. An fp8 cache of 64-token blocks keeps V keys-major
(`kv_quant.values_keys_major`): the e4m3 P x V operand is then contiguous along its sum. Items whose
keys are split write partials (fp32 output and log2-sum-exp); a second small kernel merges them with
log-sum-exp weights. Each launch reads its item count from the device and programs past it return,
so a CUDA graph can launch a fixed grid over a plan rewritten before every replay
(`static_decode_plan.StaticDecodePlan`).

Importable without Triton (the planning half, `_plan` and its `LaunchPlan`, runs on any CPU); the
kernels exist where Triton is installed. Which backend runs is `layers.ops.use_triton`'s answer to
`attention_backend`.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from batchllm.attention.backend import AttentionMetadata, store_kv
from batchllm.attention.kv_quant import is_fp8, layer_caches, values_keys_major
from batchllm.attention.work_items import MIN_GROUP_MEMBERS, MIN_SHARED_TOKENS, WorkItems, plan_work_items
from batchllm.layers.fp8 import FP8, FP8_MAX
from batchllm.layers.transfer import to_device, to_device_packed

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the backend is simply unavailable
    triton = None
    tl = None

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # no Triton, or one without tensor descriptors: tiles load through pointers
    TensorDescriptor = None

if triton is not None:
    from batchllm.attention.kv_store_triton import store_kv_triton

    P_SCALE = tl.constexpr(FP8_MAX)  # FP8_DOTS: softmax weights enter their dot times e4m3's largest value

    @triton.jit
    def _attend_tile_tma(
        q, m_i, l_i, acc, n_start, seq, kv_head, kv_heads, K_desc, V_desc, block_tables, sm_scale_log2, stride_bt,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, FP8_DOTS: tl.constexpr,
        V_KEYS_MAJOR: tl.constexpr,
    ):
        """`_attend_tile` for an unmasked tile inside one cache block, its K and V loaded by TMA
        (`tma_descriptors`) straight into shared memory. A 16-bit cache's tiles go to the dots as they
        are; an fp8 cache's are cast up as `_attend_tile`'s, or with FP8_DOTS (as `_attend_tile`'s) go
        to the e4m3 dots as loaded. V_KEYS_MAJOR: V's box is the block's [head dim, keys] for this KV
        head, transposed for the dot (the operand e4m3 MMAs take: no shuffle). Without FP8_DOTS the
        scale multiplies the row max once and enters exp2's argument as one fused multiply-add, not a
        multiply per score (3% faster long prefill on an H200: `attention_variants.py`, session 14);
        with it the scale is per row ([BLOCK_M, 1]) and multiplies the scores."""
        block_idx = tl.load(block_tables + seq * stride_bt + n_start // BLOCK_SIZE)
        slot = n_start % BLOCK_SIZE
        row = block_idx * BLOCK_SIZE + slot  # the tile's first key in the cache's rows of keys
        col = kv_head * HEAD_DIM
        k = K_desc.load([row, col])  # [BLOCK_N, head dim]
        if FP8_DOTS:
            s = tl.dot(q, tl.trans(k)) * sm_scale_log2
            m_new = tl.maximum(m_i, tl.max(s, 1))  # every score finite: no -inf rows
            p = tl.exp2(s - m_new[:, None])
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)  # unscaled scores
            m_new = tl.maximum(m_i, tl.max(s, 1) * sm_scale_log2)
            p = tl.exp2(s * sm_scale_log2 - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_KEYS_MAJOR:
            v = tl.trans(V_desc.load([(block_idx * kv_heads + kv_head) * HEAD_DIM, slot]))  # [BLOCK_N, head dim]
        else:
            v = V_desc.load([row, col])
        if FP8_DOTS:
            acc = tl.dot((p * P_SCALE).to(v.dtype), v, acc * alpha[:, None])
        else:
            acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _attend_tile(
        q, pos, m_i, l_i, acc, n_start, n_end, seq, kv_head, K_cache, V_cache, block_tables, d, d_valid,
        sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
        SCALAR_BLOCK: tl.constexpr, FP8_DOTS: tl.constexpr, V_KEYS_MAJOR: tl.constexpr, D_MASKED: tl.constexpr,
    ):
        """One online-softmax update over keys n_start .. n_start + BLOCK_N - 1 (log2 units). MASKED:
        keys at or past n_end, and keys after a row's position, are excluded; unmasked tiles lie
        wholly below n_end and at or before every row's position. SCALAR_BLOCK: the caller knows the
        tile lies in one cache block (BLOCK_SIZE % BLOCK_N == 0 and n_start % BLOCK_N == 0): one
        block index for the tile, keys at consecutive slots of it (n_start < n_end, so that block is
        the sequence's even in a masked tile; keys past n_end stay inside it and are masked);
        otherwise a block index per key. FP8_DOTS: q is e4m3 (its per-row scale folded into
        sm_scale_log2, a [BLOCK_M, 1] tensor then), k and v are the cache's e4m3 values, p goes into its
        dot scaled by P_SCALE (the caller divides the output by it). V_KEYS_MAJOR: each block's V is
        [kv_heads, head_dim, BLOCK_SIZE] (`kv_quant.values_keys_major`; stride_vs unused); with
        SCALAR_BLOCK its tile is read whole, unmasked in keys (slots past n_end hold finite values and
        get p = 0), so the loads run in 16-byte vectors and the dot's operand needs no byte shuffles.
        D_MASKED: the head dim is padded (HEAD_DIM < HEAD_DIM_PAD)."""
        k_pos = n_start + tl.arange(0, BLOCK_N)
        if MASKED:
            k_valid = k_pos < n_end
        else:
            k_valid = k_pos >= 0
        if SCALAR_BLOCK:  # a scalar base (block * stride passes 2^31 elements on big caches: int64)
            block_idx = tl.load(block_tables + seq * stride_bt + n_start // BLOCK_SIZE).to(tl.int64)
            # consecutive slots of that block, from a multiple of BLOCK_N (said: the compiler's analysis
            # stops at the remainder, and V read keys-major vectorizes only with it)
            slot = tl.multiple_of(n_start % BLOCK_SIZE, BLOCK_N) + tl.arange(0, BLOCK_N)
            k_ptrs = K_cache + block_idx * stride_kb + kv_head * stride_kh + slot[None, :] * stride_ks + d[:, None]
        else:  # a block index per key
            if MASKED:
                block_idx = tl.load(block_tables + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_valid, other=0)
            else:
                block_idx = tl.load(block_tables + seq * stride_bt + k_pos // BLOCK_SIZE)
            block_idx = block_idx.to(tl.int64)  # block * stride passes 2^31 elements on big caches
            slot = k_pos % BLOCK_SIZE
            k_ptrs = (K_cache + block_idx[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh
                      + d[:, None])
        # an fp8 cache's values cast up exactly (e4m3 fits in 16 bits: fp16 for a bf16 query, see the
        # kernel); its scales are applied by the caller
        k = tl.load(k_ptrs, mask=k_valid[None, :] & d_valid[:, None], other=0.0).to(q.dtype)  # [D, BLOCK_N]
        if FP8_DOTS:
            s = tl.dot(q, k) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        else:
            s = tl.dot(q, k, input_precision=PRECISION) * sm_scale_log2
        if MASKED:
            s = tl.where((k_pos[None, :] <= pos[:, None]) & k_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # rows with nothing allowed yet keep m = -inf: subtract 0 instead (no NaN from inf - inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every score is finite (padding rows have q = 0)
            m_safe = m_new
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_KEYS_MAJOR:  # V^T per block: [kv_heads, head_dim, BLOCK_SIZE], keys contiguous
            v_offs = slot[:, None] + d[None, :] * BLOCK_SIZE
        else:
            v_offs = slot[:, None] * stride_vs + d[None, :]
        if SCALAR_BLOCK:
            v_ptrs = V_cache + block_idx * stride_vb + kv_head * stride_vh + v_offs
        else:
            v_ptrs = V_cache + block_idx[:, None] * stride_vb + kv_head * stride_vh + v_offs
        if V_KEYS_MAJOR and SCALAR_BLOCK:
            # whole-tile loads, no key mask (it would split the keys' runs): keys past n_end lie in the
            # same block, hold finite values (the cache starts zeroed, stores clamp) and get p = 0
            if D_MASKED:
                v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0).to(q.dtype)
            else:
                v = tl.load(v_ptrs).to(q.dtype)
        else:
            v = tl.load(v_ptrs, mask=k_valid[:, None] & d_valid[None, :], other=0.0).to(q.dtype)  # [BLOCK_N, D]
        if FP8_DOTS:
            acc = acc * alpha[:, None] + tl.dot((p * P_SCALE).to(v.dtype), v)
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return m_new, l_i, acc

    @triton.jit
    def _attend_keys(
        q, pos, m_i, l_i, acc, kv_lo, n_unmasked, n_end, seq, kv_head, kv_heads, K_cache, V_cache, K_desc, V_desc,
        block_tables, d, d_valid,
        sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SCALAR_BLOCK: tl.constexpr,
        FP8_DOTS: tl.constexpr, V_KEYS_MAJOR: tl.constexpr, D_MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
        TMA: tl.constexpr,
    ):
        """Keys kv_lo .. n_end - 1 in tiles of BLOCK_N: unmasked tiles below n_unmasked, masked tiles
        from there. SCALAR_BLOCK: as `_attend_tile`'s (every tile starts at kv_lo + j * BLOCK_N). TMA
        (with SCALAR_BLOCK): the unmasked tiles, every key of them written, through `_attend_tile_tma`."""
        if TMA and SCALAR_BLOCK:
            for n_start in range(kv_lo, n_unmasked, BLOCK_N):
                m_i, l_i, acc = _attend_tile_tma(
                    q, m_i, l_i, acc, n_start, seq, kv_head, kv_heads, K_desc, V_desc, block_tables, sm_scale_log2,
                    stride_bt, BLOCK_SIZE, HEAD_DIM, PRECISION, FP8_DOTS, V_KEYS_MAJOR)
        else:
            for n_start in range(kv_lo, n_unmasked, BLOCK_N):
                m_i, l_i, acc = _attend_tile(
                    q, pos, m_i, l_i, acc, n_start, n_end, seq, kv_head, K_cache, V_cache, block_tables, d, d_valid,
                    sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                    BLOCK_SIZE, BLOCK_N, PRECISION, False, SCALAR_BLOCK, FP8_DOTS, V_KEYS_MAJOR, D_MASKED)
        for n_start in range(n_unmasked, n_end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, pos, m_i, l_i, acc, n_start, n_end, seq, kv_head, K_cache, V_cache, block_tables, d, d_valid,
                sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                BLOCK_SIZE, BLOCK_N, PRECISION, True, SCALAR_BLOCK, FP8_DOTS, V_KEYS_MAJOR, D_MASKED)
        return m_i, l_i, acc

    # Triton compiles a variant per divisibility of integer arguments: the offset and the block
    # table width change every step, so they are not specialized (one variant serves all steps)
    @triton.jit(do_not_specialize=["item_offset", "stride_bt"])
    def _paged_attention_kernel(
        Q, K_cache, V_cache, K_desc, V_desc, KV_scale, Out, Part_out, Part_lse,
        block_tables, item_seq, item_q_off, item_q_len, item_kv_lo, item_kv_hi, item_part, q_tokens, q_pos,
        item_count, sm_scale_log2,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh,
        stride_pp, stride_ph, stride_lp,
        stride_bt,
        item_offset,
        BLOCK_SIZE: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
        FP8_KV: tl.constexpr,
        FP8_DOTS: tl.constexpr,
        TILE_IN_BLOCK: tl.constexpr,
        V_KEYS_MAJOR: tl.constexpr,
        TMA: tl.constexpr,
    ):
        # the grid may hold more programs than the launch has items (a CUDA graph's grid is fixed at
        # capture): programs past the count read on the device do nothing
        if tl.program_id(0) >= tl.load(item_count):
            return
        item = tl.program_id(0) + item_offset
        kv_head = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)  # the grid's second axis: one program per KV head
        seq = tl.load(item_seq + item)
        q_off = tl.load(item_q_off + item)
        q_len = tl.load(item_q_len + item)
        kv_lo = tl.load(item_kv_lo + item)
        kv_hi = tl.load(item_kv_hi + item)
        part = tl.load(item_part + item)

        # rows: (query, head of the group) pairs; the group is padded to a power of two and the
        # rows to at least 16 (BLOCK_M >= BLOCK_Q * GROUP_PAD), padding rows are masked out
        rows = tl.arange(0, BLOCK_M)
        qi = rows // GROUP_PAD  # query index within the item
        head_in_group = rows % GROUP_PAD
        head = kv_head * GROUP + head_in_group
        row_valid = (qi < q_len) & (head_in_group < GROUP) & (rows < BLOCK_Q * GROUP_PAD)
        tok = tl.load(q_tokens + q_off + qi, mask=row_valid, other=0)
        pos = tl.load(q_pos + q_off + qi, mask=row_valid, other=-1)
        d = tl.arange(0, HEAD_DIM_PAD)
        d_valid = d < HEAD_DIM

        q_ptrs = Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        if FP8_KV:  # scores are q . (k_scale * k): fold k_scale into the softmax scale (read on the device)
            sm_scale_log2 = sm_scale_log2 * tl.load(KV_scale)
            if FP8_DOTS:  # q to e4m3 per row (token and head), its scale folded into the score scale
                q_f = q.to(tl.float32)
                q_amax = tl.max(tl.abs(q_f), 1)
                q_scale = tl.where(q_amax > 0.0, tl.math.div_rn(q_amax, P_SCALE), 1.0)  # IEEE: torch's division
                q_8 = q_f * tl.math.div_rn(1.0, q_scale)[:, None]  # by the reciprocal, as `fp8.quantize_rows`
                q = tl.minimum(tl.maximum(q_8, -P_SCALE), P_SCALE).to(K_cache.dtype.element_ty)
                sm_scale_log2 = (q_scale * sm_scale_log2)[:, None]
            elif Q.dtype.element_ty == tl.bfloat16:
                # e4m3 casts to fp16 exactly, a pair per instruction on Hopper (to bf16 it takes several:
                # that conversion, not the bytes, bounded the fp8 cache's decode): so with a bf16 query
                # both dots take fp16 operands, q (exact in fp16 below 65504: clamped) and p (in [0, 1])
                q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

        # keys past the item's last query are masked for every row: stop there. Keys up to the first
        # query are visible to every row: whole tiles of them need no mask (the causal diagonal and
        # the range's end are masked in the second loop only)
        n_end = tl.minimum(kv_hi, tl.max(pos, 0) + 1)
        first_pos = tl.min(tl.where(row_valid, pos, n_end), 0)
        n_unmasked = kv_lo + tl.maximum(tl.minimum(first_pos + 1, n_end) - kv_lo, 0) // BLOCK_N * BLOCK_N
        # TILE_IN_BLOCK (a block holds whole tiles): an item whose keys start at a multiple of BLOCK_N
        # has every tile inside one block (one block index per tile); others (suffix items after a
        # prefix of any length, split-K pieces) gather an index per key. Off, only the gather is compiled
        if TILE_IN_BLOCK:
            if kv_lo % BLOCK_N == 0:
                kv_lo = tl.multiple_of(kv_lo, BLOCK_N)
                m_i, l_i, acc = _attend_keys(
                    q, pos, m_i, l_i, acc, kv_lo, n_unmasked, n_end, seq, kv_head, num_kv_heads, K_cache, V_cache,
                    K_desc, V_desc, block_tables, d, d_valid, sm_scale_log2, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_bt, BLOCK_SIZE, BLOCK_N, PRECISION, True, FP8_DOTS,
                    V_KEYS_MAJOR, HEAD_DIM != HEAD_DIM_PAD, HEAD_DIM, TMA)
            else:
                m_i, l_i, acc = _attend_keys(
                    q, pos, m_i, l_i, acc, kv_lo, n_unmasked, n_end, seq, kv_head, num_kv_heads, K_cache, V_cache,
                    K_desc, V_desc, block_tables, d, d_valid, sm_scale_log2, stride_kb, stride_ks, stride_kh,
                    stride_vb, stride_vs, stride_vh, stride_bt, BLOCK_SIZE, BLOCK_N, PRECISION, False, FP8_DOTS,
                    V_KEYS_MAJOR, HEAD_DIM != HEAD_DIM_PAD, HEAD_DIM, TMA)
        else:
            m_i, l_i, acc = _attend_keys(
                q, pos, m_i, l_i, acc, kv_lo, n_unmasked, n_end, seq, kv_head, num_kv_heads, K_cache, V_cache,
                K_desc, V_desc, block_tables, d, d_valid, sm_scale_log2, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_bt, BLOCK_SIZE, BLOCK_N, PRECISION, False, FP8_DOTS,
                V_KEYS_MAJOR, HEAD_DIM != HEAD_DIM_PAD, HEAD_DIM, TMA)

        if FP8_DOTS:  # p went into its dot scaled by P_SCALE
            l_i_out = l_i * P_SCALE
        else:
            l_i_out = l_i
        out = acc / tl.where(l_i == 0.0, 1.0, l_i_out)[:, None]
        if FP8_KV:  # the output is linear in V: v_scale once, here (partials too, so the merge is unchanged)
            out = out * tl.load(KV_scale + 1)
        mask = row_valid[:, None] & d_valid[None, :]
        if part < 0:
            o_ptrs = Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask)
        else:  # a partial: its output and its log2-sum-exp (-inf where no key was visible)
            prow = part + qi
            tl.store(Part_out + prow[:, None] * stride_pp + head[:, None] * stride_ph + d[None, :], out, mask=mask)
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(Part_lse + prow * stride_lp + head, lse, mask=row_valid)

    @triton.jit
    def _merge_partials_kernel(
        Out, Part_out, Part_lse, merge_tokens, merge_ptr, merge_parts, merge_count,
        stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
        NUM_HEADS: tl.constexpr,
        HEADS_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
    ):
        """One token, all heads: out = sum_p 2^(lse_p - M) o_p / sum_p 2^(lse_p - M), in fp32.
        Programs at or past the merge count (read on the device) do nothing."""
        i = tl.program_id(0)
        if i >= tl.load(merge_count):
            return
        tok = tl.load(merge_tokens + i)
        first = tl.load(merge_ptr + i)
        last = tl.load(merge_ptr + i + 1)
        h = tl.arange(0, HEADS_PAD)
        d = tl.arange(0, HEAD_DIM_PAD)
        h_valid = h < NUM_HEADS
        mask = h_valid[:, None] & (d < HEAD_DIM)[None, :]
        m = tl.full([HEADS_PAD], float("-inf"), dtype=tl.float32)
        w_sum = tl.zeros([HEADS_PAD], dtype=tl.float32)
        acc = tl.zeros([HEADS_PAD, HEAD_DIM_PAD], dtype=tl.float32)
        for j in range(first, last):
            p = tl.load(merge_parts + j)
            lse = tl.load(Part_lse + p * stride_lp + h, mask=h_valid, other=float("-inf"))
            o = tl.load(Part_out + p * stride_pp + h[:, None] * stride_ph + d[None, :], mask=mask, other=0.0)
            m_new = tl.maximum(m, lse)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_safe)
            w = tl.exp2(lse - m_safe)
            w_sum = w_sum * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * o
            m = m_new
        out = acc / tl.where(w_sum == 0.0, 1.0, w_sum)[:, None]
        tl.store(Out + tok * stride_ot + h[:, None] * stride_oh + d[None, :], out.to(Out.dtype.element_ty), mask=mask)


def merge_partials(plan: LaunchPlan, out: torch.Tensor) -> None:
    """Write each split token's output [tokens, heads, head dim] from the plan's partials (`_merge_partials_kernel`)."""
    t, part_out, part_lse = plan.tensors, plan.part_out, plan.part_lse
    num_heads, head_dim = out.shape[1], out.shape[2]
    _merge_partials_kernel[(plan.merge_grid,)](
        out, part_out, part_lse, t["merge_tokens"], t["merge_ptr"], t["merge_parts"], plan.merge_count,
        out.stride(0), out.stride(1), part_out.stride(0), part_out.stride(1), part_lse.stride(0),
        NUM_HEADS=num_heads, HEADS_PAD=next_power_of_2(num_heads), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_power_of_2(head_dim), num_warps=4,
    )


@dataclass(frozen=True)
class TileConfig:
    """How a launch's programs walk their keys: BLOCK_N keys per tile, warps, pipeline stages."""

    block_n: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Launch:
    """One launch of the item kernel: programs 0 .. grid - 1 (per KV head) take items item_offset +
    program; each takes up to `block_q` queries; programs at or past `count` (on the device) return."""

    item_offset: int
    grid: int
    block_q: int
    tile: TileConfig
    count: torch.Tensor  # [1] int32, 16-byte aligned
    staged: bool = False  # reads the plan's staged copy of its blocks (`LaunchPlan.staged_blocks`)


@dataclass
class LaunchPlan:
    """A step's launches and what they read and write: the device item arrays (`tensors`, by
    `PLAN_FIELDS` name), the partial buffers, and the merge (`merge_grid` programs, 0: none, at or
    past `merge_count` return). `items` is the host plan (None in a static decode plan)."""

    items: WorkItems | None
    tensors: dict[str, torch.Tensor]
    launches: list[Launch]
    merge_grid: int
    merge_count: torch.Tensor  # [1] int32, 16-byte aligned
    part_out: torch.Tensor  # [num_partials, num_heads, head_dim] float32
    part_lse: torch.Tensor  # [num_partials, num_heads] float32
    staged_blocks: torch.Tensor | None = None  # [n] int64: cache blocks a `staged` launch reads, in their copy's order
    staged_tables: torch.Tensor | None = None  # [num_seqs, width] int32: block tables into that copy


PREFILL_LAUNCH = (256, 64, 8, 3)  # rows, keys per tile, warps, stages: the prefill programs' default
TMA_PREFILL_LAUNCH = (128, 64, 4, 3)
"""The prefill programs where their tiles load by TMA: the registers the address arithmetic no longer
takes let 4 warps carry 128 rows; on an H200, 1.20x / 1.15x / 1.33x PREFILL_LAUNCH's time without TMA
on 8,192 new tokens / 8,192 after 8,192 / 40 x 200 after 2,000 (`attention_variants.py`, session 14)."""
SMALL_PREFILL_LAUNCH = (64, 64, 4, 2)  # rows, keys per tile, warps, stages: rows of 512 bytes (fp32 of head dim 128)
HEAD_256_PREFILL_LAUNCH = (64, 32, 4, 2)
"""The prefill launch of head dim 256 in 16 bits: SMALL_PREFILL_LAUNCH asked 288 KiB of shared memory (an H200 has
227), and so did the decode tile; of five smaller launches that fit, the fastest on an H200 (a 99-prompt batch with
a shared 1,200-token prefix, with HEAD_256_DECODE_TILE: 0.105 s against 0.124-0.211; session 35)."""
HEAD_256_FP32_PREFILL_LAUNCH = (32, 32, 4, 1)  # float32 rows of head dim 256 (1 KiB): the smallest tried
HEAD_256_DECODE_TILE = TileConfig(32, 4, 2)
HEAD_256_FP32_DECODE_TILE = TileConfig(32, 4, 1)
DECODE_TILE = TileConfig(64, 4, 2)  # of the programs with one query per sequence (prefix and one-query items)
DECODE_TILE_TMA = TileConfig(64, 4, 3)
"""The decode tile where tiles load by TMA (a 16-bit cache of 64-token blocks on Hopper): one more tile
in flight. On an H200 1.06x DECODE_TILE's speed summed over the decode-heavy run's steps and 1.30x on a
decode step of the 16K workload (256 sequences in groups of 16 sharing 16,000 positions), with 4 stages no
faster and wider or narrower tiles slower (`attention_bench.py --decode-sweep-64`, session 16). Also the
tile over an fp8 cache of 64-token blocks (pointer loads, V keys-major): 1.03x DECODE_TILE there, tied with
4 stages (0.1% apart), the other nine tiles swept slower (`--decode-sweep-fp8-64`, session 24)."""
DECODE_TILE_FP8 = TileConfig(128, 4, 3)
"""The decode tile over an fp8 cache (half the bytes per key: twice the keys per tile): on the decode-heavy
run's steps, 16-token blocks, 1.792 ms against DECODE_TILE's 1.950 (`attention_bench.py --decode-sweep-fp8`,
H200, session 11). Also taken over blocks of a multiple of 128 tokens, where it lies whole in a block: the
best of six tiles swept there (1.738 ms, tied with 4 stages; 64x4x3 1.841, `--decode-sweep-fp8-128`, session 25),
though no faster than DECODE_TILE_TMA over the default 64-token blocks (1.746 ms, session 24; end to end, FP8
weights + cache on decode-heavy, 33.27 / 33.30 req/s against 33.14 / 33.56, session 25), despite its sm_90
loop's 18% fewer instructions per key (475 per 128 keys against 290 per 64)."""
ITEM_FIELDS = ("seq", "q_off", "q_len", "kv_lo", "kv_hi", "part")
PLAN_FIELDS = (*ITEM_FIELDS, "q_tokens", "q_pos", "merge_tokens", "merge_ptr", "merge_parts")
COUNT_SLOT = 4
"""int32 entries per launch count on the device: each count starts 16-byte aligned (Triton compiles a
variant per pointer alignment)."""


def dot_head_dim(head_dim: int, fp8_dots: bool = False) -> int:
    """The head dim a tile is padded to: a power of two, at least 16 (tl.dot needs K >= 16: a head
    dim of 8, as small test models have, would not compile), at least 32 for e4m3 operands (K >= 32
    for 8-bit dots on NVIDIA GPUs)."""
    return max(32 if fp8_dots else 16, next_power_of_2(head_dim))


def fp8_dots_fit(block_m: int, block_n: int) -> bool:
    """Whether a launch with fp8_attention takes e4m3 operands (the kernel's FP8_DOTS): its rows
    fill Hopper's FP8 MMA (64; with fewer, Triton casts the operands to fp16 and the quantizing
    only adds work and rounding: one-query decode items then keep the fp16 dots) and its key tile
    is a valid K of the second dot (>= 32)."""
    return block_m >= 64 and block_n >= 32


def next_power_of_2(n: int) -> int:
    """As triton.next_power_of_2, also where Triton is not installed (the planning half runs on CPU)."""
    return 1 << max(n - 1, 0).bit_length()


def head_256(head_dim: int) -> bool:
    """Whether tiles are padded to head dim 256 or more: the launches then take the HEAD_256 tiles."""
    return dot_head_dim(head_dim) >= 256


def prefill_launch_for_rows(element_size: int, head_dim: int, launch: tuple) -> tuple:
    """The prefill launch (rows, keys per tile, warps, stages) for query rows of this width: `launch` where it fits,
    SMALL_PREFILL_LAUNCH for `wide_rows`, the HEAD_256 launches for head dim 256."""
    if head_256(head_dim):
        return HEAD_256_PREFILL_LAUNCH if element_size <= 2 else HEAD_256_FP32_PREFILL_LAUNCH
    return SMALL_PREFILL_LAUNCH if wide_rows(element_size, head_dim) else launch


def wide_rows(element_size: int, head_dim: int) -> bool:
    """Whether a query row (element_size x head dim padded to a power of two) passes 256 bytes, as
    float32 or head dim 256 do: then the large tiles of 64+ rows would pass an H200's shared memory
    (prefill launches take SMALL_PREFILL_LAUNCH, decode launches DECODE_TILE)."""
    return element_size * next_power_of_2(head_dim) > 256


def decode_tile_for(kv_dtype: torch.dtype, block_size: int, query_dtype: torch.dtype, head_dim: int,
                    tma: bool = False) -> TileConfig:
    """The engine's decode tile (`TritonBackend(decode_tile=)`): over an fp8 cache DECODE_TILE_FP8 where
    it lies whole in a block (blocks of a multiple of 128 tokens, see DECODE_TILE_FP8) or the
    default tile does not (smaller blocks: measured faster there); DECODE_TILE_TMA over blocks that hold
    whole 64-key tiles where the tiles load by TMA (`tma`: the backend's TMA tiles are on) or the cache
    is fp8 (both measured faster); else DECODE_TILE. Not DECODE_TILE_FP8 over 64-token blocks (a tile
    across two blocks would lose its one block index per tile and the plan's alignment), nor either
    larger tile for `wide_rows` (the 64-row prefix programs' shared memory)."""
    if head_256(head_dim):  # (DECODE_TILE's 64-row prefix programs passed the shared memory)
        return HEAD_256_DECODE_TILE if query_dtype.itemsize <= 2 else HEAD_256_FP32_DECODE_TILE
    fits = not wide_rows(query_dtype.itemsize, head_dim)
    if kv_dtype == FP8 and fits and (block_size % DECODE_TILE_FP8.block_n == 0
                                     or block_size % DECODE_TILE.block_n != 0):
        return DECODE_TILE_FP8
    if (tma or kv_dtype == FP8) and fits and block_size % DECODE_TILE_TMA.block_n == 0:
        return DECODE_TILE_TMA
    return DECODE_TILE


@functools.cache
def tma_available(device: torch.device) -> bool:
    """Whether tiles can load by TMA on `device`: Triton with tensor descriptors and a CUDA device of
    compute capability 9 or later (Hopper). Asked once per device."""
    return (TensorDescriptor is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def tma_by_default(kv_dtype: torch.dtype, device: torch.device, head_dim: int) -> bool:
    """Whether a cache of `kv_dtype` on `device` loads its tiles by TMA when `TritonBackend(tma=None)`
    leaves it open: 16-bit values, a head dim the dot takes unpadded, `tma_available` (the engine's
    default block size follows the same rule: `model_runner.default_block_size`). Not an fp8 cache:
    its tiles by TMA measured 0.91-0.95x on long prefill chunks, 1.05-1.07x on suffixes and 1.01x on
    decode steps on an H200 (docs/benchmarks.md, session 15; `tma=True` takes them)."""
    return kv_dtype.itemsize == 2 and dot_head_dim(head_dim) == head_dim and tma_available(device)


def tma_fits(kv_cache: torch.Tensor, head_dim: int) -> bool:
    """Whether `tma_descriptors` can describe this cache ([2, blocks, block_size, kv_heads, head_dim]):
    Triton with tensor descriptors, a contiguous cache (16-bit or fp8 values; an fp8 cache's V may be
    keys-major), and a head dim the dot takes unpadded (TMA boxes hold no padding)."""
    return TensorDescriptor is not None and kv_cache.is_contiguous() and dot_head_dim(head_dim) == head_dim


def tma_descriptors(kv_cache: torch.Tensor, block_n: int) -> tuple:
    """Tensor descriptors of a layer's K and V (`tma_fits`). K as rows of keys, [blocks * block_size,
    kv_heads * head_dim], a box of `block_n` keys by one KV head: the kernel's tile of `block_n` keys
    inside one block is the box at (block * block_size + slot, kv_head * head_dim). V the same, or where
    it is keys-major (`kv_quant.values_keys_major`) as rows of one head dim's keys, [blocks * kv_heads *
    head_dim, block_size], a box of all head dims by `block_n` keys, at ((block * kv_heads + kv_head) *
    head_dim, slot)."""
    _, blocks, block_size, kv_heads, head_dim = kv_cache.shape
    keys = kv_cache[0].view(blocks * block_size, kv_heads * head_dim)
    k_desc = TensorDescriptor(keys, list(keys.shape), [kv_heads * head_dim, 1], [block_n, head_dim])
    if values_keys_major(kv_cache):
        values = kv_cache[1].view(blocks * kv_heads * head_dim, block_size)
        return k_desc, TensorDescriptor(values, list(values.shape), [block_size, 1], [head_dim, block_n])
    values = kv_cache[1].view(blocks * block_size, kv_heads * head_dim)
    return k_desc, TensorDescriptor(values, list(values.shape), [kv_heads * head_dim, 1], [block_n, head_dim])


STAGE_MAX_BYTES = 256 * 2**20
"""Most bytes of a layer's staged copy (K and V in fp16): 65,536 keys for 8 KV heads of head dim 128;
a step whose prefill items reach more reads the fp8 cache itself."""


def staging_plan(seqs: np.ndarray, kv_hi: np.ndarray, tables: list[list[int]], block_size: int, width: int,
                 max_keys: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For items of sequences `seqs` reading keys below `kv_hi`: (the distinct cache blocks they read, in
    first-use order; block tables [len(tables), width] int32 giving each of those sequences' blocks by
    their index in that order, 0 elsewhere). A block shared by several sequences (a prefix group's)
    appears once. None where more than `max_keys` keys' blocks would be staged."""
    reach: dict[int, int] = {}  # sequence -> blocks its items reach
    for seq, hi in zip(seqs.tolist(), kv_hi.tolist()):
        reach[seq] = max(reach.get(seq, 0), -(-hi // block_size))
    index: dict[int, int] = {}
    staged = np.zeros((len(tables), width), dtype=np.int32)
    for seq, num_blocks in reach.items():
        staged[seq, :num_blocks] = [index.setdefault(block, len(index)) for block in tables[seq][:num_blocks]]
        if len(index) * block_size > max_keys:
            return None
    return np.fromiter(index, dtype=np.int64, count=len(index)), staged


def stage_blocks(kv_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks `blocks` of an fp8 layer cache [2, num_blocks, block_size, kv_heads, head_dim] as a 16-bit
    cache of their own, [2, len(blocks), block_size, kv_heads, head_dim] float16, V in K's layout (a
    keys-major V transposed back). The values are the cache's exactly (every e4m3 value is an fp16
    one), and the kernel casts an fp8 cache's to fp16 before its dots: a launch over the copy computes
    what it would over the cache, but loads its tiles as a 16-bit cache's (by TMA on Hopper) and casts
    each key once per step instead of once per query tile that reads it. One Triton launch, a program
    per (block, KV head): ~3.6 TB/s on an H200, 7.5x torch's index_select and copies (session 23)."""
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    staged = torch.empty((2, len(blocks), block_size, kv_heads, head_dim), dtype=torch.float16, device=kv_cache.device)
    keys, values = layer_caches(kv_cache)
    if len(blocks):
        _stage_blocks_kernel[(len(blocks), kv_heads)](
            keys, values, blocks, staged, *keys.stride()[:3], *values.stride(), *staged.stride()[:4], block_size,
            head_dim, KEYS_PAD=next_power_of_2(block_size), DIMS_PAD=next_power_of_2(head_dim),
            V_KEYS_MAJOR=values_keys_major(kv_cache), num_warps=4)
    return staged


if triton is not None:

    @triton.jit
    def _stage_blocks_kernel(K, V, Blocks, Out, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                             stride_vd, stride_o2, stride_ob, stride_os, stride_oh, block_size, head_dim,
                             KEYS_PAD: tl.constexpr, DIMS_PAD: tl.constexpr, V_KEYS_MAJOR: tl.constexpr):
        """Cache block Blocks[i], KV head h -> fp16 rows [keys, dims] of Out[0, i] (K) and Out[1, i] (V).
        K's head dim is contiguous; a keys-major V is read as its contiguous [dims, keys] tile and
        transposed in registers, so both sides of the copy are whole rows."""
        i = tl.program_id(0)
        h = tl.program_id(1)
        block = tl.load(Blocks + i).to(tl.int64)
        keys = tl.arange(0, KEYS_PAD)[:, None]
        dims = tl.arange(0, DIMS_PAD)[None, :]
        mask = (keys < block_size) & (dims < head_dim)
        out_at = Out + i.to(tl.int64) * stride_ob + keys * stride_os + h * stride_oh + dims
        k = tl.load(K + block * stride_kb + keys * stride_ks + h * stride_kh + dims, mask=mask)
        tl.store(out_at, k.to(tl.float16), mask=mask)
        v_at = V + block * stride_vb + h * stride_vh
        if V_KEYS_MAJOR:  # [dims, keys] as stored, then [keys, dims]
            dims_t, keys_t = tl.arange(0, DIMS_PAD)[:, None], tl.arange(0, KEYS_PAD)[None, :]
            mask_t = (dims_t < head_dim) & (keys_t < block_size)
            v = tl.trans(tl.load(v_at + dims_t * stride_vd + keys_t * stride_vs, mask=mask_t))
        else:
            v = tl.load(v_at + keys * stride_vs + dims * stride_vd, mask=mask)
        tl.store(out_at + stride_o2, v.to(tl.float16), mask=mask)


def queries_per_program(rows: int, group_pad: int) -> int:
    """Queries a program of `rows` rows takes: each query fills one row per head of its GQA group
    (padded to a power of two)."""
    return max(1, rows // group_pad)


def key_alignment(block_size: int, block_n: int = DECODE_TILE.block_n) -> int:
    """Where the plan starts every item's keys (`plan_work_items`' align): on a tile boundary of the
    one-query and prefix launches (their tiles of `block_n` keys: the backend's `decode_tile`) where
    those tiles lie whole in a cache block (the kernel's TILE_IN_BLOCK), so prefix, suffix and split-K
    items read one block index per tile; 1 where they do not (the default 16-token blocks: the plan
    is unchanged). The eager and the static decode plans use the same alignment, so a graph replays
    the eager step's arithmetic."""
    return block_n if block_size % block_n == 0 else 1


ORDER_KEYS = 512
"""`longest_keys_first` compares key ranges in units of this many keys."""


def longest_keys_first(items: WorkItems, indices: np.ndarray) -> np.ndarray:
    """`indices` (items of one launch) reordered by key range in units of ORDER_KEYS, longest first,
    ties in plan order. A GPU starts a launch's programs in grid order as SMs free up, so the longest
    programs run first and short ones fill the end, instead of a causal prefill chunk's longest
    tiles (its last queries) starting in the last wave and running on alone (list scheduling, longest
    processing time first). Ranges within a unit keep plan order, where one sequence's tiles sit side
    by side and read its keys from L2 one after another (sorting 40 x 200 queries after 16,000 keys
    tile by tile cost 2.5%: docs/benchmarks.md, session 13)."""
    units = (items.kv_hi[indices] - items.kv_lo[indices]) // ORDER_KEYS
    return indices[np.argsort(-units, kind="stable")]


def launch_counts(counts: torch.Tensor) -> list[torch.Tensor]:
    """The count of each launch (and last, the merge's) in a device array of COUNT_SLOT slots."""
    return [counts[i:i + 1] for i in range(0, len(counts), COUNT_SLOT)]


def plan_key(group_pad: int) -> tuple:
    """Where a step's plan lives in `AttentionMetadata.backend_cache`."""
    return ("triton_items", group_pad)


def launch_plan(items: WorkItems, order: np.ndarray | None, shapes: list[tuple], staging: tuple | None,
                num_heads: int, head_dim: int, device: torch.device) -> LaunchPlan:
    """The plan of a step's items on the device: their arrays (in launch `order`, None: as planned) and
    launch counts in one copy, a Launch per (count, rows per program, tile, staged) of `shapes` over
    consecutive items, the partial buffers, and the staged copy's blocks and tables (`staging_plan`)."""
    arrays = [getattr(items, name)[order] if order is not None and name in ITEM_FIELDS else getattr(items, name)
              for name in PLAN_FIELDS]
    num_merged = len(items.merge_tokens)
    counts = np.zeros(COUNT_SLOT * (len(shapes) + 1), dtype=np.int32)
    counts[::COUNT_SLOT] = [n for n, *_ in shapes] + [num_merged]
    *arrays, counts = to_device_packed([*arrays, counts], device, np.int32)
    *counts, merge_count = launch_counts(counts)
    offsets = np.cumsum([0] + [n for n, *_ in shapes])
    num_partials = max(items.num_partials, 1)
    return LaunchPlan(
        items=items, tensors=dict(zip(PLAN_FIELDS, arrays)),
        launches=[Launch(int(offset), n, block_q, tile, count, staged)
                  for offset, (n, block_q, tile, staged), count in zip(offsets, shapes, counts)],
        merge_grid=num_merged, merge_count=merge_count,
        part_out=torch.empty(num_partials, num_heads, head_dim, dtype=torch.float32, device=device),
        part_lse=torch.empty(num_partials, num_heads, dtype=torch.float32, device=device),
        staged_blocks=None if staging is None else to_device(staging[0], device),
        staged_tables=None if staging is None else to_device(staging[1], device),
    )


class TritonBackend:
    """Paged attention in one Triton kernel per layer (plus the KV store, plus one small merge kernel
    in steps where some token's keys are split over several work items: prefix groups, split-K)."""

    name = "triton"
    supports_decode_graphs = True
    """Decode steps can run as CUDA graphs over a `StaticDecodePlan`."""

    def __init__(self, use_prefix_groups: bool = True, prefill_launch: tuple[int, int, int, int] | None = None,
                 fused_store: bool = True, decode_tile: TileConfig = DECODE_TILE, fp8_attention: bool = False,
                 longest_first: bool = True, tma: bool | None = None, stage_fp8_prefill: bool | None = None,
                 **plan_options) -> None:
        """use_prefix_groups=False: plain paged attention for everyone (for comparisons).
        prefill_launch: (rows per program, keys per tile, warps, pipeline stages) of the programs
        that run prefill chunks; None: PREFILL_LAUNCH, which won an H200 sweep (`attention_bench.py
        --prefill-sweep`: 14-22% faster than 64 rows, 2 stages, on long chunks), or TMA_PREFILL_LAUNCH
        where its tiles load by TMA. tma: unmasked tiles that lie whole in a cache block load K and V
        through tensor descriptors (`tma_fits`: 16-bit and fp8 caches; with 64-token blocks, every tile
        of an item that starts on a tile boundary); None: `tma_by_default` (a CUDA device that has TMA,
        compute capability 9+: Hopper, and a cache of 16-bit values); True: wherever `tma_fits` (the
        interpreter too); False: never. fused_store: on
        CUDA, the new K/V go to the cache in one Triton kernel (`kv_store_triton.py`, the same bytes
        as `store_kv`: `tests/gpu/test_kv_store_triton.py`; its speed: `benchmarks/kv_store_bench.py`);
        False (the engine's `kv_store="torch"`), or a cache elsewhere (the CPU interpreter), takes
        `store_kv`'s torch ops. decode_tile: the tiles of the prefix and one-query launches (the
        engine passes `decode_tile_for` its cache; sweeps: `attention_bench.py --decode-sweep`).
        fp8_attention: over an fp8 cache, both dots take e4m3 operands (the kernel's FP8_DOTS; the
        arithmetic of `torch_ref.fp8_attention`). longest_first: each launch runs its items longest key
        range first (`longest_keys_first`; False: in plan order, for comparison; the outputs are the same
        bits either way). stage_fp8_prefill: over an fp8 cache, the prefill launch reads a 16-bit copy
        of the blocks its items need, made once per layer (`stage_blocks`, up to `STAGE_MAX_BYTES`), with
        the prefill tiles of a 16-bit cache (by TMA where `tma` allows); None: for 16-bit queries where the
        copy's tiles load by TMA (Hopper, blocks of a whole number of TMA_PREFILL_LAUNCH tiles: what was
        measured); True: also elsewhere (pointer loads, the interpreter); False: never; never with
        fp8_attention (its dots take the cache's e4m3 values). The numbers are the direct launch's on the
        same tiles. plan_options go to `plan_work_items`
        (split_len, split_per_launch, min_members, min_shared)."""
        self.use_prefix_groups = use_prefix_groups
        self.fused_store = fused_store
        self.prefill_launch = prefill_launch
        self.decode_tile = decode_tile
        self.fp8_attention = fp8_attention
        self.longest_first = longest_first
        self.tma = tma
        self.stage_fp8_prefill = stage_fp8_prefill
        self.plan_options = plan_options
        self._unit_scales: dict[torch.device, torch.Tensor] = {}

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,  # [2] float32: k_scale, v_scale of an fp8 cache; None: 1.0
    ) -> torch.Tensor:
        """An fp8 cache (`kv_quant.py`) is read by the same kernel, compiled with FP8_KV: values cast
        up to the query's dtype, k_scale folded into the softmax scale, v_scale applied to the
        output; both scales are read on the device (fixed addresses: CUDA graphs replay them)."""
        fp8 = is_fp8(kv_cache)
        if fp8 and kv_scale is None:
            kv_scale = self._unit_scale(query.device)  # x / 1.0 is x: stores what None would
        store = store_kv_triton if self.fused_store and kv_cache.is_cuda else store_kv
        store(key, value, kv_cache, metadata.slot_mapping, kv_scale)
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = key.shape[1]
        group = num_heads // num_kv_heads
        group_pad = next_power_of_2(group)
        plan, caches = self._plan_and_caches(query, kv_cache, metadata, group_pad, num_kv_heads)
        out = torch.empty_like(query)
        part_out, part_lse = plan.part_out, plan.part_lse
        t = plan.tensors
        kv_scale_arg = kv_scale if fp8 else part_lse  # read only with FP8_KV: any float32 tensor stands in
        descriptors = {}  # (staged, keys per tile): K and V descriptors (tiles inside a block only)
        for launch in plan.launches:
            cache, block_tables = caches[launch.staged]
            k_cache, v_cache = layer_caches(cache)  # [blocks, block_size, kvh, d] views (V keys-major: its strides)
            block_m = max(16, launch.block_q * group_pad)
            fp8_dots = fp8 and self.fp8_attention and fp8_dots_fit(block_m, launch.tile.block_n)  # (never staged)
            block_n = launch.tile.block_n
            tile_in_block = metadata.block_size % block_n == 0
            described = (launch.staged, block_n)
            if tile_in_block and described not in descriptors and self.uses_tma(cache, head_dim):
                descriptors[described] = tma_descriptors(cache, block_n)
            k_desc, v_desc = descriptors.get(described, (k_cache, v_cache))  # (without TMA: unused)
            _paged_attention_kernel[(launch.grid, num_kv_heads)](
                query, k_cache, v_cache, k_desc, v_desc, kv_scale_arg, out, part_out, part_lse,
                block_tables, t["seq"], t["q_off"], t["q_len"], t["kv_lo"], t["kv_hi"], t["part"],
                t["q_tokens"], t["q_pos"], launch.count,
                scale * math.log2(math.e),
                query.stride(0), query.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                out.stride(0), out.stride(1),
                part_out.stride(0), part_out.stride(1), part_lse.stride(0),
                block_tables.stride(0), launch.item_offset,
                BLOCK_SIZE=metadata.block_size, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
                HEAD_DIM_PAD=dot_head_dim(head_dim, fp8_dots), BLOCK_Q=launch.block_q,
                BLOCK_M=block_m, BLOCK_N=launch.tile.block_n,
                PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 stays fp32; 16-bit ignores it
                FP8_KV=fp8, FP8_DOTS=fp8_dots,  # (staged: its fp16 values, the scales as the cache's)
                TILE_IN_BLOCK=tile_in_block, V_KEYS_MAJOR=values_keys_major(cache), TMA=described in descriptors,
                num_warps=launch.tile.num_warps, num_stages=launch.tile.num_stages,
            )
        if plan.merge_grid:
            merge_partials(plan, out)
        return out

    def _plan_and_caches(self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata,
                         group_pad: int, num_kv_heads: int) -> tuple[LaunchPlan, dict]:
        """The step's plan (`_plan`, made by the first layer: its prefill launches are chosen only then)
        and, by `Launch.staged`, the (cache, block tables) each launch reads: a staged launch's copy
        (`stage_blocks`) is made here, once per layer."""
        num_heads, head_dim = query.shape[1], query.shape[2]
        plan = metadata.backend_cache.get(plan_key(group_pad))
        if plan is None:
            stage = self.stages_prefill(kv_cache, head_dim, query.dtype)
            direct = self.prefill_launch_for(self._prefill_tiles_by_tma(kv_cache, head_dim, False))
            staged = self.prefill_launch_for(self._prefill_tiles_by_tma(kv_cache, head_dim, True)) if stage else None
            plan = self._plan(metadata, group_pad, num_heads, head_dim, num_kv_heads, query.element_size(), direct,
                              staged)
        caches = {False: (kv_cache, metadata.block_tables)}
        if plan.staged_blocks is not None:
            caches[True] = (stage_blocks(kv_cache, plan.staged_blocks), plan.staged_tables)
        return plan, caches

    def warmup(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               device: torch.device, kv_dtype: torch.dtype | None = None) -> None:
        """Compile every kernel variant a run can meet (decode with and without prefix groups, mixed
        steps, the merge) before the first step, so no step stalls on the Triton compiler.
        kv_dtype: the cache's element type (None: dtype; fp8 compiles the FP8_KV variants)."""
        shared, members = MIN_SHARED_TOKENS, MIN_GROUP_MEMBERS
        blocks = -(-(shared + 2) // block_size)
        shape = (2, blocks * (members + 1), block_size, num_kv_heads, head_dim)
        kv_dtype = kv_dtype or dtype
        fp8 = kv_dtype == FP8  # zeros through a uint8 view: fill kernels need not exist for float8
        cache = torch.zeros(shape, dtype=torch.uint8 if fp8 else kv_dtype, device=device).view(kv_dtype)
        table = list(range(blocks))
        decode = [(shared + 1, 1)] * members  # (cached, new) per sequence
        for specs, grouped in ((decode, True), (decode, False), ([(0, 20), (shared, 1)], False)):
            loc = [0, *itertools.accumulate(new for _, new in specs)]
            n, lens = loc[-1], [c + new for c, new in specs]
            md = AttentionMetadata(
                num_tokens=n, block_size=block_size,
                slot_mapping=torch.arange(n, dtype=torch.long, device=device),
                query_start_loc=torch.tensor(loc, dtype=torch.int32, device=device),
                seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                block_tables=torch.tensor([table] * len(specs), dtype=torch.int32, device=device),
                max_query_len=max(new for _, new in specs), max_seq_len=max(lens),
                query_start_loc_cpu=loc, seq_lens_cpu=lens, block_tables_cpu=[table] * len(specs),
                share_levels_cpu=[([0] * len(specs), [shared] * len(specs))] if grouped else None,
            )
            q = torch.zeros(n, num_heads, head_dim, dtype=dtype, device=device)
            kv = torch.zeros(n, num_kv_heads, head_dim, dtype=dtype, device=device)
            self.forward(q, kv, kv, cache, md, head_dim ** -0.5)
        if device.type == "cuda":  # (the interpreter runs on the CPU)
            torch.cuda.synchronize(device)

    def uses_tma(self, kv_cache: torch.Tensor, head_dim: int) -> bool:
        """Whether this backend's tiles inside a cache block load by TMA from `kv_cache` (see `tma`)."""
        return self._loads_by_tma(kv_cache.dtype, kv_cache.device, head_dim, tma_fits(kv_cache, head_dim))

    def _loads_by_tma(self, kv_dtype: torch.dtype, device: torch.device, head_dim: int, fits: bool) -> bool:
        """`uses_tma`'s rule for a cache of `kv_dtype` on `device` that `tma_fits` (`fits`)."""
        if self.tma is False or not fits:
            return False
        return bool(self.tma) or tma_by_default(kv_dtype, device, head_dim)

    def stages_prefill(self, kv_cache: torch.Tensor, head_dim: int, query_dtype: torch.dtype) -> bool:
        """Whether the prefill launch reads a staged 16-bit copy of `kv_cache`'s blocks (see
        `stage_fp8_prefill`; by default for 16-bit queries whose copy loads by TMA, what was measured)."""
        if self.stage_fp8_prefill is False or not is_fp8(kv_cache) or self.fp8_attention:
            return False
        return bool(self.stage_fp8_prefill) or (
            query_dtype.itemsize == 2 and self._prefill_tiles_by_tma(kv_cache, head_dim, True))

    def _prefill_tiles_by_tma(self, kv_cache: torch.Tensor, head_dim: int, staged: bool) -> bool:
        """Whether the prefill launch's tiles (TMA_PREFILL_LAUNCH's keys, inside one block) load by TMA:
        from the cache itself (`uses_tma`), or from its staged copy (staged), a contiguous fp16 cache of
        the same blocks (`tma_fits` but for contiguity, which the copy has)."""
        if kv_cache.shape[2] % TMA_PREFILL_LAUNCH[1]:
            return False
        if not staged:
            return self.uses_tma(kv_cache, head_dim)
        fits = TensorDescriptor is not None and dot_head_dim(head_dim) == head_dim
        return self._loads_by_tma(torch.float16, kv_cache.device, head_dim, fits)

    def prefill_launch_for(self, tma: bool) -> tuple[int, int, int, int]:
        """The prefill programs' launch: the one asked for, else the default for TMA tiles or not."""
        if self.prefill_launch is not None:
            return self.prefill_launch
        return TMA_PREFILL_LAUNCH if tma else PREFILL_LAUNCH

    def _unit_scale(self, device: torch.device) -> torch.Tensor:
        """k_scale = v_scale = 1.0 (16-byte aligned, as the model's per-layer scales), for calls
        with an fp8 cache and no scales; made once per device (a fixed address)."""
        scales = self._unit_scales
        if device not in scales:
            scales[device] = torch.ones(4, dtype=torch.float32, device=device)[:2]
        return scales[device]

    def _plan(self, metadata: AttentionMetadata, group_pad: int, num_heads: int, head_dim: int,
              num_kv_heads: int, element_size: int = 2, prefill_launch: tuple[int, int, int, int] | None = None,
              staged_launch: tuple[int, int, int, int] | None = None) -> LaunchPlan:
        """The step's work items, their launches, device arrays and partial buffers: made by the first
        layer, reused by every other (the merge of one layer finishes before the next layer's
        kernel writes the buffers again: same stream). A CUDA graph's step finds its plan here
        already (`StaticDecodePlan.install`).

        Three launches, each with its own program shape: prefix items (up to 64 / GQA-group members
        of a group), tiles of several queries (prefill chunks: `prefill_launch`) and one-query items
        (decodes, suffix items, their split-K pieces: 16-row programs, not 256 rows for one token).
        The default prefill tiles fill the shared memory of an H200 with 16-bit values of head dim
        128; wider rows (float32, head dim 256) take smaller ones (`prefill_launch_for_rows`). staged_launch:
        the prefill launch reads a staged copy of its blocks (`staging_plan`) with this launch; where the step's
        prefill items reach more than `STAGE_MAX_BYTES` of blocks, it reads the cache with prefill_launch."""
        key = plan_key(group_pad)
        plan = metadata.backend_cache.get(key)
        if plan is not None:
            return plan
        prefill_launch = prefill_launch or self.prefill_launch_for(False)
        launch = staged_launch or prefill_launch
        rows, *prefill_tile = prefill_launch_for_rows(element_size, head_dim, launch)
        wide, tile_q = queries_per_program(64, group_pad), queries_per_program(rows, group_pad)
        items = self.work_items(metadata.query_start_loc_cpu, metadata.seq_lens_cpu, metadata.share_levels_cpu,
                                tile_q, wide, num_kv_heads, metadata.block_size)
        p = items.num_prefix_items
        multi = p + np.flatnonzero(items.q_len[p:] > 1)
        single = p + np.flatnonzero(items.q_len[p:] <= 1)
        # items are independent (partials are addressed by row, not by item): launch order is free
        order = np.concatenate([self.launch_order(items, indices) for indices in (np.arange(p), multi, single)])
        if (order == np.arange(len(order))).all():
            order = None
        staging = None
        if staged_launch is not None and len(multi):
            key_bytes = 2 * 2 * num_kv_heads * head_dim  # K and V in fp16
            staging = staging_plan(items.seq[multi], items.kv_hi[multi], metadata.block_tables_cpu,
                                   metadata.block_size, metadata.block_tables.shape[1], STAGE_MAX_BYTES // key_bytes)
            if staging is None:  # too many blocks to copy: planned again, tiles for the cache itself
                return self._plan(metadata, group_pad, num_heads, head_dim, num_kv_heads, element_size,
                                  prefill_launch)
        shapes = [(p, wide, self.decode_tile, False),
                  (len(multi), tile_q, TileConfig(*prefill_tile), staging is not None),
                  (len(single), 1, self.decode_tile, False)]
        plan = launch_plan(items, order, [shape for shape in shapes if shape[0]], staging, num_heads, head_dim,
                           metadata.seq_lens.device)
        metadata.backend_cache[key] = plan
        return plan

    def launch_order(self, items: WorkItems, indices: np.ndarray) -> np.ndarray:
        """The items `indices` of one launch in the order its programs take them: `longest_keys_first`,
        or plan order without `longest_first`. The one place both the eager and the static decode plans
        get their order, so a graph's programs take the eager step's items."""
        return longest_keys_first(items, indices) if self.longest_first else indices

    def work_items(self, query_start_loc: list[int], seq_lens: list[int], share_levels, block_q: int,
                   group_block_q: int, num_kv_heads: int, block_size: int) -> WorkItems:
        """`plan_work_items` with this backend's settings (prefix groups on or off, plan options), its
        items aligned for a cache of `block_size`-token blocks (`key_alignment` of the decode tile): the
        one place both the eager and the static decode plans get their alignment."""
        share = self.use_prefix_groups and share_levels is not None
        return plan_work_items(query_start_loc, seq_lens, block_q, share_levels=share_levels if share else None,
                               group_block_q=group_block_q, num_kv_heads=num_kv_heads,
                               align=key_alignment(block_size, self.decode_tile.block_n), **self.plan_options)
