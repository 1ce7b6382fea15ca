"""Attention backends over the paged KV cache."""

from batchllm.attention.backend import AttentionBackend, AttentionMetadata
from batchllm.attention.torch_ref import TorchReferenceBackend

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchReferenceBackend"]
