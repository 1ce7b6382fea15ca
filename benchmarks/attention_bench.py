"""Attention kernels on the GPU, side by side in one process.

    python3 benchmarks/attention_bench.py [--json-out FILE]    (on the device; scripts/gpu_check.sh runs it)

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head dim 128), bf16, block size 16.
Prints the median time per call (KV store + attention + merge) and, per case:
- the Triton kernel against the torch reference backend;
- prefix-shared attention (groups) against plain paged attention (`use_prefix_groups=False`) on the
  same inputs, and split-K against no split;
- a sweep of group size x shared length: where attending a group as a group starts to pay.
With --prefill-sweep: only the launch settings of steps with prefill chunks, in TFLOP/s.
With --decode-sweep: only the decode steps of the decode-heavy workload (`batchllm bench --workload
decodeheavy`), per tile of the one-query and prefix launches (`TritonBackend(decode_tile=...)`) and with
split-K per launch (`split_per_launch`), in GB/s of distinct KV read; the last line names the best.
With --decode-sweep-fp8: the same tiles and a few wider ones over an fp8 cache.
With --decode-sweep-64: the same tiles over 64-token blocks of a bf16 cache (loaded by TMA, as the engine
does on Hopper), on the decode-heavy steps and a decode step of the 16K workload.
With --decode-sweep-fp8-64 / --decode-sweep-fp8-128: tiles over an fp8 cache of 64-token blocks (the fp8
default) / of 128-token blocks, the same steps.
With --fp8-layout: the decode-heavy steps and the prefill cases over bf16 and fp8 caches of 16- and
64-token blocks (an fp8 cache of 64-token blocks keeps V keys-major), with and without FP8 attention.
With --launch-order: the prefill cases, a mixed step and the decode-heavy steps with each launch's items
in plan order and longest key range first (the default).
With --tma: the prefill cases, a mixed step and the decode-heavy steps on 16-token blocks, 64-token blocks,
and 64-token blocks whose tiles load K and V by TMA (`TritonBackend(tma=)`); the fresh chunk also at GQA 8
and head dim 64, beside torch SDPA.
With --tma-launches: the prefill cases and a mixed step under several prefill launches whose tiles load by TMA
(rows, keys per tile, warps, stages; 128-key tiles over 128-token blocks), against the default.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import triton

from batchllm.attention.kv_quant import quantize_cache
from batchllm.attention.torch_ref import TorchReferenceBackend
from batchllm.attention.triton_backend import DECODE_TILE, TileConfig, TritonBackend, decode_tile_for, tma_by_default
from batchllm.bench import decode_heavy_workload
from batchllm.layers.fp8 import FP8
from tests.attention_cases import group_decode, random_case

NO_SPLIT = 10**9
rows = []


def graph_ms(fn, rep=20):
    """Median ms of `fn` replayed from a CUDA graph (`triton.testing.do_bench_cudagraph`), after the
    device has finished all queued work: Triton's helper runs its first call on a new stream without
    waiting for the default one, so inputs still being written there (a case's tensors, a work plan's
    copy to the device) would be read half-made. That race, over memory a previous case had freed,
    was the "illegal address" of `--fp8-layout`'s prefill cases (sessions 12-13; compute-sanitizer
    placed it at the kernel's query load, from a stale token index)."""
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")


def time_ms(backend, case, reps=200):
    q, k, v, cache, md = case
    scale = 128 ** -0.5

    md.backend_cache.clear()  # the work plan is built by the first call, as by a step's first layer
    backend.forward(q, k, v, cache, md, scale)
    if isinstance(backend, TorchReferenceBackend):
        return triton.testing.do_bench(lambda: backend.forward(q, k, v, cache, md, scale), warmup=5, rep=reps,
                                       return_mode="median")
    # replayed from a CUDA graph: GPU time only, without the Python launch cost of a lone layer
    return graph_ms(lambda: backend.forward(q, k, v, cache, md, scale), rep=reps)


def plan_ms(case, backend):
    """CPU time to plan the step (once per step, shared by all layers)."""
    md = case[4]
    start = time.perf_counter()
    for _ in range(5):
        md.backend_cache.clear()
        backend._plan(md, 4, 32, 128, 8)
    return (time.perf_counter() - start) / 5 * 1e3


def kv_bytes(specs):
    return sum(s[0] + s[1] for s in specs) * 2 * 8 * 128 * 2


def report(row):
    rows.append(row)
    print(json.dumps(row), flush=True)


