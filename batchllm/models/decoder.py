"""The Llama-family decoder (Llama 2/3, Mistral, SmolLM2, Qwen2/2.5, Qwen3) over flattened tokens.

Parameter names equal the Hugging Face checkpoint names, so loading is a name-for-name copy.
Differences between architectures are `ArchitectureTraits` flags (q/k/v bias, q/k norm), not
subclasses. Inputs are the tokens of all scheduled sequences back to back: [num_tokens, ...].

Under tensor parallelism (`tp`, see `parallel/tensor_parallel.py`) the model is built from the
rank's shard spec: its own query/KV heads and intermediate rows (column-parallel q/k/v and gate/up),
row-parallel o_proj and down_proj, and a vocabulary-parallel embedding and LM head; `spec` is then
the shard's and `full_spec` the checkpoint's.

With `fp8=True` every linear layer of the decoder layers is an `Fp8Linear` (`layers/fp8.py`: float8
weights with per-output-channel scales), but those an FP8 checkpoint keeps in 16/32 bits (`keep_in_model_dtype`);
the embedding, norms, attention and LM head are unchanged.
Where such a layer `takes_quantized` (the fp8_fused_quant setting, on by default), the op before it (the two norms
for qkv_proj and gate_up_proj, SiLU-and-mul for down_proj: each their layer's only input) returns
its output quantized per token; the final norm before the LM head never does.
Where a layer `defers_scales` (the fp8_deferred_scales setting, `match_deferred_scales`), it hands its
unscaled product (an `Fp8Output`) to the op after it, which applies the scales: the rotation of q, k and
v for qkv_proj, the next add-and-norm for o_proj and down_proj, SiLU-and-mul for gate_up_proj.
"""

from __future__ import annotations

import torch
from torch import nn

