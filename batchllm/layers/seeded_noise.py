"""Exponential noise for seeded sampling, counter-based: the noise of one (seed, position, token) is a
hash of the three, so every seeded row of a step is drawn by one call, whatever the batch holds.

The sampler draws a token as argmax(p / E) with E ~ Exp(1) per vocabulary entry (`sampler._draw`).
Unseeded rows share the engine's generator; a seeded row's E must depend on its seed alone, not on
its neighbours. A `torch.Generator` per request did that with one `exponential_` per row per step,
which on a GPU is a kernel launch per seeded row (thousands a step for a small model's batch).
Here instead:

  key(seed, position) = mix(mix(mix(seed_lo) ^ seed_hi ^ KEY_SALT) ^ position)    (per row, on the host)
  h = mix(key ^ mix(token + TOKEN_SALT)),  u = ((h >> 9) + 1/2) / 2^23,  E = -log(u)

with `mix` the lowbias32 integer finalizer (full avalanche: each input bit flips each output bit
with probability ~1/2), seed the request's seed modulo 2^64 and position the index of the token the
row samples. So a request's draws are the same in any batch, after a preemption, and on either
path below; n > 1 completions differ through their seeds (seed + k). u lies in (0, 1) on a grid of
2^-23 (E <= 16.6).

Two implementations of the same integers, both in wrapping uint32 arithmetic: `seeded_exponential_host`
(numpy, a chunk of rows at a time: the CPU's, ~10x faster there than `exponential_` over the same
rows) and a Triton kernel (CUDA). Their noise differs only by the rounding of float32 `log`.
"""

from __future__ import annotations

import numpy as np
import torch

from batchllm.layers.transfer import to_device

MASK32 = 0xFFFFFFFF
KEY_SALT = 0x9E3779B9
TOKEN_SALT = 0x632BE5AB
_M1, _M2 = 0x7FEB352D, 0x846CA68B
"""lowbias32's multipliers (Chris Wellons' hash-prospector)."""
_UNIT = 2.0 ** -23


def _mix_array(x: np.ndarray) -> np.ndarray:
    """lowbias32 (the docstring's `mix`), in place over a uint32 array (numpy's uint32 products wrap, its
    shifts are logical)."""
    x ^= x >> 16
    np.multiply(x, np.uint32(_M1), out=x)
    x ^= x >> 15
    np.multiply(x, np.uint32(_M2), out=x)
    x ^= x >> 16
    return x


def row_keys(seeds: list[int], positions: list[int]) -> np.ndarray:
    """The uint32 key of each seeded row (the docstring's `key`) from its request's seed (any int; taken
    modulo 2^64) and the position of the token it samples, in numpy: a step's thousands of seeded
    rows cost the host one pass, not a Python hash per row."""
    wide = np.array([s & ((1 << 64) - 1) for s in seeds], dtype=np.uint64)
    low, high = (wide & np.uint64(MASK32)).astype(np.uint32), (wide >> np.uint64(32)).astype(np.uint32)
    key = _mix_array(_mix_array(low) ^ high ^ np.uint32(KEY_SALT))
    key ^= (np.asarray(positions, dtype=np.int64) & MASK32).astype(np.uint32)
    return _mix_array(key)


_CHUNK_ELEMENTS = 1 << 18
"""Values hashed at a time on the host (rows of the vocabulary, at least one): their uint32
temporaries (1 MiB) stay in cache, ~10x faster than the whole [m, vocab] at once."""


def seeded_exponential_host(keys: np.ndarray, vocab: int) -> torch.Tensor:
    """E [m, vocab] float32 (CPU) for the row keys [m] (uint32), in numpy, a chunk of rows at a time."""
    if keys.dtype != np.uint32:  # (wider keys would stop the products wrapping at 32 bits)
        raise TypeError(f"row keys must be uint32, got {keys.dtype}")
    tokens = _mix_array(np.arange(vocab, dtype=np.uint32) + np.uint32(TOKEN_SALT))
    out = np.empty((len(keys), vocab), dtype=np.float32)
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, len(keys), rows):
        h = _mix_array(keys[start:start + rows, None] ^ tokens[None, :])
        u = (h >> 9).astype(np.float32)
        u += np.float32(0.5)
        u *= np.float32(_UNIT)
        np.log(u, out=u)
        np.negative(u, out=out[start:start + rows])
    return torch.from_numpy(out)


def seeded_exponential(seeds: list[int], positions: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """E [len(seeds), vocab] float32 on `device`: row i's noise for its seed and the position of the
    token it samples. One Triton kernel on CUDA (where Triton is installed), numpy on the host
    elsewhere."""
    keys = row_keys(seeds, positions)
    if device.type == "cuda":
        try:
            from batchllm.layers.seeded_noise_triton import seeded_exponential_triton
        except ImportError:
            pass
        else:
            return seeded_exponential_triton(to_device(keys.astype(np.int64), device), vocab)
    noise = seeded_exponential_host(keys, vocab)
    return noise if device.type == "cpu" else to_device(noise.numpy(), device)