def versus_reference(specs, label):
    case = random_case(specs, 32, 8, 128, 16, torch.bfloat16, seed=0)
    t_tri = time_ms(TritonBackend(), case)
    t_ref = time_ms(TorchReferenceBackend(), case, reps=50)
    report({"case": label, "triton_ms": round(t_tri, 4), "reference_ms": round(t_ref, 3),
            "speedup": round(t_ref / t_tri, 1), "kv_read_GBps": round(kv_bytes(specs) / t_tri / 1e6, 1)})


def shared_versus_plain(specs, label, **options):
    """Prefix-shared attention against plain paged attention."""
    case = random_case(specs, 32, 8, 128, 16, torch.bfloat16, seed=0)
    t_plain = time_ms(TritonBackend(use_prefix_groups=False), case)
    t_shared = time_ms(TritonBackend(**options), case)
    report({"case": label, "prefix_shared_ms": round(t_shared, 4), "plain_paged_ms": round(t_plain, 4),
            "speedup": round(t_plain / t_shared, 2), "plan_cpu_ms": round(plan_ms(case, TritonBackend()), 3)})


def split_versus_whole(specs, label):
    case = random_case(specs, 32, 8, 128, 16, torch.bfloat16, seed=0)
    t_split = time_ms(TritonBackend(), case)
    t_whole = time_ms(TritonBackend(split_len=NO_SPLIT), case)
    report({"case": label, "split_k_ms": round(t_split, 4), "no_split_ms": round(t_whole, 4),
            "speedup": round(t_whole / t_split, 2), "kv_read_GBps": round(kv_bytes(specs) / t_split / 1e6, 1)})


