"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2/2.5, Qwen3) over flattened tokens.

Parameter names equal the Hugging Face checkpoint names, so loading is a name-for-name copy.
Differences between architectures are `ArchitectureTraits` flags (q/k/v bias, q/k norm), not
subclasses. Inputs are the tokens of all scheduled sequences back to back: [num_tokens, ...].
"""

from __future__ import annotations

import torch
from torch import nn

from batchllm.attention.backend import AttentionBackend, AttentionMetadata
from batchllm.layers.norm import RMSNorm
from batchllm.layers.ops import TorchOps
from batchllm.layers.rotary import RotaryEmbedding, StepRotary
from batchllm.models.spec import ModelSpec


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, ops) -> None:
        super().__init__()
        t = spec.traits
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = self.head_dim**-0.5
        h = spec.hidden_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, kv = self.q_size, self.kv_size
        self.qkv_proj = nn.Linear(h, q + 2 * kv, bias=t.qkv_bias)  # q, k and v in one matmul
        self.checkpoint_rows = {"qkv_proj": (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv))}
        """Rows of each merged parameter that a checkpoint tensor (by its module name) loads into."""
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=t.o_bias)
        if t.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        hidden: torch.Tensor,  # [num_tokens, hidden_size]
        rotary: StepRotary,  # or any callable rotating [num_tokens, heads, head_dim] (ops.step_rotary)
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        v = qkv[:, self.q_size + self.kv_size:].view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:  # rotate q and k in one pass over their joint slice
            qk = rotary(qkv[:, :self.q_size + self.kv_size].view(n, self.num_heads + self.num_kv_heads, self.head_dim))
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        else:
            q = self.q_norm(qkv[:, :self.q_size].view(n, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size:self.q_size + self.kv_size].view(n, self.num_kv_heads, self.head_dim))
            q, k = rotary(q), rotary(k)
        out = backend.forward(q, k, v, kv_cache, metadata, self.scale)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, ops) -> None:
        super().__init__()
        self.ops = ops
        h, i, b = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=b)  # gate and up in one matmul
        self.checkpoint_rows = {"gate_up_proj": (("gate_proj", 0, i), ("up_proj", i, 2 * i))}
        self.down_proj = nn.Linear(i, h, bias=b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, ops) -> None:
        super().__init__()
        self.self_attn = Attention(spec, ops)
        self.mlp = MLP(spec, ops)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)

    def forward(self, hidden, residual, rotary, kv_cache, metadata, backend) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (this layer's MLP output, the residual stream before it): HF's
        residual adds, each carried into the next norm so the two run as one op. The residual
        stream is float32 whatever the model dtype (in float32 a no-op): rounding it to bfloat16 after
        every add doubled the bf16 logits' error against float32 (issue 20)."""
        if residual is None:  # the first layer: the stream is the embeddings
            residual, hidden = hidden.to(torch.float32), self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rotary, kv_cache, metadata, backend)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderBody(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int, ops) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, ops) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.rotary = RotaryEmbedding(spec.head_dim, max_positions, spec.rope_theta, spec.rope_scaling)


class DecoderForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, max_positions: int, ops=None) -> None:
        """ops: the elementwise-op policy (`layers/ops.py`); default TorchOps."""
        super().__init__()
        self.spec = spec
        self.ops = ops or TorchOps()
        self.model = DecoderBody(spec, max_positions, self.ops)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],  # per layer [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [num_tokens, hidden_size]
        hidden = self.model.embed_tokens(input_ids)
        table = self.model.rotary
        rotary = self.ops.step_rotary(table.cos, table.sin_signed, positions, hidden.dtype)  # once, for every layer
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rotary, kv_cache, metadata, backend)
        if residual is None:  # no layers
            return self.model.norm(hidden)
        return self.model.norm(hidden, residual)[0]

    def use_ops(self, ops) -> None:
        """Switch every module to another elementwise-op policy (benchmarks compare them in one process)."""
        self.ops = ops
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of a transformers checkpoint, by its name there, mapped to what it loads into:
        a parameter, or its rows of a merged one (the owning module's `checkpoint_rows`)."""
        tensors = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            owner, _, kind = name.rpartition(".")  # e.g. "model.layers.0.self_attn.qkv_proj", "weight"
            prefix, _, attr = owner.rpartition(".")
            parts = getattr(self.get_submodule(prefix), "checkpoint_rows", {}).get(attr, ())
            for part, start, end in parts:
                tensors[f"{prefix}.{part}.{kind}"] = param.data[start:end]
            if not parts:
                tensors[name] = param.data
        return tensors

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab_size]
        return self.lm_head(hidden)
