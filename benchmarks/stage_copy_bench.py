"""What a staged fp16 copy of an fp8 cache's blocks costs (the staged prefill, `triton_backend.stage_blocks`):
the torch form session 22 used (commit `32f0042`, no end-to-end gain) against the engine's Triton gather
(session 23: 7.5x faster), one layer of Llama-3.1-8B's shape (8 KV heads, head dim 128), 64-token blocks with V
keys-major (`kv_quant.values_keys_major`), one GPU.

    python3 benchmarks/stage_copy_bench.py [--json-out FILE] [--blocks 75,300,1000]   (on the device; < 1 minute)

Per count of distinct blocks (300 ~ a paper-workload prefill step: ~19,000 keys), median microseconds
(CUDA-graph replay) and GB/s (fp8 read + fp16 written) of:
- torch: `index_select` of the blocks' bytes, then K and V cast to fp16, V through the transposing
  view (`layer_caches`): session 22's `stage_blocks` (commit 32f0042);
- triton: `stage_blocks`, one program per (block, KV head) reading K's [64 keys, head dim] rows and V's
  keys-major [head dim, 64 keys] tile whole, writing both as fp16 [64 keys, head dim] rows.
Both copies are checked equal first. The staged prefill can pay only where the copy costs less than
the casts it saves: about 0.7 ms a layer in each step that prefills, on the paper workload (0.49 s over
its 22 eager steps x 32 layers, `docs/benchmarks.md`, session 22).
"""

from __future__ import annotations

import torch
from kernel_timing import bench_parser, start_on_gpu, timed, write_rows

from batchllm.attention.kv_quant import layer_caches
from batchllm.attention.triton_backend import stage_blocks
from batchllm.layers.fp8 import FP8

KV_HEADS, HEAD_DIM, BLOCK_SIZE, POOL_BLOCKS = 8, 128, 64, 8192
BLOCKS = (75, 300, 1000)


def stage_torch(kv_cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`triton_backend.stage_blocks` as commit 32f0042 wrote it in torch."""
    raw = kv_cache.view(torch.uint8).index_select(1, blocks).view(kv_cache.dtype)
    staged = torch.empty(raw.shape, dtype=torch.float16, device=raw.device)
    keys, values = layer_caches(raw)
    staged[0].copy_(keys)
    staged[1].copy_(values)
    return staged


def run_case(n: int, cache: torch.Tensor) -> dict:
    g = torch.Generator(device=cache.device).manual_seed(n)
    blocks = torch.randperm(POOL_BLOCKS, generator=g, device=cache.device)[:n]
    want, got = stage_torch(cache, blocks), stage_blocks(cache, blocks)
    if not torch.equal(want.view(torch.int16), got.view(torch.int16)):
        raise SystemExit(f"{n} blocks: the Triton copy differs from the torch copy")
    moved = want.numel() * 3  # one fp8 byte read and two fp16 bytes written per value
    return dict(blocks=n, keys=n * BLOCK_SIZE, torch=timed(lambda: stage_torch(cache, blocks), moved),
                triton=timed(lambda: stage_blocks(cache, blocks), moved))


def main() -> None:
    args = bench_parser(__doc__, "--blocks", BLOCKS, "counts of distinct blocks").parse_args()
    start_on_gpu("stage_copy_bench.py", "one layer, microseconds (GB/s)")
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = torch.randint(0, 126, (2, POOL_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM), generator=g, device="cuda",
                          dtype=torch.uint8).view(FP8)  # finite e4m3 values (kv_quant: V keys-major in these bytes)
    rows = []
    for n in map(int, args.blocks.split(",")):
        r = run_case(n, cache)
        rows.append(r)
        print(f"{n:5d} blocks ({r['keys']:6d} keys): torch {r['torch']['us']:8.1f} ({r['torch']['gbps']:5.0f})  "
              f"triton {r['triton']['us']:8.1f} ({r['triton']['gbps']:5.0f})", flush=True)
    write_rows(args.json_out, rows)


if __name__ == "__main__":
    main()