def causal_flops(specs, heads=32, head_dim=128):
    """2 matmuls x 2 flops per multiply-add over every (query, visible key) pair."""
    return sum(4 * heads * head_dim * (n * c + n * (n + 1) // 2) for c, n in specs)


PREFILL_CASES = [
    ([(0, 8192)], "prefill chunk: 8192 new tokens"),
    ([(8192, 8192)], "prefill chunk: 8192 new after 8192 cached (16K prefix)"),
    ([(2000, 200)] * 40, "suffix prefill: 40 x 200 after 2000"),
    ([(16000, 200)] * 40, "suffix prefill: 40 x 200 after 16000"),
]


def prefill_sweep():
    """Mixed-step launch settings (rows, keys per tile, warps, stages) on prefill chunks, with torch's
    SDPA (flash, contiguous K/V, no paging) on the first case as a yardstick."""
    import torch.nn.functional as F

    q = torch.randn(1, 32, 8192, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 8, 8192, 128, device="cuda", dtype=torch.bfloat16)
    sdpa = graph_ms(lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True))
    report({"case": "torch SDPA, causal 8192 (contiguous)", "ms": round(sdpa, 4),
            "TFLOPs": round(causal_flops([(0, 8192)]) / sdpa / 1e9, 1)})
    relative: dict[tuple, float] = {}  # per launch: the sum over cases of its time over the case's best
    all_timings = []
    for specs, label in PREFILL_CASES:
        case = random_case(specs, 32, 8, 128, 16, torch.bfloat16, seed=0)
        timings = {}
        for launch in [(64, 64, 4, 2), *itertools.product((128, 256), (64, 128), (4, 8), (2, 3, 4))]:
            try:
                timings[launch] = time_ms(TritonBackend(prefill_launch=launch), case, reps=100)
            except Exception as error:  # e.g. out of shared memory: not a candidate
                print(f"{launch}: {type(error).__name__}", flush=True)
        all_timings.append(timings)
        best = min(timings, key=timings.get)
        default = TritonBackend().prefill_launch_for(False)
        report({"case": label, "best": list(best), "best_ms": round(timings[best], 4),
                "best_TFLOPs": round(causal_flops(specs) / timings[best] / 1e9, 1),
                "default_ms": round(timings[default], 4),
                "all_ms": {"x".join(map(str, k)): round(v, 4)
                           for k, v in sorted(timings.items(), key=lambda kv: kv[1])}})
        for launch, t in timings.items():
            relative[launch] = relative.get(launch, 0.0) + t / timings[best]
    everywhere = [launch for launch in relative if all(launch in t for t in all_timings)]
    overall = min(everywhere, key=relative.get)
    report({"case": "overall best launch (least summed time relative to each case's best)",
            "launch": ",".join(map(str, overall)), "mean_relative": round(relative[overall] / len(PREFILL_CASES), 3)})


DECODE_TILES = [DECODE_TILE, *(TileConfig(*t) for t in [(32, 4, 2), (32, 2, 3), (64, 4, 3), (64, 4, 4), (64, 2, 2),
                                                           (64, 8, 2), (128, 4, 2), (128, 8, 2), (128, 4, 3)])]
DECODE_TILES_FP8 = [TileConfig(*t) for t in [(128, 8, 3), (128, 4, 4), (256, 8, 2), (256, 4, 2), (64, 2, 4)]]


def decode_heavy_steps(positions=(100, 250, 400, 550, 700, 850, 950), requests=512, shared=1000, own=100):
    """Decode steps of `batchllm bench --workload decodeheavy` (its requests, groups and output
    lengths; all admitted at once, as in the engine's run): at output position t, every request still
    running, with its prompt and t - 1 outputs cached; groups share their `shared` positions."""
    workload = decode_heavy_workload(requests, 128256, shared, own, 8, 100, 1000)
    group_ids: dict[tuple, int] = {}
    groups = [group_ids.setdefault(tuple(p[:shared]), len(group_ids)) for p in workload.prompts]
    for t in positions:
        running = [i for i, n in enumerate(workload.max_tokens) if n >= t]
        yield t, [(shared + own + t - 1, 1, groups[i], shared) for i in running]


def distinct_kv_bytes(specs, element_bytes=2):
    """K and V read once: each group's shared positions once, every sequence's own positions."""
    shared = {(g, share) for _, _, g, share in specs if g >= 0}
    tokens = sum(c + n - (share if g >= 0 else 0) for c, n, g, share in specs) + sum(s for _, s in shared)
    return tokens * 2 * 8 * 128 * element_bytes


def decode_step_cases(block_size=16):
    """`decode_heavy_steps` as (t, specs, case) on the device, the Llama-3.1-8B attention shape, bf16."""
    return [(t, specs, random_case(specs, 32, 8, 128, block_size, torch.bfloat16, seed=0))
            for t, specs in decode_heavy_steps()]


def time_decode_steps(cases, label, backend, fp8=False):
    """One row: each step's time (one layer) and GB/s of distinct KV, over the bf16 cache or its fp8
    copy; returns the summed time over the sampled steps (a proxy for the run's attention time)."""
    times = []
    for _, _, (q, k, v, cache, md) in cases:
        times.append(time_ms(backend, (q, k, v, quantize_cache(cache) if fp8 else cache, md), reps=100))
    report({"case": f"decode-heavy steps: {label}", "sum_ms": round(sum(times), 4),
            **{f"t{t}_n{len(specs)}": f"{ms:.4f} ms {distinct_kv_bytes(specs, 1 if fp8 else 2) / ms / 1e6:.0f} GB/s"
               for (t, specs, _), ms in zip(cases, times)}})
    return sum(times)


def sweep_tiles(cases, fp8: bool) -> dict:
    """Each of DECODE_TILES (and, over the fp8 copy of the cache, DECODE_TILES_FP8) over the decode
    steps: tile -> summed ms."""
    totals = {}
    for tile in DECODE_TILES + (DECODE_TILES_FP8 if fp8 else []):
        try:
            label = f"tile {tile.block_n}x{tile.num_warps}w{tile.num_stages}s" + (", fp8 cache" if fp8 else "")
            totals[tile] = time_decode_steps(cases, label, TritonBackend(decode_tile=tile), fp8=fp8)
        except Exception as error:  # e.g. out of shared memory: not a candidate
            print(f"{tile}: {type(error).__name__}: {str(error)[:200]}", flush=True)
    return totals


def decode_sweep():
    """The decode-heavy workload's decode steps per decode tile, then the best tile with split-K per
    launch, without prefix-shared attention, and over an fp8 cache; the last row names the best."""
    cases = decode_step_cases()
    totals = sweep_tiles(cases, fp8=False)
    best = min(totals, key=totals.get)
    split = time_decode_steps(cases, "best tile, split-K per launch",
                              TritonBackend(decode_tile=best, split_per_launch=True))
    plain = time_decode_steps(cases, "best tile, prefix-shared attention off",
                              TritonBackend(decode_tile=best, use_prefix_groups=False))
    fp8 = time_decode_steps(cases, "best tile, fp8 cache", TritonBackend(decode_tile=best), fp8=True)
    report({"case": "decode sweep best", "tile": [best.block_n, best.num_warps, best.num_stages],
            "split_per_launch": split < totals[best], "default_sum_ms": round(totals[DECODE_TILE], 4),
            "best_sum_ms": round(min(split, totals[best]), 4),
            "gain": round(totals[DECODE_TILE] / min(split, totals[best]), 3),
            "plain_sum_ms": round(plain, 4), "fp8_cache_sum_ms": round(fp8, 4)})


def decode_sweep_fp8():
    """The same tiles (and a few wider ones) over the fp8 cache: its bytes per key are half, so its
    best tile may differ; against the bf16 cache at the default tile."""
    cases = decode_step_cases()
    bf16 = time_decode_steps(cases, "default tile, bf16 cache", TritonBackend())
    totals = sweep_tiles(cases, fp8=True)
    best = min(totals, key=totals.get)
    report({"case": "fp8-cache decode sweep best", "tile": [best.block_n, best.num_warps, best.num_stages],
            "default_sum_ms": round(totals[DECODE_TILE], 4), "best_sum_ms": round(totals[best], 4),
            "gain": round(totals[DECODE_TILE] / totals[best], 3), "bf16_default_sum_ms": round(bf16, 4),
            "best_vs_bf16": round(bf16 / totals[best], 3)})


def fp8_cache_rows():
    """The decode-heavy steps at the default tile over a bf16 cache, an fp8 cache and an fp8 cache with
    FP8 attention; then PREFILL_CASES the same three ways (ms and TFLOP/s)."""
    cases = decode_step_cases()
    bf16 = time_decode_steps(cases, "default tile, bf16 cache", TritonBackend())
    fp8 = time_decode_steps(cases, "default tile, fp8 cache", TritonBackend(), fp8=True)
    fp8_dots = time_decode_steps(cases, "default tile, fp8 cache, FP8 attention", TritonBackend(fp8_attention=True),
                                 fp8=True)
    report({"case": "decode-heavy steps, default tile: against the bf16 cache",
            "fp8_cache_speedup": round(bf16 / fp8, 3), "fp8_attention_speedup": round(bf16 / fp8_dots, 3)})
    for specs, label in PREFILL_CASES:
        report({"case": f"{label}: bf16 cache / fp8 cache / fp8 cache + FP8 attention",
                **prefill_cache_ways(specs, label, 16)})


def prefill_cache_ways(specs, label, block_size, key_prefix=""):
    """One prefill case on caches of `block_size`-token blocks: bf16, its fp8 copy read directly and
    through the staged fp16 copy (the default where that copy loads by TMA: Hopper, 64-token blocks),
    and the fp8 copy with FP8 attention, as {key_prefix + name: "ms TFLOP/s"}; each timing named
    first (a fault's place)."""
    q, k, v, cache, md = random_case(specs, 32, 8, 128, block_size, torch.bfloat16, seed=0)
    fp8_cache = quantize_cache(cache)
    row = {}
    for name, backend, kv in (("bf16", TritonBackend(), cache),
                              ("fp8", TritonBackend(stage_fp8_prefill=False), fp8_cache),
                              ("fp8_staged", TritonBackend(), fp8_cache),
                              ("fp8_attention", TritonBackend(fp8_attention=True), fp8_cache)):
        print(f"timing {label}, {block_size}-token blocks, {name}", flush=True)
        ms = time_ms(backend, (q, k, v, kv, md), reps=100)
        row[key_prefix + name] = f"{ms:.4f} ms {causal_flops(specs) / ms / 1e9:.0f} TFLOP/s"
    return row


def fp8_layout_rows():
    """The decode-heavy steps, then PREFILL_CASES, over a bf16 cache, an fp8 cache and an fp8 cache with
    FP8 attention, on 16-token blocks and on 64-token ones (where the fp8 cache keeps V keys-major:
    `kv_quant.values_keys_major`), each at the decode tile the engine gives that cache
    (`decode_tile_for`); ms, and GB/s of distinct KV or TFLOP/s."""
    for block_size in (16, 64):
        cases = decode_step_cases(block_size)
        for label, kv_dtype, options in (("bf16 cache", torch.bfloat16, {}), ("fp8 cache", FP8, {}),
                                         ("fp8 cache + FP8 attention", FP8, dict(fp8_attention=True))):
            tile = decode_tile_for(kv_dtype, block_size, torch.bfloat16, 128)
            time_decode_steps(cases, f"{label}, {block_size}-token blocks", TritonBackend(decode_tile=tile, **options),
                              fp8=kv_dtype == FP8)
        del cases
    for specs, label in PREFILL_CASES:
        report({"case": f"{label}: per block size, bf16 cache / fp8 cache / fp8 cache + FP8 attention",
                **{key: ms for block_size in (16, 64)
                   for key, ms in prefill_cache_ways(specs, label, block_size, f"bs{block_size}_").items()}})


LAUNCH_ORDER_CASES = PREFILL_CASES + [
    ([(0, 2000)] * 3 + [(2000, 200)] * 10, "mixed step: 3 x 2000 new + 10 x 200 after 2000"),
]


def launch_order_rows():
    """Each launch's items in plan order against longest key range first (`TritonBackend(longest_first=)`),
    timed plan order, longest first, plan order again (the machine drifts): the prefill cases and a
    mixed step on 16- and 64-token blocks, then the decode-heavy steps."""
    for specs, label in LAUNCH_ORDER_CASES:
        for block_size in (16, 64):
            case = random_case(specs, 32, 8, 128, block_size, torch.bfloat16, seed=0)
            plan, lpt, plan2 = (time_ms(TritonBackend(longest_first=first), case, reps=100)
                                for first in (False, True, False))
            report({"case": f"{label}, {block_size}-token blocks: plan order / longest first",
                    "plan_ms": [round(plan, 4), round(plan2, 4)], "longest_first_ms": round(lpt, 4),
                    "longest_first_TFLOPs": round(causal_flops(specs) / lpt / 1e9, 1),
                    "speedup": round(min(plan, plan2) / lpt, 3)})
            del case
    cases = decode_step_cases()
    plan = time_decode_steps(cases, "plan order", TritonBackend(longest_first=False))
    lpt = time_decode_steps(cases, "longest first", TritonBackend())
    report({"case": "decode-heavy steps: plan order / longest first", "speedup": round(plan / lpt, 3)})


TMA_SHAPES = [  # (query heads, KV heads, head dim): Llama-3.1-8B (GQA 4); GQA 8 (as Llama-3.1-70B:
    # 64 heads, 8 KV heads); head dim 64 (as Llama-3.2-1B: 32 heads, 8 KV heads)
    (32, 8, 128), (64, 8, 128), (32, 8, 64),
]


def sdpa_ms(specs, heads, kv_heads, head_dim, rep=50):
    """torch SDPA (contiguous K/V; on an H200 it picks cuDNN) on a single fresh causal prefill: the yardstick."""
    import torch.nn.functional as F

    [(cached, new)] = specs
    q = torch.randn(1, heads, new, head_dim, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, kv_heads, new, head_dim, device="cuda", dtype=torch.bfloat16)
    return graph_ms(lambda: F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True), rep=rep)


