"""Reference attention in plain torch: varlen, causal, GQA, over the paged cache. Any device.

The oracle that GPU kernels are tested against, and the attention of the CPU path. Sequences are
batched: once per step, `plan_groups` sorts them into a few groups of similar shape (decodes of
similar length together, prefill chunks of similar size together), and every layer runs one
scaled_dot_product_attention call per group over K/V gathered into a padded
[seqs, max_len, kv_heads, head_dim] tensor, with a mask for causality and lengths.

Invariant that keeps the results those of one call per sequence: every padded key slot gathers a
real, already written key of its own sequence (its last one), and is masked, so it adds exactly 0
to the softmax sums; padded query rows copy a real row and are dropped. Unwritten cache slots
(which may hold NaN) are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchllm.attention.backend import AttentionMetadata, store_kv
from batchllm.attention.kv_quant import is_fp8, layer_caches, read_slots, split_scales
from batchllm.layers.fp8 import FP8_MAX, dequantize, quantize, quantize_rows

GROUP_SLACK = 1.5
"""A group's padded area (seqs x max query len x max seq len) may exceed its real area by this factor ..."""
GROUP_MIN_AREA = 4096
"""... plus this many query-key pairs, which cost less than one more SDPA call and gather."""


def plan_groups(query_lens: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Sequence indices in groups to attend in one padded call each. Decode rows (query len 1) and
    prefill chunks are grouped apart; within each kind, sequences sorted by length join the current
    group while its padded area stays within GROUP_SLACK x its real area + GROUP_MIN_AREA."""
    order = sorted(range(len(seq_lens)), key=lambda i: (query_lens[i] > 1, seq_lens[i], query_lens[i]))
    groups: list[list[int]] = []
    group: list[int] = []
    real = max_q = max_len = 0
    for i in order:
        q, n = query_lens[i], seq_lens[i]
        new_real, new_q, new_len = real + q * n, max(max_q, q), max(max_len, n)
        same_kind = not group or (q > 1) == (query_lens[group[0]] > 1)
        if group and same_kind and (len(group) + 1) * new_q * new_len <= GROUP_SLACK * new_real + GROUP_MIN_AREA:
            group.append(i)
            real, max_q, max_len = new_real, new_q, new_len
        else:
            if group:
                groups.append(group)
            group, real, max_q, max_len = [i], q * n, q, n
    if group:
        groups.append(group)
    return groups


@dataclass
class _Group:
    """One padded SDPA call, derived once per step and reused by every layer."""

    num_seqs: int
    max_query_len: int
    max_seq_len: int
    query_rows: torch.Tensor  # [num_seqs * max_query_len] int64: token row of each padded query row
    key_slots: torch.Tensor  # [num_seqs * max_seq_len] int64: cache slot of each padded key
    mask: torch.Tensor | None  # [num_seqs, 1, max_query_len, max_seq_len] bool, None: every key visible
    is_causal: bool  # no mask needed beyond plain causality (fresh prefills of one length)
    valid_rows: torch.Tensor | None  # padded rows that are real query tokens; None: all of them
    out_rows: torch.Tensor  # [real query tokens] int64: token row of each valid padded row


def _build_group(seqs: list[int], metadata: AttentionMetadata, device: torch.device) -> _Group:
    starts, lens = metadata.query_start_loc_cpu, metadata.seq_lens_cpu
    qlens = [starts[i + 1] - starts[i] for i in seqs]
    slens = [lens[i] for i in seqs]
    n, max_q, max_len = len(seqs), max(qlens), max(slens)
    q_len = torch.tensor(qlens, device=device)[:, None]  # [n, 1]
    s_len = torch.tensor(slens, device=device)[:, None]
    start = torch.tensor([starts[i] for i in seqs], device=device)[:, None]
    row = torch.arange(max_q, device=device)[None, :]
    real_row = row < q_len  # [n, max_q]
    query_rows = start + torch.minimum(row, q_len - 1)  # padded rows repeat the last real row
    pos = torch.minimum(torch.arange(max_len, device=device)[None, :], s_len - 1)  # [n, max_len]
    tables = metadata.block_tables.to(device)[torch.tensor(seqs, device=device)].long()
    bs = metadata.block_size
    key_slots = tables.gather(1, pos // bs) * bs + pos % bs
    uniform = len(set(slens)) == 1 and len(set(qlens)) == 1
    is_causal = uniform and max_q == max_len and max_q > 1
    mask = None
    if not uniform or (max_q > 1 and not is_causal):
        # query row r of a sequence sits at position len - qlen + r and sees keys 0..that position
        last_key = (s_len - q_len + torch.minimum(row, q_len - 1))[:, :, None]  # [n, max_q, 1]
        mask = (torch.arange(max_len, device=device)[None, None, :] <= last_key)[:, None]
    all_real = all(q == max_q for q in qlens)
    return _Group(
        num_seqs=n, max_query_len=max_q, max_seq_len=max_len,
        query_rows=query_rows.reshape(-1), key_slots=key_slots.reshape(-1), mask=mask, is_causal=is_causal,
        valid_rows=None if all_real else real_row.reshape(-1).nonzero().squeeze(1),
        out_rows=query_rows[real_row] if not all_real else query_rows.reshape(-1),
    )


def _step_groups(metadata: AttentionMetadata, device: torch.device) -> list[_Group]:
    groups = metadata.backend_cache.get("torch_ref_groups")
    if groups is None:
        starts = metadata.query_start_loc_cpu
        qlens = [starts[i + 1] - starts[i] for i in range(metadata.num_seqs)]
        groups = [_build_group(seqs, metadata, device) for seqs in plan_groups(qlens, metadata.seq_lens_cpu)]
        metadata.backend_cache["torch_ref_groups"] = groups
    return groups


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                  scale: float) -> torch.Tensor:
    """Attention with FP8 operands in both matmuls, as the Triton kernel's FP8_DOTS computes it: q
    quantized to e4m3 per (token, head) with scale amax / 448, k and v as the fp8 cache holds them
    (dequantized values, exact in e4m3 times the cache's scale), softmax weights p = exp(s - max)
    scaled by 448 and rounded to e4m3 for p @ v, the normalizing sum over the unrounded p; float32
    accumulation. q: [n, heads, q_len, d]; k, v: [n, kv_heads, len, d]; mask as SDPA's."""
    q8 = dequantize(*quantize_rows(q.float()))  # per (token, head): the last dim is the row
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = q8 @ kf.transpose(-1, -2) * scale
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.exp(scores - scores.amax(-1, keepdim=True))
    out = quantize(p * FP8_MAX, None).float() @ vf / (FP8_MAX * p.sum(-1, keepdim=True))
    return out.to(q.dtype)


class TorchReferenceBackend:
    name = "torch"
    supports_decode_graphs = False

    def __init__(self, fp8_attention: bool = False) -> None:
        """fp8_attention: over an fp8 cache, `fp8_attention`'s arithmetic instead of SDPA's (the
        engine's fp8_attention option; on CPU an emulation, for quality measurements and tests). It
        applies to every query row, where the Triton kernel keeps fp16 dots for one-query decode items
        (`triton_backend.fp8_dots_fit`): the emulation errs on the side of more FP8 rounding."""
        self.fp8_attention = fp8_attention

    def warmup(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               device: torch.device, kv_dtype: torch.dtype | None = None) -> None:
        """Nothing to compile."""

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,  # [2] float32: k_scale, v_scale of an fp8 cache; None: 1.0
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """An fp8 cache is dequantized (to the query's dtype) as it is gathered: the math is SDPA's."""
        store_kv(key, value, kv_cache, metadata.slot_mapping, kv_scale)
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = key.shape[1]
        keys, values = layer_caches(kv_cache)  # [blocks, block_size, kvh, d]
        k_scale, v_scale = split_scales(kv_cache, kv_scale)
        out = torch.empty_like(query)
        fp8_dots = self.fp8_attention and is_fp8(kv_cache)
        read_dtype = torch.float32 if fp8_dots else query.dtype  # FP8 dots: the e4m3 values x scale, unrounded
        for g in _step_groups(metadata, query.device):
            n, max_q, max_len = g.num_seqs, g.max_query_len, g.max_seq_len
            q = query.index_select(0, g.query_rows).view(n, max_q, num_heads, head_dim).transpose(1, 2)
            k = read_slots(keys, g.key_slots, read_dtype, k_scale).view(n, max_len, num_kv_heads, head_dim)
            v = read_slots(values, g.key_slots, read_dtype, v_scale).view(n, max_len, num_kv_heads, head_dim)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            if fp8_dots:
                o = fp8_attention(q, k, v, g.mask, g.is_causal, scale)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=g.mask, is_causal=g.is_causal, scale=scale,
                                                   enable_gqa=num_heads != num_kv_heads)
            o = o.transpose(1, 2).reshape(n * max_q, num_heads, head_dim)  # [padded rows, h, d]
            if g.valid_rows is not None:
                o = o.index_select(0, g.valid_rows)
            out.index_copy_(0, g.out_rows, o)
        return out
