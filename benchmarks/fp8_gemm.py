"""FP8 row-wise `torch._scaled_mm` against bf16 `torch.mm` on Llama-3.1-8B's linear shapes (one GPU).

    python3 benchmarks/fp8_gemm.py [--json-out FILE] [--ms 0.2]      (on the device; < 1 minute on an H200)

Shapes (N x K, weight [N, K]): qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336, for
M (tokens) in 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384 (`--tokens` and `--layers` pick others). Per case,
median time (CUDA-event timing by triton.testing.do_bench when Triton is installed, else
torch.utils.benchmark) and TFLOP/s (2*M*N*K) of:
- bf16:        torch.mm(x, w.t()) in bfloat16;
- fp8 kernel:  torch._scaled_mm on already-quantized operands (float8_e4m3fn, row-wise float32 scales);
- fp8 total:   what `Fp8Linear` runs per call on CUDA: the per-token quantization of x (the Triton
               kernel of `layers/fp8_triton.py`) plus the kernel;
- fp8 tensor:  the kernel with one scale per tensor (unit scales: the row-wise scales would then be applied
               outside, e.g. in the consumer's kernel): whether cuBLAS's per-tensor-scaled kernels, which
               pick other tiles, are faster than its row-scaled one on these shapes (the "tens x" column:
               row-scaled time over this; the engine takes them up to `fp8.DEFERRED_SCALES_MAX_TOKENS`,
               deferring the scales; past 512 tokens the column moves around 1.0 between leases);
- fp8 swap-AB: the same product computed transposed, `_scaled_mm(w, x^T)` (the weight's N becomes the
               GEMM's M, so cuBLAS tiles the large dimension: what vLLM's CUTLASS kernels do for small
               M), then transposed back into a contiguous [M, N] (the copy included);
  and each kernel's weight-read rate (GB/s of the N x K float8 or bf16 weight: the bound of small-M
  matmuls);
and the max relative error of the fp8 output against the bf16 one (max |fp8 - bf16| / max |bf16|)
and its relative L2 error. Inputs are N(0, 1) activations and N(0, 0.02) weights.
"""

from __future__ import annotations

import argparse
import json

import torch

from batchllm.layers.fp8 import fp8_matmul, quantize_rows, unit_scaled_mm
from batchllm.layers.fp8_triton import quantize_rows_triton

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TOKENS = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def bench_ms(fn, ms: float) -> float:
    try:
        import triton

        return triton.testing.do_bench(fn, warmup=max(1, int(ms * 5)), rep=max(5, int(ms * 100)),
                                       return_mode="median")
    except ImportError:
        from torch.utils import benchmark

        return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=ms).median * 1e3


def run_case(name: str, n: int, k: int, m: int, ms: float) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02)
    wq, ws = quantize_rows(w)
    ws = ws.view(n)
    xq, xs = quantize_rows(x)
    ref = torch.mm(x, w.t())
    out = fp8_matmul(x, wq, ws, use_scaled_mm=True)
    t_bf16 = bench_ms(lambda: torch.mm(x, w.t()), ms)
    t_kernel = bench_ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, n),
                                                 out_dtype=torch.bfloat16), ms)
    t_total = bench_ms(lambda: fp8_matmul(x, wq, ws, use_scaled_mm=True, quantize=quantize_rows_triton), ms)

    def swapped():
        return torch._scaled_mm(wq, xq.t(), scale_a=ws.view(n, 1), scale_b=xs.view(1, m),
                                out_dtype=torch.bfloat16).t().contiguous()

    t_swap = bench_ms(swapped, ms)
    one = torch.ones((), device="cuda")
    t_tensor = bench_ms(lambda: unit_scaled_mm(xq, wq, one), ms)  # the engine's deferred-scales product
    flop = 2.0 * m * n * k
    diff = (out.float() - ref.float())
    swap_diff = float((swapped().float() - out.float()).abs().max() / out.float().abs().max())
    return dict(layer=name, M=m, N=n, K=k, bf16_ms=t_bf16, fp8_kernel_ms=t_kernel, fp8_total_ms=t_total,
                fp8_swap_ms=t_swap, fp8_tensorwise_ms=t_tensor, swap_vs_plain_max_rel=swap_diff,
                bf16_weight_gbps=2 * n * k / t_bf16 / 1e6, fp8_weight_gbps=n * k / t_kernel / 1e6,
                fp8_swap_weight_gbps=n * k / t_swap / 1e6,
                bf16_tflops=flop / t_bf16 / 1e9, fp8_kernel_tflops=flop / t_kernel / 1e9,
                fp8_total_tflops=flop / t_total / 1e9,
                max_rel_err=float(diff.abs().max() / ref.float().abs().max()),
                rel_l2_err=float(diff.norm() / ref.float().norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json-out", help="write the rows as JSON here")
    ap.add_argument("--ms", type=float, default=0.2, help="timing budget scale per measurement (default 0.2)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)),
                    help="comma-separated M (tokens) to time (default: %(default)s)")
    ap.add_argument("--layers", default=",".join(SHAPES), help="comma-separated layers (default: %(default)s)")
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    layers = args.layers.split(",")
    if unknown := set(layers) - set(SHAPES):
        raise SystemExit(f"unknown layers {sorted(unknown)}: choose from {', '.join(SHAPES)}")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("fp8_gemm.py needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    header = (f"{'layer':8} {'M':>5} {'N':>6} {'K':>6} | {'bf16':>7} {'fp8 mm':>7} {'fp8+q':>7} TFLOP/s | "
              f"{'mm x':>5} {'tot x':>5} | {'max rel':>8} {'rel L2':>8} | weight GB/s: {'bf16':>6} {'fp8':>6} "
              f"{'swap':>6} (swap x) | tens x")
    print(header)
    print("-" * len(header))
    rows = []
    for name in layers:
        n, k = SHAPES[name]
        for m in tokens:
            r = run_case(name, n, k, m, args.ms)
            rows.append(r)
            print(f"{name:8} {m:5d} {n:6d} {k:6d} | {r['bf16_tflops']:7.1f} {r['fp8_kernel_tflops']:7.1f} "
                  f"{r['fp8_total_tflops']:7.1f}         | {r['bf16_ms'] / r['fp8_kernel_ms']:5.2f} "
                  f"{r['bf16_ms'] / r['fp8_total_ms']:5.2f} | {r['max_rel_err']:8.4f} {r['rel_l2_err']:8.4f} | "
                  f"{'':13}{r['bf16_weight_gbps']:6.0f} {r['fp8_weight_gbps']:6.0f} {r['fp8_swap_weight_gbps']:6.0f} "
                  f"({r['fp8_kernel_ms'] / r['fp8_swap_ms']:.2f}) | {r['fp8_kernel_ms'] / r['fp8_tensorwise_ms']:.2f}",
                  flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