def tma_rows():
    """Tiles loaded by TMA against the same kernel without it: each prefill case and a mixed step
    (Llama-3.1-8B's attention shape; the fresh 8,192-token chunk also at GQA 8 and head dim 64, with
    torch SDPA beside it) on 16-token blocks (no TMA: tiles span blocks), 64-token blocks without TMA
    and with it (each at its default prefill launch); then the decode-heavy steps the same three ways."""
    ways = (("bs16", 16, None), ("bs64", 64, False), ("bs64_tma", 64, None))
    cases = [(specs, label, TMA_SHAPES[0]) for specs, label in LAUNCH_ORDER_CASES]
    cases += [(PREFILL_CASES[0][0], PREFILL_CASES[0][1], shape) for shape in TMA_SHAPES[1:]]
    for specs, label, (heads, kv_heads, head_dim) in cases:
        row, times = {"case": f"{label}, {heads}/{kv_heads} heads x {head_dim}: 16-token blocks / 64 / 64 + TMA"}, {}
        flops = causal_flops(specs, heads, head_dim)
        for name, block_size, tma in ways:
            case = random_case(specs, heads, kv_heads, head_dim, block_size, torch.bfloat16, seed=0)
            times[name] = time_ms(TritonBackend(tma=tma), case, reps=100)
            row[name] = f"{times[name]:.4f} ms {flops / times[name] / 1e9:.0f} TFLOP/s"
            del case
        if len(specs) == 1 and specs[0][0] == 0:
            sdpa = sdpa_ms(specs, heads, kv_heads, head_dim)
            row["torch_sdpa"] = f"{sdpa:.4f} ms {flops / sdpa / 1e9:.0f} TFLOP/s"
        report({**row, "tma_vs_bs16": round(times["bs16"] / times["bs64_tma"], 3),
                "tma_vs_bs64": round(times["bs64"] / times["bs64_tma"], 3)})
    sums = {}
    for name, block_size, tma in ways:
        sums[name] = time_decode_steps(decode_step_cases(block_size), f"{name}", TritonBackend(tma=tma))
    report({"case": "decode-heavy steps: 16-token blocks / 64 / 64 + TMA",
            "tma_vs_bs16": round(sums["bs16"] / sums["bs64_tma"], 3),
            "tma_vs_bs64": round(sums["bs64"] / sums["bs64_tma"], 3)})


