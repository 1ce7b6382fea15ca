"""Experimental variants of the paged prefill attention kernel, side by side (NOT used by the engine).

    python3 benchmarks/attention_variants.py --json-out $OUT/variants.json      (on the device, < 120 s)
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/attention_variants.py --cpu-check   (CPU, float32)

The engine's `_paged_attention_kernel` reaches ~344-380 TFLOP/s on an H200 for long causal prefill,
torch SDPA (contiguous K/V; its kernel there is cuDNN) 551. This script asks which kernel changes are worth integrating.
`_variant_kernel` below is a copy of the engine kernel (bf16/fp32 only: no fp8 cache) with constexpr
switches; each variant is one setting of them:

- baseline: the engine's own `TritonBackend().forward` (imported, not copied): the reference for
  time and output.
- copy: the experimental copy with every switch off: should time as baseline (checks the copy).
- k_rowmajor: the K tile gathered as [BLOCK_N, HEAD_DIM] (keys along rows, as V) and fed to tl.dot
  as tl.trans(k), instead of a [HEAD_DIM, BLOCK_N] gather (wgmma prefers a K-major B operand).
- q_prescaled: q multiplied by the softmax scale (log2 units) once, in fp32 then cast back, so no
  score tile is multiplied (rounds q once more: compared with a tolerance).
- tl_range_stages: both key loops as tl.range(..., num_stages=S), S the launch's stages.
- tl_range_ws: both key loops as tl.range(..., warp_specialize=True) (may not compile on this
  Triton / GPU: reported as compile_error, not a crash).
- block64: the engine kernel on a cache of block size 64 (instead of 16): do fewer block-table
  lookups and longer contiguous runs matter?
- block64_scalar: the copy on that cache, loading ONE block index per tile (BLOCK_SIZE % BLOCK_N
  == 0, tiles start at multiples of BLOCK_N) and addressing the tile as base + slot offsets,
  instead of a block index per key; not_applicable where the tile is wider than a block. Now in the
  engine kernel (`triton_backend.py`, TILE_IN_BLOCK, per item where its keys start on a tile boundary).
- block64_all: block64_scalar + k_rowmajor + q_prescaled.

Cases (Llama-3.1-8B attention: 32 query heads, 8 KV heads, head dim 128, bf16): 8192 new tokens
causal; 8192 new after 8192 cached; 40 x 200 new after 2000 cached (the suffix prefill of the paper
workload); torch SDPA on the first as the yardstick. Launches (rows, keys per tile, warps, stages):
the engine default (256, 64, 8, 3), (128, 128, 8, 3), (256, 128, 8, 2).

One JSON line per (case, variant, launch): median ms (CUDA-graph replay, as attention_bench's
time_ms), TFLOP/s, max |diff| against the baseline's output (default launch) and whether it is within
tolerance; `compile_error` (the exception) where the variant failed to build or launch,
`not_applicable` or `skipped` (past the time budget). Each variant's output is checked before it is
timed; a failing check is reported (ok: false), the timing kept. Variants run in the order listed in
VARIANTS (warp specialization last), each over all cases; --json-out is rewritten after every row.
--only v1,v2 times only those variants; --budget-s moves the time budget (90 s from the first row).
--cpu-check: every variant in the interpreter (float32, tiny GQA-4 cases, block sizes 16 and 64)
against the torch reference backend, PASS/FAIL per variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, without PYTHONPATH
from batchllm.attention.backend import store_kv  # noqa: E402
from batchllm.attention.torch_ref import TorchReferenceBackend  # noqa: E402
from batchllm.attention.triton_backend import (  # noqa: E402
    TritonBackend,
    _merge_partials_kernel,
    dot_head_dim,
    next_power_of_2,
    tma_descriptors,
)
from benchmarks.attention_bench import causal_flops, sdpa_ms, time_ms  # noqa: E402
from tests.attention_cases import random_case  # noqa: E402

LOOP_RANGE, LOOP_STAGES, LOOP_WS = 0, 1, 2  # how the key loops are written (the LOOP constexpr)
VARIANTS = {  # name: (switches of the copy, or None for the engine's kernel; cache block size), run in this order
    "baseline": (None, 16),
    "copy": ({}, 16),
    "k_rowmajor": ({"K_ROWMAJOR": True}, 16),
    "q_prescaled": ({"Q_PRESCALED": True}, 16),
    "block64": (None, 64),
    "block64_scalar": ({"SCALAR_BLOCK": True}, 64),
    "tl_range_stages": ({"LOOP": LOOP_STAGES}, 16),
    "block64_all": ({"SCALAR_BLOCK": True, "K_ROWMAJOR": True, "Q_PRESCALED": True}, 64),
    "block64_fma": ({"SCALAR_BLOCK": True, "FMA_SOFTMAX": True}, 64),
    "block64_lazy": ({"SCALAR_BLOCK": True, "LAZY_RESCALE": True}, 64),
    "block64_fma_lazy": ({"SCALAR_BLOCK": True, "FMA_SOFTMAX": True, "LAZY_RESCALE": True}, 64),
    "block64_tma": ({"SCALAR_BLOCK": True, "TMA": True}, 64),
    "block64_tma_fma": ({"SCALAR_BLOCK": True, "TMA": True, "FMA_SOFTMAX": True}, 64),
    "block64_tma_fma_lazy": ({"SCALAR_BLOCK": True, "TMA": True, "FMA_SOFTMAX": True, "LAZY_RESCALE": True}, 64),
    "tl_range_ws": ({"LOOP": LOOP_WS}, 16),
}
SWITCHES = {"K_ROWMAJOR": False, "Q_PRESCALED": False, "SCALAR_BLOCK": False, "LOOP": LOOP_RANGE, "TMA": False,
            "FMA_SOFTMAX": False, "LAZY_RESCALE": False}
DEFAULT_LAUNCH = (256, 64, 8, 3)
LAUNCHES = [DEFAULT_LAUNCH, (128, 128, 8, 3), (256, 128, 8, 2)]
CASES = [
    ([(0, 8192)], "8192 new, causal"),
    ([(8192, 8192)], "8192 new after 8192 cached"),
    ([(2000, 200)] * 40, "40 x 200 new after 2000 cached"),
]
GPU_ATOL, GPU_RTOL = 2e-2, 2e-2  # ok: |diff| <= atol + rtol |reference| everywhere (bf16 outputs; the first
# rows of a causal prefill average 1-2 values of size ~1-4, where a bf16 step is ~0.016)
TIME_BUDGET_S = 90.0  # from gpu_run's start: later rows are reported as skipped (the run ends under 120 s)
SCALE = 128 ** -0.5
LAZY_TAU = tl.constexpr(8.0)  # LAZY_RESCALE: log2 units the running max may lag (p < 2^8)


@triton.jit
def _variant_tile(
    q, pos, m_i, l_i, acc, n_start, n_end, seq, kv_head, K_cache, V_cache, K_desc, V_desc, block_tables, d, d_valid,
    sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
    K_ROWMAJOR: tl.constexpr, Q_PRESCALED: tl.constexpr, SCALAR_BLOCK: tl.constexpr,
    TMA: tl.constexpr, FMA_SOFTMAX: tl.constexpr, LAZY_RESCALE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """The engine's `_attend_tile` with the switches. SCALAR_BLOCK: the tile lies in one cache block
    (BLOCK_SIZE % BLOCK_N == 0 and n_start % BLOCK_N == 0, checked by the host). TMA (with
    SCALAR_BLOCK): K and V tiles [BLOCK_N, HEAD_DIM] through tensor descriptors over the cache seen as
    [blocks * BLOCK_SIZE, kv_heads * HEAD_DIM] (unmasked: keys past n_end lie in the same block, are
    finite and get p = 0). FMA_SOFTMAX: scores stay unscaled, the scale enters the row max once and
    exp2's argument as one fused multiply-add. LAZY_RESCALE (unmasked tiles): the running max moves
    only when some row's grows by more than LAZY_TAU (log2 units); otherwise acc and l keep their
    reference max and p stays below 2^LAZY_TAU, so most tiles skip the [BLOCK_M, D] rescale."""
    k_pos = n_start + tl.arange(0, BLOCK_N)
    if MASKED:
        k_valid = k_pos < n_end
    else:
        k_valid = k_pos >= 0
    if TMA:
        block_idx = tl.load(block_tables + seq * stride_bt + n_start // BLOCK_SIZE)
        row0 = block_idx * BLOCK_SIZE + n_start % BLOCK_SIZE
        k = K_desc.load([row0, kv_head * HEAD_DIM])  # [BLOCK_N, HEAD_DIM]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    elif SCALAR_BLOCK:  # one block index for the tile: a scalar base, keys at consecutive slots
        block_idx = tl.load(block_tables + seq * stride_bt + n_start // BLOCK_SIZE).to(tl.int64)
        slot = n_start % BLOCK_SIZE + tl.arange(0, BLOCK_N)
        k_base = K_cache + block_idx * stride_kb + kv_head * stride_kh
        v_base = V_cache + block_idx * stride_vb + kv_head * stride_vh
        k_row = slot * stride_ks  # [BLOCK_N] offsets from the base
        v_row = slot * stride_vs
    else:  # a block index per key (the engine's gather)
        if MASKED:
            block_idx = tl.load(block_tables + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_valid, other=0)
        else:
            block_idx = tl.load(block_tables + seq * stride_bt + k_pos // BLOCK_SIZE)
        block_idx = block_idx.to(tl.int64)
        slot = k_pos % BLOCK_SIZE
        k_base = K_cache + kv_head * stride_kh
        v_base = V_cache + kv_head * stride_vh
        k_row = block_idx * stride_kb + slot * stride_ks
        v_row = block_idx * stride_vb + slot * stride_vs
    if TMA:
        pass
    elif K_ROWMAJOR:  # [BLOCK_N, D], keys along rows (as V), transposed for the dot
        k = tl.load(k_base + k_row[:, None] + d[None, :], mask=k_valid[:, None] & d_valid[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)
    else:  # [D, BLOCK_N], as the engine
        k = tl.load(k_base + k_row[None, :] + d[:, None], mask=k_valid[None, :] & d_valid[:, None], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=PRECISION)
    if FMA_SOFTMAX and not Q_PRESCALED:  # s stays unscaled: the scale multiplies the row max and enters exp2's FMA
        score_scale = sm_scale_log2
    else:
        score_scale = 1.0
        if not Q_PRESCALED:
            s = s * sm_scale_log2
    if MASKED:
        s = tl.where((k_pos[None, :] <= pos[:, None]) & k_valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * score_scale)
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    if LAZY_RESCALE and not MASKED:  # every score finite; the first tile (m_i = -inf) always moves the max
        if tl.max(m_new - m_i, 0) > LAZY_TAU:
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        m_new = m_i
        m_safe = m_i
    else:
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha
        acc = acc * alpha[:, None]
    p = tl.exp2(s * score_scale - m_safe[:, None])
    l_i = l_i + tl.sum(p, 1)
    if TMA:
        v = V_desc.load([row0, kv_head * HEAD_DIM])
    else:
        v = tl.load(v_base + v_row[:, None] + d[None, :], mask=k_valid[:, None] & d_valid[None, :], other=0.0)
    acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _variant_loop(
    q, pos, m_i, l_i, acc, lo, hi, n_end, seq, kv_head, K_cache, V_cache, K_desc, V_desc, block_tables, d, d_valid,
    sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
    K_ROWMAJOR: tl.constexpr, Q_PRESCALED: tl.constexpr, SCALAR_BLOCK: tl.constexpr,
    LOOP: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr, FMA_SOFTMAX: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Tiles lo, lo + BLOCK_N, .. below hi, the loop written as LOOP says."""
    if LOOP == 1:
        for n_start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
            m_i, l_i, acc = _variant_tile(
                q, pos, m_i, l_i, acc, n_start, n_end, seq, kv_head, K_cache, V_cache, K_desc, V_desc, block_tables,
                d, d_valid,
                sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                BLOCK_SIZE, BLOCK_N, PRECISION, MASKED, K_ROWMAJOR, Q_PRESCALED, SCALAR_BLOCK, TMA, FMA_SOFTMAX,
                LAZY_RESCALE, HEAD_DIM)
    elif LOOP == 2:
        for n_start in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
            m_i, l_i, acc = _variant_tile(
                q, pos, m_i, l_i, acc, n_start, n_end, seq, kv_head, K_cache, V_cache, K_desc, V_desc, block_tables,
                d, d_valid,
                sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                BLOCK_SIZE, BLOCK_N, PRECISION, MASKED, K_ROWMAJOR, Q_PRESCALED, SCALAR_BLOCK, TMA, FMA_SOFTMAX,
                LAZY_RESCALE, HEAD_DIM)
    else:
        for n_start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _variant_tile(
                q, pos, m_i, l_i, acc, n_start, n_end, seq, kv_head, K_cache, V_cache, K_desc, V_desc, block_tables,
                d, d_valid,
                sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
                BLOCK_SIZE, BLOCK_N, PRECISION, MASKED, K_ROWMAJOR, Q_PRESCALED, SCALAR_BLOCK, TMA, FMA_SOFTMAX,
                LAZY_RESCALE, HEAD_DIM)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["item_offset", "stride_bt"])
