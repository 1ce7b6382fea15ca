"""Attention kernels on the GPU: the Triton paged kernel against the torch reference backend.

    python3 benchmarks/attention_bench.py     (on the device; scripts/gpu_check.sh runs it)

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head dim 128), bf16, block size 16.
Prints the median time per call and the bandwidth over the KV bytes a call must read.
"""

from __future__ import annotations

import json

import torch
import triton

from batchllm.attention.torch_ref import TorchReferenceBackend
from batchllm.attention.triton_backend import TritonBackend
from tests.gpu.test_triton_attention import random_case


def bench(specs, label, reference=True):
    q, k, v, cache, md = random_case(specs, 32, 8, 128, 16, torch.bfloat16, seed=0)
    scale = 128 ** -0.5
    tri = TritonBackend()
    t_tri = triton.testing.do_bench(lambda: tri.forward(q, k, v, cache, md, scale), warmup=25, rep=200,
                                    return_mode="median")
    kv_bytes = sum(c + n for c, n in specs) * 2 * 8 * 128 * 2
    row = {"case": label, "triton_ms": round(t_tri, 4), "kv_read_GBps": round(kv_bytes / t_tri / 1e6, 1)}
    if reference:
        ref = TorchReferenceBackend()
        t_ref = triton.testing.do_bench(lambda: ref.forward(q, k, v, cache, md, scale), warmup=5, rep=50,
                                        return_mode="median")
        row.update(reference_ms=round(t_ref, 3), speedup=round(t_ref / t_tri, 1))
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    bench([(4000, 1)] * 64, "decode 64 x 4000 ctx")
    bench([(16000, 1)] * 16, "decode 16 x 16000 ctx")
    bench([(2000, 1)] * 256, "decode 256 x 2000 ctx")
    bench([(0, 2048)], "prefill 2048")
    bench([(2000, 200)] * 16, "suffix prefill 16 x 200 after 2000", reference=True)