TMA_LAUNCHES = (  # (cache block size, prefill launch: rows, keys per tile, warps, stages)
    (64, (128, 64, 4, 3)),  # the engine's default on Hopper (TMA_PREFILL_LAUNCH): first, each block size's reference
    (64, (128, 64, 4, 2)), (64, (128, 64, 4, 4)), (64, (128, 64, 8, 3)), (64, (64, 64, 4, 3)),
    (128, (128, 128, 8, 3)), (128, (128, 64, 4, 3)),
)


def tma_launch_rows():
    """Prefill launches whose tiles load by TMA, against the default (TMA_PREFILL_LAUNCH over 64-token blocks): the
    prefill cases and a mixed step (Llama-3.1-8B's attention), each launch's time and its largest difference from the
    output of the first launch over the same block size (a case's random values depend on its block size); 128-key
    tiles over 128-token blocks. A launch that fails to compile is reported as such."""
    for specs, label in LAUNCH_ORDER_CASES:
        flops = causal_flops(specs)
        row, times, references = {"case": label}, {}, {}
        for block_size, launch in TMA_LAUNCHES:
            name = f"bs{block_size}_{'x'.join(map(str, launch))}"
            case = random_case(specs, 32, 8, 128, block_size, torch.bfloat16, seed=0)
            backend = TritonBackend(prefill_launch=launch)
            try:
                q, k, v, cache, md = case
                md.backend_cache.clear()
                out = backend.forward(q, k, v, cache, md, 128 ** -0.5).float()
                times[name] = time_ms(backend, case, reps=100)
            except Exception as e:  # noqa: BLE001 - a launch that does not compile is a result too
                row[name] = f"failed: {type(e).__name__}: {str(e)[:160]}"
                continue
            finally:
                torch.cuda.synchronize()
            diff = (out - references.setdefault(block_size, out)).abs().max().item()
            row[name] = f"{times[name]:.4f} ms {flops / times[name] / 1e9:.0f} TFLOP/s, max diff {diff:.2e}"
            del case
        default = times.get("bs64_128x64x4x3")
        if default:
            row["best"] = min(times, key=times.get)
            row["best_vs_default"] = round(default / times[row["best"]], 3)
        report(row)


