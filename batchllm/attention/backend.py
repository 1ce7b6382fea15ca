"""The attention backend protocol and the per-step metadata every backend reads.

`AttentionMetadata` is built once per step by the runner and passed down explicitly (no globals).
Sequences are laid out back to back: sequence i owns query rows
query_start_loc[i] .. query_start_loc[i+1]-1, which are its *last* (query_len) tokens of seq_lens[i].
The prefix-group layout (DESIGN.md item 6) rides along as one optional list, `share_levels_cpu` (per nesting
level, which sequences hold the same KV at their first positions): backends that ignore
it stay correct, since each sequence's block table still covers all of its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from batchllm.attention.kv_quant import layer_caches, split_scales, store_slots


@dataclass
class AttentionMetadata:
    num_tokens: int
    block_size: int
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset of each new token
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: tokens in context after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]  # host copies, for backends that loop per sequence
    seq_lens_cpu: list[int]
    block_tables_cpu: list[list[int]]
    share_levels_cpu: list[tuple[list[int], list[int]]] | None = None
    """Prefix groups, outermost level first: per level, (group per sequence or -1, shared positions
    per sequence). Members of one group hold the same KV at their first `shared` positions, so
    those keys may be read once for all of them. None: no sequence is under a shared prefix."""
    backend_cache: dict[Any, Any] = field(default_factory=dict)
    """Per-step data a backend derives once and reuses in every layer (e.g. tile tables)."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(Protocol):
    supports_decode_graphs: bool
    """Whether decode steps may run as CUDA graphs over this backend (it has a static decode plan)."""

    def warmup(self, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               device: torch.device, kv_dtype: torch.dtype | None = None) -> None:
        """Prepare for these shapes before the first step (compile kernels); may do nothing.
        kv_dtype: the cache's element type (None: dtype)."""
        ...

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        kv_scale: torch.Tensor | None = None,  # [2] float32: k_scale, v_scale of an fp8 cache; None: 1.0
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Store key/value of the new tokens into the cache (quantized with kv_scale when the cache
        is fp8: `kv_quant.py`), then attend causally over each sequence's cached + new tokens."""
        ...


def store_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
             kv_scale: torch.Tensor | None = None) -> None:
    """Write the new tokens' K and V into their slots of the paged cache; an fp8 cache stores
    them quantized with kv_scale ([2]: k_scale, v_scale; None: 1.0)."""
    k_scale, v_scale = split_scales(kv_cache, kv_scale)
    keys, values = layer_caches(kv_cache)
    store_slots(keys, slot_mapping, key, k_scale)
    store_slots(values, slot_mapping, value, v_scale)