from batchllm.attention.backend import AttentionBackend, AttentionMetadata
from batchllm.layers.fp8 import Fp8Input, Fp8Linear, Fp8Output, make_linear, match_fused_quant
from batchllm.layers.norm import RMSNorm
from batchllm.layers.ops import TorchOps
from batchllm.layers.rotary import RotaryEmbedding, StepRotary
from batchllm.layers.tp_layers import VocabParallelEmbedding
from batchllm.models.spec import ModelSpec


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, ops, tp, linear) -> None:
        super().__init__()
        t = spec.traits
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.scale = self.head_dim**-0.5
        h = spec.hidden_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, kv = self.q_size, self.kv_size
        self.qkv_proj = linear(h, q + 2 * kv, t.qkv_bias)  # q, k and v in one matmul
        self.checkpoint_rows = {"qkv_proj": (("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv))}
        """Rows of each merged parameter that a checkpoint tensor (by its module name) loads into."""
        self.o_proj = linear(self.num_heads * self.head_dim, h, t.o_bias, tp, row_parallel=True)
        if t.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, spec.rms_norm_eps, ops)
            self.k_norm = RMSNorm(self.head_dim, spec.rms_norm_eps, ops)
        else:
            self.q_norm = self.k_norm = None
        self.kv_scale: torch.Tensor | None = None
        """[2] float32 (k_scale, v_scale) of an fp8 KV cache, a row of the model's `kv_scales` (set
        by `DecoderForCausalLM.set_kv_scales`; not a buffer: it stays float32 whatever the model's
        dtype); read only when the cache is fp8."""

    def forward(
        self,
        hidden: torch.Tensor | Fp8Input,  # [num_tokens, hidden_size]
        rotary: StepRotary,  # or any callable rotating [num_tokens, heads, head_dim] (ops.step_rotary)
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q_and_k = self.num_heads + self.num_kv_heads
        rotated = isinstance(qkv, Fp8Output)
        if rotated:  # scales deferred (no q/k norm: they come before the rotation): applied with it, v's too
            assert self.q_norm is None, "qkv_proj defers its scales only without q/k norms"
            qkv = rotary.scale_and_rotate(qkv, q_and_k, self.head_dim)
        n = qkv.shape[0]
        v = qkv[:, self.q_size + self.kv_size:].view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:  # rotate q and k in one pass over their joint slice
            qk = qkv[:, :self.q_size + self.kv_size].view(n, q_and_k, self.head_dim)
            qk = qk if rotated else rotary(qk)
            q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        else:
            q = self.q_norm(qkv[:, :self.q_size].view(n, self.num_heads, self.head_dim))
            k = self.k_norm(qkv[:, self.q_size:self.q_size + self.kv_size].view(n, self.num_kv_heads, self.head_dim))
            q, k = rotary(q), rotary(k)
        out = backend.forward(q, k, v, kv_cache, metadata, self.scale, self.kv_scale)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, ops, tp, linear) -> None:
        super().__init__()
        self.ops = ops
        h, i, b = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_up_proj = linear(h, 2 * i, b)  # gate and up in one matmul
        self.checkpoint_rows = {"gate_up_proj": (("gate_proj", 0, i), ("up_proj", i, 2 * i))}
        self.down_proj = linear(i, h, b, tp, row_parallel=True)

    def forward(self, x: torch.Tensor | Fp8Input) -> torch.Tensor:
        quantize = getattr(self.down_proj, "takes_quantized", False)
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x), quantize))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, ops, tp, linear) -> None:
        super().__init__()
        self.self_attn = Attention(spec, ops, tp, linear)
        self.mlp = MLP(spec, ops, tp, linear)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)

    def forward(self, hidden, residual, rotary, kv_cache, metadata, backend) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden, residual) -> (this layer's MLP output, the residual stream before it): HF's
        residual adds, each carried into the next norm so the two run as one op. The residual
        stream is float32 whatever the model dtype (in float32 a no-op): rounding it to bfloat16 after
        every add doubled the bf16 logits' error against float32 (issue 20). A norm whose layer
        `takes_quantized` hands it an `Fp8Input`."""
        quant_qkv = getattr(self.self_attn.qkv_proj, "takes_quantized", False)
        quant_mlp = getattr(self.mlp.gate_up_proj, "takes_quantized", False)
        if residual is None:  # the first layer: the stream is the embeddings
            residual, hidden = hidden.to(torch.float32), self.input_layernorm(hidden, quantize=quant_qkv)
        else:
            hidden, residual = self.input_layernorm(hidden, residual, quant_qkv)
        hidden = self.self_attn(hidden, rotary, kv_cache, metadata, backend)
        hidden, residual = self.post_attention_layernorm(hidden, residual, quant_mlp)
        return self.mlp(hidden), residual


class DecoderBody(nn.Module):
    def __init__(self, spec: ModelSpec, ops, tp, vocab_rows: int, linear) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(vocab_rows, spec.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(spec, ops, tp, linear) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, ops)
        self.rotary: RotaryEmbedding | None = None
        """The float32 cos/sin tables: set by the loader once the model is on its device (`loader.build_model`),
        never made on the meta device the model is built on (torch runs a meta factory call through its reference
        implementations, whose first use imports the compiler stack: ~2-4 s of every engine's start)."""


class DecoderForCausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, ops=None, tp=None, fp8: bool = False) -> None:
        """ops: the elementwise-op policy (`layers/ops.py`); default TorchOps. tp: this rank's
        `TPGroup`, or None for the whole model in one process. fp8: every linear layer of the
        decoder layers is an `Fp8Linear` (embeddings, norms and the LM head keep the model dtype), until
        `keep_in_model_dtype` puts back the ones a checkpoint keeps unquantized."""
        from batchllm.parallel.tensor_parallel import local_vocab_size, shard_spec

        super().__init__()
        self.full_spec = spec
        self.tp = tp
        size = 1 if tp is None else tp.size
        self.spec = spec = shard_spec(spec, size)
        self.vocab_rows = local_vocab_size(spec.vocab_size, size)
        """Rows of the vocabulary this rank holds (the last rank's tail past vocab_size is padding)."""
        self.ops = ops or TorchOps()
        self.fp8_deferred_scales = False
        """The fp8_deferred_scales setting where `_scaled_mm` runs (`fp8.prepare_fp8` sets it)."""
        self.model = DecoderBody(spec, self.ops, tp, self.vocab_rows, make_linear(fp8))
        self.lm_head = nn.Linear(spec.hidden_size, self.vocab_rows, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def keep_in_model_dtype(self, quantizes) -> int:
        """Replace each decoder FP8 linear that `quantizes(its checkpoint name, its checkpoint parts)` (an
        `Fp8Scheme.quantizes`) says the checkpoint keeps in 16/32 bits by the plain layer of its shape, as vLLM
        leaves such layers unquantized. Call it before the weights are made (on the meta device); returns how
        many were replaced."""
        plain = make_linear(False)
        replaced = 0
        for i, layer in enumerate(self.model.layers):
            for group, owner in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
                for attr in ("qkv_proj", "o_proj") if group == "self_attn" else ("gate_up_proj", "down_proj"):
                    module = getattr(owner, attr)
                    parts = tuple(part for part, _, _ in getattr(owner, "checkpoint_rows", {}).get(attr, ()))
                    if isinstance(module, Fp8Linear) and not quantizes(f"model.layers.{i}.{group}.{attr}", parts):
                        out_features, in_features = module.weight.shape
                        setattr(owner, attr, plain(in_features, out_features, module.bias is not None, module.tp,
                                                   bool(module.tp_shard_dims)))
                        replaced += 1
        return replaced

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

    def set_kv_scales(self, scales: torch.Tensor) -> None:
        """scales: [num_layers, 4] float32, (k_scale, v_scale, unused, unused) per layer: each layer's
        attention reads its row's first two (a 16-byte aligned view, so one compiled Triton variant
        serves every layer). Written once, while the model is loaded; the views keep their
        addresses, so CUDA graphs read the loaded values."""
        if scales.shape != (len(self.model.layers), 4) or scales.dtype != torch.float32:
            raise ValueError(f"kv scales must be [{len(self.model.layers)}, 4] float32, got "
                             f"{list(scales.shape)} {scales.dtype}")
        self.kv_scales = scales
        for layer, row in zip(self.model.layers, scales):
            layer.self_attn.kv_scale = row[:2]

    def use_ops(self, ops) -> None:
        """Switch every module to another elementwise-op policy (benchmarks compare them in one process)."""
        self.ops = ops
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        match_fused_quant(self, ops)  # fused FP8 input quantization only where the new ops reproduce it
        self.match_deferred_scales()  # deferred FP8 scales only where the new ops apply them on load

    def match_deferred_scales(self, on: bool | None = None) -> None:
        """Set every FP8 layer's `defers_scales` (`layers/fp8.py`): with `on` (None: `fp8_deferred_scales`
        where the ops apply the scales on load, `scales_on_load`; True also forces it where the ops
        materialize the output, as CPU tests do), for the layers whose output goes straight to an op that
        applies the scales (`Fp8Linear.defers_for` also asks for no bias and no all-reduce): all four of a
        layer's, but qkv_proj where q and k are normed (the norms come first)."""
        if on is None:
            on = self.fp8_deferred_scales and self.ops.scales_on_load
        for layer in self.model.layers:
            attn = layer.self_attn
            for module in (attn.qkv_proj, attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
                if isinstance(module, Fp8Linear):
                    module.defers_scales = on and (module is not attn.qkv_proj or attn.q_norm is None)

    def checkpoint_tensors(self) -> dict[str, CheckpointTarget]:
        """Every tensor of a transformers checkpoint, by its name there, mapped to what it loads into:
        a parameter, or its rows of a merged one (the owning module's `checkpoint_rows`), and which
        slice of the checkpoint tensor this rank takes (merged rows and the LM head: along dim 0;
        a module's `tp_shard_dims` for the others; replicated otherwise)."""
        from batchllm.parallel.tensor_parallel import kv_shard

        rank, size = (0, 1) if self.tp is None else (self.tp.rank, self.tp.size)
        kv_block, kv_blocks = kv_shard(self.full_spec.num_kv_heads, rank, size)  # (KV heads may be replicated)
        tensors = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            owner, _, kind = name.rpartition(".")  # e.g. "model.layers.0.self_attn.qkv_proj", "weight"
            prefix, _, attr = owner.rpartition(".")
            parts = getattr(self.get_submodule(prefix), "checkpoint_rows", {}).get(attr, ())
            for part, start, end in parts:
                block, blocks = (kv_block, kv_blocks) if part in ("k_proj", "v_proj") else (rank, size)
                tensors[f"{prefix}.{part}.{kind}"] = CheckpointTarget(param.data[start:end], 0, block, blocks)
            if not parts:
                dim = getattr(self.get_submodule(owner), "tp_shard_dims", {}).get(kind)
                if name == "lm_head.weight":
                    dim = 0
                tensors[name] = CheckpointTarget(param.data, dim, rank, size)
        return tensors

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab_size]
        logits = self.lm_head(hidden)
        if self.tp is None:
            return logits
        return self.tp.all_gather_last_dim(logits)[:, : self.full_spec.vocab_size]


class CheckpointTarget:
    """Where one checkpoint tensor goes: `tensor` (a parameter or rows of one), and the slice of the
    checkpoint tensor this rank holds: along `shard_dim` (None: all of it), block `rank` of `size`
    blocks of tensor.shape[shard_dim] rows; a block past the checkpoint's end (vocabulary padding)
    is zero-filled."""

    __slots__ = ("tensor", "shard_dim", "rank", "size")

    def __init__(self, tensor: torch.Tensor, shard_dim: int | None, rank: int, size: int) -> None:
        self.tensor, self.shard_dim, self.rank, self.size = tensor, shard_dim, rank, size

    def full_shape(self, vocab_size: int | None = None) -> tuple[int, ...]:
        """The checkpoint tensor's shape (vocab_size: the true row count of a padded vocabulary)."""
        shape = list(self.tensor.shape)
        if self.shard_dim is not None:
            shape[self.shard_dim] = vocab_size if vocab_size is not None else shape[self.shard_dim] * self.size
        return tuple(shape)

    @torch.no_grad()
    def load(self, full: torch.Tensor) -> None:
        """Copy this rank's slice of the whole checkpoint tensor `full` into place."""
        if self.shard_dim is None:
            self.tensor.copy_(full)
            return
        local = self.tensor.shape[self.shard_dim]
        start = self.rank * local
        n = max(0, min(local, full.shape[self.shard_dim] - start))
        self.tensor.narrow(self.shard_dim, 0, n).copy_(full.narrow(self.shard_dim, start, n))
        if n < local:
            self.tensor.narrow(self.shard_dim, n, local - n).zero_()