TMA_FP8_WAYS = (  # (name, cache, TritonBackend options): the bf16 default, then the fp8 cache itself without and with
    # TMA (not through the staged copy, which `prefill_cache_ways` times)
    ("bf16_tma", "bf16", dict(tma=None)), ("fp8", "fp8", dict(tma=False, stage_fp8_prefill=False)),
    ("fp8_tma", "fp8", dict(tma=True, stage_fp8_prefill=False)),
    ("fp8attn", "fp8", dict(tma=False, fp8_attention=True)), ("fp8attn_tma", "fp8", dict(tma=True, fp8_attention=True)),
    ("fp8attn_tma_128x64x4x4", "fp8", dict(tma=True, fp8_attention=True, prefill_launch=(128, 64, 4, 4))),
    ("fp8attn_tma_256x64x8x3", "fp8", dict(tma=True, fp8_attention=True, prefill_launch=(256, 64, 8, 3))),
)


def tma_fp8_rows():
    """An fp8 cache of 64-token blocks (V keys-major) with its unmasked tiles loaded by TMA, against the
    same cache without TMA and against the bf16 cache's default (64 + TMA): the prefill cases and a mixed
    step (cast up, and with FP8 attention at a few prefill launches), then the decode-heavy steps."""
    for specs, label in LAUNCH_ORDER_CASES:
        q, k, v, cache, md = random_case(specs, 32, 8, 128, 64, torch.bfloat16, seed=0)
        caches = {"bf16": cache, "fp8": quantize_cache(cache)}
        row = {"case": f"{label}: bf16 + TMA / fp8 cache without and with TMA, FP8 attention"}
        times, flops = {}, causal_flops(specs)
        for name, kind, options in TMA_FP8_WAYS:
            print(f"timing {label}, {name}", flush=True)
            times[name] = time_ms(TritonBackend(**options), (q, k, v, caches[kind], md), reps=100)
            row[name] = f"{times[name]:.4f} ms {flops / times[name] / 1e9:.0f} TFLOP/s"
        report({**row, "fp8_tma_vs_fp8": round(times["fp8"] / times["fp8_tma"], 3),
                "fp8_tma_vs_bf16_tma": round(times["bf16_tma"] / times["fp8_tma"], 3),
                "fp8attn_tma_vs_bf16_tma": round(times["bf16_tma"] / times["fp8attn_tma"], 3)})
        del q, k, v, cache, md, caches
    cases = decode_step_cases(64)
    sums = {name: time_decode_steps(cases, name, TritonBackend(**options), fp8=kind == "fp8")
            for name, kind, options in TMA_FP8_WAYS[:3]}
    report({"case": "decode-heavy steps, 64-token blocks: fp8 cache with TMA against without, and bf16 + TMA",
            "fp8_tma_vs_fp8": round(sums["fp8"] / sums["fp8_tma"], 3),
            "fp8_tma_vs_bf16_tma": round(sums["bf16_tma"] / sums["fp8_tma"], 3)})


