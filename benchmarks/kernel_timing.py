"""What the kernel micro-benchmarks (`kv_store_bench.py`, `silu_quant_bench.py`, `stage_copy_bench.py`)
share: their command line's common part, the GPU check and header, one call's median time on the GPU,
and their JSON output."""

from __future__ import annotations

import argparse
import json

import torch


def bench_parser(doc: str, counts: str, default: tuple[int, ...], what: str) -> argparse.ArgumentParser:
    """A parser described by the first line of the script's `doc`, with --json-out and `counts` (e.g.
    "--rows"): comma-separated integers (`what`), `default` by default; the script adds its own."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--json-out", help="write the rows as JSON here")
    ap.add_argument(counts, default=",".join(map(str, default)), help=f"comma-separated {what}")
    return ap


def start_on_gpu(script: str, header: str) -> None:
    """Exit naming `script` without a CUDA GPU; else print the device, torch and the `header`."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {header}")


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
