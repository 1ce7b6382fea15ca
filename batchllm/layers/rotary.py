"""Rotary position embedding (rotate-half layout) with a precomputed cos/sin table.

Supported `rope_scaling` types: ROPE_TYPES (default, linear, llama3, yarn). The inverse frequencies (and
yarn's attention factor, which scales the cos/sin tables) are computed with the same float32 arithmetic as
transformers, so fp32 outputs match it exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from batchllm.models.spec import ROPE_TYPES, ModelLoadError, rope_type_of


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """The rotation's inverse frequencies [head_dim / 2] (float32) for `scaling`'s rope type."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    rope_type = rope_type_of(scaling)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    if rope_type == "yarn":
        return _yarn_inverse_frequencies(head_dim, theta, scaling)
    raise ModelLoadError(f"rope_scaling type {rope_type!r} is not supported ({', '.join(ROPE_TYPES)})")


def _yarn_inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN (arXiv 2309.00071; Qwen2.5's long-context setting): frequencies above the correction range kept,
    those below it divided by the factor, a linear ramp between; as transformers and vLLM compute them."""
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # (no singularity)
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(dtype=torch.float) / head_dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def attention_factor(scaling: dict | None) -> float:
    """What the cos/sin tables are multiplied by: yarn's attention_factor (given, or 0.1 ln(factor) + 1, with
    mscale / mscale_all_dim where both are given), 1.0 for the other types. As transformers computes it, the
    correctness oracle; vLLM 0.26 agrees where neither attention_factor nor mscale is given (Qwen2.5's yarn
    configs), and otherwise reads its own attn_factor instead."""
    if rope_type_of(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return float(mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"]))
    return mscale(factor)


class RotaryEmbedding(nn.Module):
    """float32 cos/sin tables for every position; the model's ops (`ops.py`) turn a step's positions into
    the rotation every layer applies (`step_rotary`)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = attention_factor(scaling)
        cos, sin = (emb.cos(), emb.sin()) if scale == 1.0 else (emb.cos() * scale, emb.sin() * scale)
        sin[:, : head_dim // 2] *= -1  # rotate_half(x) * sin == roll(x) * this (exactly: negation is exact)
        self.register_buffer("cos", cos, persistent=False)  # [max_positions, head_dim]
        self.register_buffer("sin_signed", sin, persistent=False)  # [max_positions, head_dim]


class StepRotary:
    """The rotation of one step's tokens: x * cos + rotate_half(x) * sin, with rotate_half(x) * sin
    computed as roll(x, head_dim / 2) * sin_signed (the same products as transformers), in float32
    with float32 tables, rounded once to x's dtype."""

    def __init__(self, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
        self.cos, self.sin_signed = cos, sin_signed  # [num_tokens, 1, head_dim] float32

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, heads, head_dim] -> a new tensor of the same shape and dtype."""
        x32 = x.to(torch.float32)
        return (x32 * self.cos + x32.roll(x.shape[-1] // 2, dims=-1) * self.sin_signed).to(x.dtype)

    def scale_and_rotate(self, qkv, rotated_heads: int, head_dim: int) -> torch.Tensor:
        """qkv: an FP8 layer's `Fp8Output` [num_tokens, heads * head_dim] (`ops.py`, deferred scales) ->
        its output [num_tokens, heads * head_dim] with the first `rotated_heads` heads (q's and k's)
        rotated, the others (v's) as they are."""
        out = qkv.scaled()
        n = out.shape[0]
        rotated = out[:, :rotated_heads * head_dim].view(n, rotated_heads, head_dim)
        out[:, :rotated_heads * head_dim] = self(rotated).view(n, rotated_heads * head_dim)
        return out