def decode_steps_and_16k(block_size: int) -> list:
    """`decode_step_cases` on `block_size`-token blocks plus one decode step of the 16K workload (256
    sequences in groups of 16 sharing 16,000 positions, 250 own), labelled "16k"."""
    specs = degree16(256, 16000, 250)
    return [*decode_step_cases(block_size), ("16k", specs, random_case(specs, 32, 8, 128, block_size, torch.bfloat16,
                                                                       seed=0))]


def decode_sweep_blocks64():
    """The decode tiles (DECODE_TILES) over a bf16 cache of 64-token blocks, whose tiles load by TMA
    (the Hopper default), on the decode-heavy steps and on one decode step of the 16K workload (256
    sequences in groups of 16 sharing 16,000 positions, 250 own); the last row names the best tile."""
    totals = sweep_tiles(decode_steps_and_16k(64), fp8=False)
    best = min(totals, key=totals.get)
    report({"case": "decode sweep best, 64-token blocks (TMA)", "tile": [best.block_n, best.num_warps, best.num_stages],
            "default_sum_ms": round(totals[DECODE_TILE], 4), "best_sum_ms": round(totals[best], 4),
            "gain": round(totals[DECODE_TILE] / totals[best], 3)})


DECODE_TILES_FP8_BLOCKS = {  # block size: the tiles swept over an fp8 cache of such blocks
    64: [DECODE_TILE, *(TileConfig(*t) for t in [(64, 4, 3), (64, 4, 4), (64, 2, 2), (64, 2, 3), (64, 2, 4), (64, 8, 2),
                                                  (64, 8, 3), (32, 4, 3), (32, 2, 3), (128, 4, 3)])],
    128: [TileConfig(*t) for t in [(64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 2), (128, 8, 3)]],
}


def decode_sweep_fp8_blocks(block_size: int):
    """The decode tiles over an fp8 cache of `block_size`-token blocks (V keys-major; 64: the engine's fp8
    default), on the decode-heavy steps and a decode step of the 16K workload, against a bf16 cache as the
    engine runs it (64-token blocks, its tile and TMA where available: `decode_tile_for`); the last row
    names the best tile. (Session 24's 64-block rows timed the bf16 cache at DECODE_TILE, 64x4x2.)"""
    tma = tma_by_default(torch.bfloat16, torch.device("cuda"), 128)
    bf16_tile = decode_tile_for(torch.bfloat16, 64, torch.bfloat16, 128, tma=tma)
    bf16 = time_decode_steps(decode_steps_and_16k(64), "engine's tile, bf16 cache",
                             TritonBackend(decode_tile=bf16_tile))
    cases = decode_steps_and_16k(block_size)
    totals = {}
    for tile in DECODE_TILES_FP8_BLOCKS[block_size]:
        label = f"tile {tile.block_n}x{tile.num_warps}w{tile.num_stages}s, fp8 cache of {block_size}-token blocks"
        try:
            totals[tile] = time_decode_steps(cases, label, TritonBackend(decode_tile=tile), fp8=True)
        except Exception as error:  # e.g. out of shared memory: not a candidate
            print(f"{tile}: {type(error).__name__}: {str(error)[:200]}", flush=True)
    best = min(totals, key=totals.get)
    first = DECODE_TILES_FP8_BLOCKS[block_size][0]
    report({"case": f"fp8-cache decode sweep best, {block_size}-token blocks",
            "tile": [best.block_n, best.num_warps, best.num_stages], "first_tile_sum_ms": round(totals[first], 4),
            "best_sum_ms": round(totals[best], 4), "gain": round(totals[first] / totals[best], 3),
            "bf16_default_sum_ms": round(bf16, 4), "best_vs_bf16": round(bf16 / totals[best], 3)})


