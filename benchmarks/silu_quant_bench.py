"""SiLU-and-mul with its FP8 quantization fused (fp8_fused_quant) against the plain bf16 kernel, one
GPU, the intermediate widths of Llama-3.1-8B (14,336) and Llama-3.2-1B (8,192).

    python3 benchmarks/silu_quant_bench.py [--json-out FILE] [--rows 256,8192]   (on the device; < 1 minute)

Per width and row count, median microseconds (CUDA-graph replay, `do_bench_cudagraph`) and the bytes
moved per second (gate and up read in bf16, the float8 row and its scale written) of:
- bf16: the unfused SiLU-and-mul (no quantization; a bf16 row written), the bandwidth reference;
- whole: the fused kernel as the engine runs it, one program per whole row (16 warps for 8B's rows, 8 for 1B's),
  each element multiplied by the row's reciprocal scale (since session 23);
- whole w32: the same kernel launched with 32 warps (half the registers a thread holds);
- divide: a copy of it here (not the engine's) that divides every element by the scale (IEEE `div_rn`),
  the engine's arithmetic up to session 22, 1.47x slower there: its float8 values differ from the
  engine's at rounding ties (the share is printed).
(Session 22 also timed a two-pass kernel over chunks of 1,024-4,096 columns here: slower at every
size, and removed; docs/benchmarks.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from kernel_timing import bench_parser, start_on_gpu, timed, write_rows

from batchllm.layers.fp8 import _MIN_SCALE, FP8, FP8_MAX
from batchllm.layers.triton_ops import TritonOps, _silu_and_mul_kernel

WIDTHS = (14336, 8192)
ROWS = (16, 256, 1024, 4096, 8192)


@triton.jit
def _silu_and_mul_quant_dividing_kernel(GateUp, Out, Scale, stride_g, stride_o, n_cols, fp8_max, min_scale,
                                        BLOCK: tl.constexpr):
    """`triton_ops._silu_and_mul_kernel` with QUANT, but q = x / scale: a division an element."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate_raw = tl.load(GateUp + row * stride_g + cols, mask=mask, other=0.0)
    gate = gate_raw.to(tl.float32)
    up = tl.load(GateUp + row * stride_g + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    x = (gate / (1.0 + tl.exp(-gate)) * up).to(gate_raw.dtype).to(tl.float32)
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 0), fp8_max), min_scale)
    q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -fp8_max), fp8_max)
    tl.store(Out + row * stride_o + cols, q.to(Out.dtype.element_ty), mask=mask)
    tl.store(Scale + row, scale)


def launch(kernel, gate_up, q, scale, warps, quant=None):
    cols = q.shape[1]
    extra = () if quant is None else (gate_up, gate_up)  # the engine kernel's unused XScale, WScale
    flags = {} if quant is None else {"QUANT": quant, "SCALED": False}
    kernel[(gate_up.shape[0], 1)](gate_up, q, scale, *extra, gate_up.stride(0), q.stride(0), cols, FP8_MAX, _MIN_SCALE,
                                  BLOCK=triton.next_power_of_2(cols), num_warps=warps, **flags)


def run_case(rows: int, cols: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(rows)
    gate_up = torch.randn(rows, 2 * cols, generator=g, device="cuda", dtype=torch.bfloat16) * 3
    out16 = torch.empty(rows, cols, device="cuda", dtype=torch.bfloat16)
    q = torch.empty(rows, cols, device="cuda", dtype=FP8)
    scale = torch.empty(rows, 1, device="cuda", dtype=torch.float32)
    q2 = torch.empty_like(q)
    warps = max(4, min(16, triton.next_power_of_2(cols) // 1024))  # the engine's (`TritonOps._launch_silu`)
    variants = {"bf16": lambda: TritonOps._launch_silu(gate_up, out16),
                "whole": lambda: TritonOps._launch_silu(gate_up, q, scale),
                "whole w32": lambda: launch(_silu_and_mul_kernel, gate_up, q, scale, 32, quant=True),
                "divide": lambda: launch(_silu_and_mul_quant_dividing_kernel, gate_up, q2, scale, warps)}
    variants["divide"]()
    variants["whole"]()
    apart = (q.view(torch.uint8) != q2.view(torch.uint8)).float().mean().item()
    row = dict(rows=rows, cols=cols, divide_bytes_apart=apart)
    for name, fn in variants.items():  # gate and up read; a bf16 row, or a float8 row and its scale, written
        row[name] = timed(fn, rows * cols * (4 + (2 if name == "bf16" else 1)) + (0 if name == "bf16" else 4 * rows))
    return row


def main() -> None:
    args = bench_parser(__doc__, "--rows", ROWS, "row counts").parse_args()
    start_on_gpu("silu_quant_bench.py", "microseconds (GB/s)")
    results = []
    for cols in WIDTHS:
        for rows in map(int, args.rows.split(",")):
            r = run_case(rows, cols)
            results.append(r)
            cells = "  ".join(f"{name} {v['us']:8.1f} ({v['gbps']:5.0f})"
                              for name, v in r.items() if isinstance(v, dict))
            print(f"{cols:6d} x {rows:5d}: {cells}  divide apart {100 * r['divide_bytes_apart']:.4f}%", flush=True)
    write_rows(args.json_out, results)


if __name__ == "__main__":
    main()
