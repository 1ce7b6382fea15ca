"""What the kernel micro-benchmarks (`kv_store_bench.py`, `silu_quant_bench.py`, `stage_copy_bench.py`)
share: one call's median time on the GPU, and their JSON output."""

from __future__ import annotations

import json

import torch


def time_us(fn, graph: bool = True) -> float:
    """Median microseconds of `fn()` after one warm-up call: replays of a CUDA graph of one call (GPU
    time alone, as decode graphs pay) or, with graph=False, back-to-back eager calls (launch costs
    included, as eager steps pay)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def timed(fn, moved_bytes: int) -> dict:
    """{"us": `time_us(fn)`, "gbps": the bytes `fn` moves per second, in GB/s}."""
    us = time_us(fn)
    return dict(us=us, gbps=moved_bytes / us / 1e3)


def write_rows(path: str | None, rows: list[dict]) -> None:
    """The rows as JSON at `path` (nothing where None), with the device and torch they came from."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