def degree16(num_requests, shared, own):
    return [s for g in range(num_requests // 16) for s in group_decode(16, shared, own, group=g)]


ONLY_RUNS = {  # flag: (what it runs instead of the default rows, its help)
    "--prefill-sweep": (prefill_sweep, "only the mixed-step launch sweep"),
    "--decode-sweep": (decode_sweep, "only the decode-heavy decode-tile sweep"),
    "--decode-sweep-fp8": (decode_sweep_fp8, "only the decode-tile sweep over an fp8 cache"),
    "--decode-sweep-64": (decode_sweep_blocks64, "only the decode-tile sweep over a bf16 cache of 64-token blocks "
                          "(TMA), on the decode-heavy steps and a 16K decode step"),
    "--decode-sweep-fp8-64": (lambda: decode_sweep_fp8_blocks(64), "only the decode-tile sweep over an fp8 cache of "
                              "64-token blocks (the fp8 default), on the decode-heavy steps and a 16K decode step"),
    "--decode-sweep-fp8-128": (lambda: decode_sweep_fp8_blocks(128), "the same over an fp8 cache of 128-token blocks "
                               "(the engine's with block_size 128: 128-key tiles lie whole in a block)"),
    "--decode-fp8-cache": (fp8_cache_rows, "only the decode-heavy steps at the default tile: bf16 cache, fp8 cache, "
                           "FP8 attention; then the prefill cases the same three ways"),
    "--fp8-layout": (fp8_layout_rows, "only the decode-heavy steps and prefill cases over bf16 and fp8 caches of 16- "
                     "and 64-token blocks (the latter's fp8 V keys-major), with and without FP8 attention"),
    "--launch-order": (launch_order_rows, "only the prefill cases and decode-heavy steps with each launch's items in "
                       "plan order and longest first"),
    "--tma": (tma_rows, "only the prefill cases, a mixed step and the decode-heavy steps on 16-token blocks, 64-token "
              "blocks, and 64-token blocks whose tiles load by TMA"),
    "--tma-launches": (tma_launch_rows, "only the prefill cases and a mixed step under prefill launches whose tiles "
                       "load by TMA (rows, keys, warps, stages; 128-key tiles over 128-token blocks)"),
    "--tma-fp8": (tma_fp8_rows, "only the prefill cases, a mixed step and the decode-heavy steps over an fp8 cache of "
                  "64-token blocks with and without TMA (and FP8 attention), against the bf16 default"),
}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--json-out", default=None)
    for flag, (_, help_text) in ONLY_RUNS.items():
        parser.add_argument(flag, action="store_true", help=help_text)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(0), flush=True)
    only = [run for flag, (run, _) in ONLY_RUNS.items() if getattr(args, flag[2:].replace("-", "_"))]
    if only:
        for run in only:
            run()
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(rows, f, indent=1)
        raise SystemExit(0)
    versus_reference([(4000, 1)] * 64, "decode 64 x 4000 ctx")
    versus_reference([(2000, 1)] * 256, "decode 256 x 2000 ctx")
    versus_reference([(0, 2048)], "prefill 2048")
    versus_reference([(2000, 200)] * 16, "suffix prefill 16 x 200 after 2000")
    shared_versus_plain(group_decode(64, 4000, 0), "decode: 4000-token prefix shared by 64")
    shared_versus_plain(group_decode(64, 4000, 100), "decode: 4000-token prefix shared by 64, +100 own")
    shared_versus_plain(degree16(256, 16000, 200), "decode: 16000/200 degree 16, 256 requests")
    shared_versus_plain(degree16(1024, 2000, 200), "decode: 2000/200 degree 16, 1024 requests")
    shared_versus_plain(degree16(64, 2000, 200), "decode: 2000/200 degree 16, 64 requests")
    for specs, label in [(group_decode(64, 4000, 100), "4000-token prefix shared by 64, +100 own"),
                         (degree16(1024, 2000, 200), "2000/200 degree 16, 1024 requests")]:
        case = random_case(specs, 32, 8, 128, 16, torch.bfloat16, seed=0)
        report({"case": f"split-K length sweep: {label}",
                **{f"split_{n}_ms": round(time_ms(TritonBackend(split_len=n), case), 4)
                   for n in (512, 1024, 2048, NO_SPLIT)}})
    split_versus_whole([(16000, 1)] * 16, "decode 16 x 16000 ctx")
    split_versus_whole([(16000, 1)] * 64, "decode 64 x 16000 ctx")
    split_versus_whole([(4000, 1)] * 64, "decode 64 x 4000 ctx")
    for members in (2, 4, 16):
        for shared in (64, 256, 1024):
            specs = [s for g in range(1024 // members) for s in group_decode(members, shared, 100, group=g)]
            shared_versus_plain(specs, f"sweep 1024 decodes, groups of {members}, shared {shared}, own 100",
                                min_members=1, min_shared=1)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)