def _variant_kernel(
    Q, K_cache, V_cache, K_desc, V_desc, Out, Part_out, Part_lse,
    block_tables, item_seq, item_q_off, item_q_len, item_kv_lo, item_kv_hi, item_part, q_tokens, q_pos,
    item_count, sm_scale_log2,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_pp, stride_ph, stride_lp, stride_bt, item_offset,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, K_ROWMAJOR: tl.constexpr, Q_PRESCALED: tl.constexpr, SCALAR_BLOCK: tl.constexpr,
    LOOP: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr, FMA_SOFTMAX: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
):
    """The engine's `_paged_attention_kernel` (same items, rows, masking and outputs), no fp8.
    K_desc, V_desc: tensor descriptors of the caches (TMA), else the caches again (unused)."""
    if tl.program_id(0) >= tl.load(item_count):
        return
    item = tl.program_id(0) + item_offset
    kv_head = tl.program_id(1)
    seq = tl.load(item_seq + item)
    q_off = tl.load(item_q_off + item)
    q_len = tl.load(item_q_len + item)
    kv_lo = tl.load(item_kv_lo + item)
    kv_hi = tl.load(item_kv_hi + item)
    part = tl.load(item_part + item)

    rows = tl.arange(0, BLOCK_M)
    qi = rows // GROUP_PAD
    head_in_group = rows % GROUP_PAD
    head = kv_head * GROUP + head_in_group
    row_valid = (qi < q_len) & (head_in_group < GROUP) & (rows < BLOCK_Q * GROUP_PAD)
    tok = tl.load(q_tokens + q_off + qi, mask=row_valid, other=0)
    pos = tl.load(q_pos + q_off + qi, mask=row_valid, other=-1)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = d < HEAD_DIM
    q = tl.load(Q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if Q_PRESCALED:  # the scale once per program, not once per score tile
        q = (q.to(tl.float32) * sm_scale_log2).to(Q.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    n_end = tl.minimum(kv_hi, tl.max(pos, 0) + 1)
    first_pos = tl.min(tl.where(row_valid, pos, n_end), 0)
    n_unmasked = kv_lo + tl.maximum(tl.minimum(first_pos + 1, n_end) - kv_lo, 0) // BLOCK_N * BLOCK_N
    m_i, l_i, acc = _variant_loop(
        q, pos, m_i, l_i, acc, kv_lo, n_unmasked, n_end, seq, kv_head, K_cache, V_cache, K_desc, V_desc,
        block_tables, d, d_valid,
        sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        BLOCK_SIZE, BLOCK_N, PRECISION, False, K_ROWMAJOR, Q_PRESCALED, SCALAR_BLOCK, LOOP, STAGES, TMA,
        FMA_SOFTMAX, LAZY_RESCALE, HEAD_DIM)
    m_i, l_i, acc = _variant_loop(
        q, pos, m_i, l_i, acc, n_unmasked, n_end, n_end, seq, kv_head, K_cache, V_cache, K_desc, V_desc,
        block_tables, d, d_valid,
        sm_scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        BLOCK_SIZE, BLOCK_N, PRECISION, True, K_ROWMAJOR, Q_PRESCALED, SCALAR_BLOCK, LOOP, STAGES, TMA,
        FMA_SOFTMAX, LAZY_RESCALE, HEAD_DIM)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    mask = row_valid[:, None] & d_valid[None, :]
    if part < 0:
        tl.store(Out + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 out.to(Out.dtype.element_ty), mask=mask)
    else:
        prow = part + qi
        tl.store(Part_out + prow[:, None] * stride_pp + head[:, None] * stride_ph + d[None, :], out, mask=mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(Part_lse + prow * stride_lp + head, lse, mask=row_valid)


class NotApplicable(Exception):
    """The variant cannot run this case / launch (e.g. a tile wider than a cache block)."""


class VariantBackend:
    """`TritonBackend.forward` (same store, plan and merge) with `_variant_kernel` in place of the
    engine kernel; `switches` set its constexprs (unset: off)."""

    def __init__(self, switches: dict, prefill_launch: tuple[int, int, int, int]) -> None:
        self.switches = {**SWITCHES, **switches}
        self.planner = TritonBackend(prefill_launch=prefill_launch)

    def forward(self, query, key, value, kv_cache, metadata, scale):
        store_kv(key, value, kv_cache, metadata.slot_mapping)
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = key.shape[1]
        group = num_heads // num_kv_heads
        group_pad = next_power_of_2(group)
        plan = self.planner._plan(metadata, group_pad, num_heads, head_dim, num_kv_heads, query.element_size())
        if self.switches["SCALAR_BLOCK"]:
            self._check_scalar_tiles(plan, metadata.block_size)
        out = torch.empty_like(query)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        t = plan.tensors
        for launch in plan.launches:
            k_desc, v_desc = self._descriptors(kv_cache, launch.tile.block_n, head_dim)
            _variant_kernel[(launch.grid, num_kv_heads)](
                query, k_cache, v_cache, k_desc, v_desc, out, plan.part_out, plan.part_lse,
                metadata.block_tables, t["seq"], t["q_off"], t["q_len"], t["kv_lo"], t["kv_hi"], t["part"],
                t["q_tokens"], t["q_pos"], launch.count, scale * math.log2(math.e),
                query.stride(0), query.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                out.stride(0), out.stride(1),
                plan.part_out.stride(0), plan.part_out.stride(1), plan.part_lse.stride(0),
                metadata.block_tables.stride(0), launch.item_offset,
                BLOCK_SIZE=metadata.block_size, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
                HEAD_DIM_PAD=dot_head_dim(head_dim), BLOCK_Q=launch.block_q,
                BLOCK_M=max(16, launch.block_q * group_pad), BLOCK_N=launch.tile.block_n,
                PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                STAGES=launch.tile.num_stages, num_warps=launch.tile.num_warps, num_stages=launch.tile.num_stages,
                **self.switches,
            )
        if plan.merge_grid:
            _merge_partials_kernel[(plan.merge_grid,)](
                out, plan.part_out, plan.part_lse, t["merge_tokens"], t["merge_ptr"], t["merge_parts"],
                plan.merge_count, out.stride(0), out.stride(1), plan.part_out.stride(0), plan.part_out.stride(1),
                plan.part_lse.stride(0), NUM_HEADS=num_heads, HEADS_PAD=next_power_of_2(num_heads),
                HEAD_DIM=head_dim, HEAD_DIM_PAD=next_power_of_2(head_dim), num_warps=4,
            )
        return out

    def _descriptors(self, kv_cache, block_n: int, head_dim: int):
        """TMA: the engine's descriptors of the caches (`tma_descriptors`: [blocks * block_size, kv_heads *
        head_dim], tiles [block_n, head_dim]); otherwise the caches themselves (the kernel ignores them)."""
        if not self.switches["TMA"]:
            return kv_cache[0], kv_cache[1]
        if dot_head_dim(head_dim) != head_dim:
            raise NotApplicable(f"TMA tiles need the head dim unpadded, not {head_dim}")
        return tma_descriptors(kv_cache, block_n)

    @staticmethod
    def _check_scalar_tiles(plan, block_size: int) -> None:
        """SCALAR_BLOCK needs every tile inside one cache block: tiles no wider than a block that
        divides it, and every item's keys starting at a multiple of the tile width."""
        for launch in plan.launches:
            block_n = launch.tile.block_n
            if block_size % block_n:
                raise NotApplicable(f"BLOCK_N {block_n} does not divide block size {block_size}")
            if (plan.items.kv_lo % block_n).any():
                raise NotApplicable(f"some item's keys start off a multiple of BLOCK_N {block_n}")


def make_backend(variant: str, launch: tuple[int, int, int, int]):
    switches, _ = VARIANTS[variant]
    if switches is None:
        return TritonBackend(prefill_launch=launch)
    return VariantBackend(switches, launch)


def run_once(backend, case) -> torch.Tensor:
    q, k, v, cache, md = case
    md.backend_cache.clear()  # the plan depends on the launch: plan again for this backend
    return backend.forward(q, k, v, cache, md, SCALE)


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"[:400]


def measure(variant, launch, case, reference, specs, label, block_size, started) -> dict:
    """One row: check the variant's output against the reference, then time it."""
    row = {"case": label, "variant": variant, "launch": "x".join(map(str, launch)), "block_size": block_size}
    if time.perf_counter() - started > TIME_BUDGET_S:  # (--budget-s sets it)
        return {**row, "skipped": "time budget"}
    backend = make_backend(variant, launch)
    try:
        out = run_once(backend, case)
        torch.cuda.synchronize()
    except NotApplicable as error:
        return {**row, "not_applicable": str(error)}
    except Exception as error:  # a variant that does not compile (or launch) is a result
        return {**row, "compile_error": error_text(error)}
    diff = (out.float() - reference.float()).abs()
    ok = bool((diff <= GPU_ATOL + GPU_RTOL * reference.float().abs()).all())
    row.update(max_abs_diff=round(diff.max().item(), 5), ok=ok)
    ms = time_ms(backend, case, reps=30)
    return {**row, "ms": round(ms, 4), "TFLOPs": round(causal_flops(specs) / ms / 1e9, 1)}


def sdpa_row() -> dict:
    ms = sdpa_ms([(0, 8192)], 32, 8, 128, rep=30)
    return {"case": "8192 new, causal", "variant": "torch_sdpa_contiguous", "ms": round(ms, 4),
            "TFLOPs": round(causal_flops([(0, 8192)]) / ms / 1e9, 1)}


def gpu_run(json_out: str | None, only: list[str] | None = None) -> None:
    """Every variant over every case and launch. Variants go in the outer loop, the riskiest
    (warp specialization) last, so a fault or the time budget cuts the least informative rows; the
    JSON file is rewritten after every row (a crash keeps what was measured)."""
    started = time.perf_counter()
    rows = []

    def report(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if json_out:
            with open(json_out, "w") as f:
                json.dump(rows, f, indent=1)

    print(torch.cuda.get_device_name(0), "triton", triton.__version__, flush=True)
    report(sdpa_row())
    cases = {}  # (case index, block size): (inputs, the engine kernel's output at the default launch)
    for i, (specs, _) in enumerate(CASES):
        for block_size in (16, 64):
            case = random_case(specs, 32, 8, 128, block_size, torch.bfloat16, seed=0)
            cases[i, block_size] = case, run_once(TritonBackend(), case).clone()
    for variant, (_, block_size) in VARIANTS.items():
        if only and variant not in only:
            continue
        for i, (specs, label) in enumerate(CASES):
            case, reference = cases[i, block_size]
            for launch in LAUNCHES:
                report(measure(variant, launch, case, reference, specs, label, block_size, started))
    report({"total_s": round(time.perf_counter() - started, 1)})


CPU_SPECS = [(0, 40), (24, 17)]  # 2 sequences: a fresh prefill, and new tokens after a cached prefix
CPU_LAUNCHES = [(64, 16, 4, 2), (32, 32, 4, 2), (64, 64, 4, 2)]  # 16 / 8 queries per program


def cpu_check() -> bool:
    """Every variant in the interpreter, float32, GQA 4, head dims 32 and 24 (padded to 32), block
    sizes 16 and 64, against the torch reference backend. Returns whether all passed."""
    all_ok = True
    for variant in VARIANTS:
        worst, notes = 0.0, []
        for head_dim in (32, 24):
            for block_size in (16, 64):
                case = random_case(CPU_SPECS, 8, 2, head_dim, block_size, torch.float32, seed=head_dim, device="cpu")
                q, k, v, cache, md = case
                want = TorchReferenceBackend().forward(q, k, v, cache.clone(), md, head_dim ** -0.5)
                for launch in CPU_LAUNCHES:
                    md.backend_cache.clear()
                    try:
                        got = make_backend(variant, launch).forward(q, k, v, cache.clone(), md, head_dim ** -0.5)
                    except NotApplicable:
                        notes.append(f"n/a d{head_dim} bs{block_size} {'x'.join(map(str, launch))}")
                        continue
                    worst = max(worst, (got - want).abs().max().item())
        ok = worst <= 1e-4
        all_ok &= ok
        print(f"{variant:16s} {'PASS' if ok else 'FAIL'}  max|diff| {worst:.2e}  ({len(notes)} not applicable)",
              flush=True)
    return all_ok


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--only", default=None, help="comma-separated variants to time (default: all)")
    parser.add_argument("--launches", default=None,
                        help="comma-separated rows x keys x warps x stages, e.g. 256x64x8x3 (default: LAUNCHES)")
    parser.add_argument("--budget-s", type=float, default=TIME_BUDGET_S, help="rows past this many seconds are skipped")
    parser.add_argument("--cpu-check", action="store_true", help="interpreter correctness check (TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if args.cpu_check:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-check runs in Triton's interpreter: set TRITON_INTERPRET=1")
        raise SystemExit(0 if cpu_check() else 1)
    unknown = set(args.only.split(",")) - set(VARIANTS) if args.only else set()
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    TIME_BUDGET_S = args.budget_s
    if args.launches:
        LAUNCHES[:] = [tuple(int(x) for x in launch.split("x")) for launch in args.launches.split(",")]
    gpu_run(args.json_out, args.only.split(",") if args.only else None)
