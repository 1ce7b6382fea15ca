"""Triton attention over the paged KV cache (GPU): varlen, causal, GQA of any ratio, prefill and decode.

One kernel serves prefill chunks and decode tokens alike. A program handles one tile of query
tokens of one sequence for one KV head: its rows are (token, query head of that KV head's group)
pairs, so each K/V tile is read once for the whole GQA group, and a decode token with 8 query heads
per KV head still fills an MMA tile. It walks the sequence's block table in tiles of BLOCK_N keys
with an online softmax in fp32 (exp2, log2(e) folded into the scale) and masks keys after each
query's position (causal) and past the sequence length.

Imported only where Triton and CUDA exist; `TritonBackend.available()` says so without importing
Triton on CPU-only machines.
"""

from __future__ import annotations

import math

import torch

from batchllm.attention.backend import AttentionMetadata, store_kv

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the backend is simply unavailable
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def _paged_attention_kernel(
        Q, K_cache, V_cache, Out,
        block_tables, seq_lens, query_start_loc, tile_seq, tile_start,
        sm_scale_log2,
        stride_qt, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh,
        stride_bt,
        BLOCK_SIZE: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        seq = tl.load(tile_seq + tile)
        q_tile_start = tl.load(tile_start + tile)  # first query token of the tile, within the sequence
        q_begin = tl.load(query_start_loc + seq)
        q_len = tl.load(query_start_loc + seq + 1) - q_begin
        seq_len = tl.load(seq_lens + seq)

        # rows: (token, head of the group) pairs; the group is padded to a power of two and the
        # rows to at least 16 (BLOCK_M >= BLOCK_Q * GROUP_PAD), padding rows are masked out
        rows = tl.arange(0, BLOCK_M)
        tok = q_tile_start + rows // GROUP_PAD  # query token index within the sequence
        head_in_group = rows % GROUP_PAD
        head = kv_head * GROUP + head_in_group
        row_valid = (tok < q_len) & (head_in_group < GROUP) & (rows < BLOCK_Q * GROUP_PAD)
        q_pos = seq_len - q_len + tok  # absolute position of each row's token
        d = tl.arange(0, HEAD_DIM_PAD)
        d_valid = d < HEAD_DIM

        q_ptrs = Q + (q_begin + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptrs, mask=row_valid[:, None] & d_valid[None, :], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

        # keys beyond the last query of this tile are masked for every row: stop there
        last_pos = seq_len - q_len + tl.minimum(q_tile_start + BLOCK_Q, q_len) - 1
        n_end = last_pos + 1
        offs_n = tl.arange(0, BLOCK_N)
        for n_start in range(0, n_end, BLOCK_N):
            k_pos = n_start + offs_n
            k_valid = k_pos < n_end
            block_idx = tl.load(block_tables + seq * stride_bt + k_pos // BLOCK_SIZE, mask=k_valid, other=0)
            slot = k_pos % BLOCK_SIZE
            k_ptrs = K_cache + block_idx[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh + d[:, None]
            k = tl.load(k_ptrs, mask=k_valid[None, :] & d_valid[:, None], other=0.0)  # [D, BLOCK_N]
            s = tl.dot(q, k, input_precision=PRECISION) * sm_scale_log2  # [BLOCK_M, BLOCK_N], log2 units
            allowed = (k_pos[None, :] <= q_pos[:, None]) & k_valid[None, :]
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with nothing allowed yet keep m = -inf: subtract 0 instead (no NaN from inf - inf)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptrs = V_cache + block_idx[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :]
            v = tl.load(v_ptrs, mask=k_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = Out + (q_begin + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


class TritonBackend:
    """Paged attention in one Triton kernel per layer (plus the KV store)."""

    name = "triton"

    @staticmethod
    def available() -> bool:
        return triton is not None and torch.cuda.is_available()

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv(key, value, kv_cache, metadata.slot_mapping)
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = key.shape[1]
        group = num_heads // num_kv_heads
        group_pad = triton.next_power_of_2(group)
        block_q = 1 if metadata.max_query_len == 1 else max(1, 64 // group_pad)
        tile_seq, tile_start = _tiles(metadata, block_q)
        out = torch.empty_like(query)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        grid = (tile_seq.numel(), num_kv_heads)
        _paged_attention_kernel[grid](
            query, k_cache, v_cache, out,
            metadata.block_tables, metadata.seq_lens, metadata.query_start_loc, tile_seq, tile_start,
            scale * math.log2(math.e),
            query.stride(0), query.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1),
            metadata.block_tables.stride(0),
            BLOCK_SIZE=metadata.block_size, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
            HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_Q=block_q,
            BLOCK_M=max(16, block_q * group_pad), BLOCK_N=64,
            PRECISION="ieee" if query.dtype == torch.float32 else "tf32",  # fp32 stays fp32; 16-bit ignores it
            num_warps=4, num_stages=2,
        )
        return out

def _tiles(metadata: AttentionMetadata, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first query token) of every tile; built once per step and shared by all layers."""
    key = ("triton_tiles", block_q)
    if key not in metadata.backend_cache:
        seqs, starts = [], []
        loc = metadata.query_start_loc_cpu
        for i in range(metadata.num_seqs):
            for start in range(0, loc[i + 1] - loc[i], block_q):
                seqs.append(i)
                starts.append(start)
        device = metadata.seq_lens.device
        metadata.backend_cache[key] = (torch.tensor(seqs, dtype=torch.int32, device=device),
                                       torch.tensor(starts, dtype=torch.int32, device=device))
    return metadata.backend_cache[key]
