"""Reference attention in plain torch: varlen, causal, GQA, over the paged cache. Any device.

One scaled_dot_product_attention call per sequence: slow, simple, and the oracle that GPU kernels
are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchllm.attention.backend import AttentionMetadata, store_kv


class TorchReferenceBackend:
    name = "torch"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv(key, value, kv_cache, metadata.slot_mapping)
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = key.shape[1]
        block_size = metadata.block_size
        out = torch.empty_like(query)
        starts = metadata.query_start_loc_cpu
        for i, seq_len in enumerate(metadata.seq_lens_cpu):
            q_start, q_end = starts[i], starts[i + 1]
            query_len = q_end - q_start
            num_blocks = -(-seq_len // block_size)
            blocks = torch.tensor(metadata.block_tables_cpu[i][:num_blocks], device=query.device)
            k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]  # [seq_len, kvh, d]
            v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
            q = query[q_start:q_end].transpose(0, 1).unsqueeze(0)  # [1, h, query_len, d]
            k = k.transpose(0, 1).unsqueeze(0)  # [1, kvh, seq_len, d]
            v = v.transpose(0, 1).unsqueeze(0)
            mask = None
            is_causal = False
            if query_len == seq_len:
                is_causal = query_len > 1
            elif query_len > 1:
                # query row j sits at position seq_len - query_len + j and sees keys 0..that position
                q_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)[:, None]
                mask = torch.arange(seq_len, device=query.device)[None, :] <= q_pos
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=num_heads != num_kv_heads
            )
            out[q_start:q_end] = o.squeeze(0).transpose(0, 1)
        return out
