"""Owns every device tensor: weights, KV cache, per-step inputs, sampling state."""
