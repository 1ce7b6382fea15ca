"""The KV store per layer: torch's (`backend.store_kv`: per K and per V a quantize and an index_copy_)
against the fused Triton kernel (`attention/kv_store_triton.py`), Llama-3.1-8B's shape (32 query
heads, 8 KV heads, head dim 128), one GPU.

    python3 benchmarks/kv_store_bench.py [--json-out FILE] [--tokens 16,256,8192] [--block-size 16]
        [--runs]   (on the device; < 1 minute)

--block-size 64 gives an fp8 cache keys-major V (`kv_quant.values_keys_major`, the default layout);
--runs lays the slots out as a prefill's: runs of consecutive slots (200 tokens per sequence) in
shuffled blocks, instead of distinct scattered slots.

Per token count (16 = a decode batch, 8,192 = a prefill step) and cache type (bf16, fp8 with scales
as the model holds them), median microseconds of:
- eager: back-to-back calls (`triton.testing.do_bench`), launch costs included, as eager steps pay;
- graph: replays of a CUDA graph of one call (`do_bench_cudagraph`), GPU time alone, as decode
  graphs pay;
and the bytes moved per second by the fused kernel (K/V read in bf16 + written in the cache type).
Slots are distinct: scattered over a 262,144-slot pool (decode's layout), or with --runs in a prefill's
runs (which matters: an fp8 cache of 64-token blocks took 99 us for 8,192 tokens in runs, 208 us
scattered, on an H200 in session 22). Every case first checks that both stores leave the same bytes.
"""

from __future__ import annotations

import torch
from kernel_timing import bench_parser, start_on_gpu, time_us, write_rows

from batchllm.attention.backend import store_kv
from batchllm.attention.kv_store_triton import store_kv_triton
from batchllm.layers.fp8 import FP8

HEADS, KV_HEADS, HEAD_DIM, POOL_SLOTS, RUN = 32, 8, 128, 262_144, 200
TOKENS = (16, 64, 256, 1024, 2048, 4096, 8192)


def prefill_slots(n: int, block_size: int, g: torch.Generator) -> torch.Tensor:
    """n slots in runs of RUN tokens, each run from the start of its own shuffled blocks."""
    blocks = torch.randperm(POOL_SLOTS // block_size, generator=g, device="cuda")
    per_run = -(-RUN // block_size)
    runs = [blocks[i * per_run:(i + 1) * per_run, None] * block_size + torch.arange(block_size, device="cuda")
            for i in range(-(-n // RUN))]
    return torch.cat([r.flatten()[:RUN] for r in runs])[:n]


def make_case(n: int, cache_dtype: torch.dtype, block_size: int, runs: bool):
    """(k, v, cache, slots, kv_scale): k and v views of one bf16 qkv buffer, as the model passes them."""
    g = torch.Generator(device="cuda").manual_seed(n)
    qkv = torch.randn(n, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    k = qkv[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(n, KV_HEADS, HEAD_DIM)
    v = qkv[:, (HEADS + KV_HEADS) * HEAD_DIM:].view(n, KV_HEADS, HEAD_DIM)
    shape = (2, POOL_SLOTS // block_size, block_size, KV_HEADS, HEAD_DIM)
    cache = torch.zeros(shape, dtype=torch.uint8 if cache_dtype == FP8 else cache_dtype, device="cuda")
    slots = prefill_slots(n, block_size, g) if runs else torch.randperm(POOL_SLOTS, generator=g, device="cuda")[:n]
    kv_scale = torch.tensor([0.37, 1.9, 0.0, 0.0], device="cuda")[:2] if cache_dtype == FP8 else None
    return k, v, cache.view(cache_dtype), slots, kv_scale


def run_case(n: int, cache_dtype: torch.dtype, block_size: int, runs: bool) -> dict:
    k, v, cache, slots, kv_scale = make_case(n, cache_dtype, block_size, runs)
    check = cache.clone()
    store_kv(k, v, check, slots, kv_scale)
    store_kv_triton(k, v, cache, slots, kv_scale)
    if not torch.equal(cache.view(torch.uint8), check.view(torch.uint8)):
        raise SystemExit(f"{n} tokens, {cache_dtype}: the fused store differs from the torch store")
    stores = {"torch": lambda: store_kv(k, v, cache, slots, kv_scale),
              "fused": lambda: store_kv_triton(k, v, cache, slots, kv_scale)}
    row = dict(tokens=n, cache=str(cache_dtype).removeprefix("torch."), block_size=block_size, runs=runs)
    for mode in ("eager", "graph"):
        for name, store in stores.items():
            row[f"{name}_{mode}_us"] = time_us(store, mode == "graph")
    moved = 2 * n * KV_HEADS * HEAD_DIM * (k.element_size() + cache.element_size())
    row["fused_graph_gbps"] = moved / row["fused_graph_us"] / 1e3
    return row


def main() -> None:
    ap = bench_parser(__doc__, "--tokens", TOKENS, "token counts")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per cache block (64: fp8 V keys-major)")
    ap.add_argument("--runs", action="store_true", help="slots in a prefill's runs, not scattered")
    args = ap.parse_args()
    start_on_gpu("kv_store_bench.py", f"microseconds per layer (K and V); {args.block_size}-token blocks, "
                 f"slots {'in runs' if args.runs else 'scattered'}")
    header = (f"{'cache':14} {'tokens':>6} | {'torch':>8} {'fused':>8} {'x':>5} (eager) | "
              f"{'torch':>8} {'fused':>8} {'x':>5} (graph) | {'GB/s':>6}")
    print(header)
    print("-" * len(header))
    rows = []
    for cache_dtype in (torch.bfloat16, FP8):
        for n in map(int, args.tokens.split(",")):
            r = run_case(n, cache_dtype, args.block_size, args.runs)
            rows.append(r)
            print(f"{r['cache']:14} {n:6d} | {r['torch_eager_us']:8.1f} {r['fused_eager_us']:8.1f} "
                  f"{r['torch_eager_us'] / r['fused_eager_us']:5.2f}         | {r['torch_graph_us']:8.1f} "
                  f"{r['fused_graph_us']:8.1f} {r['torch_graph_us'] / r['fused_graph_us']:5.2f}         | "
                  f"{r['fused_graph_gbps']:6.0f}", flush=True)
    write_rows(args.json_out, rows)


if __name__ == "__main__":
    main()
