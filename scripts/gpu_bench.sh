#!/usr/bin/env bash
# Engine benchmarks on the GPU machine (the `device` tool), Llama-3.1-8B shape, bf16, dummy weights.
#   bash scripts/gpu_bench.sh         logs and JSON under $OUT (or ./gpu_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
MODEL=${MODEL:-benchmarks/configs/llama-3.1-8b}
common=(--model "$MODEL" --load-format dummy --dtype bfloat16 --max-model-len 20000 --max-num-batched-tokens 8192)
python3 -c 'import torch; print(torch.cuda.get_device_name(0))' | tee "$OUT/device.txt"
python3 - <<'PY' | tee "$OUT/matmul_peak.txt"
import torch, triton
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
ms = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
print(f"bf16 matmul peak (8192^3, random data): {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
PY
for deg in 16 4; do
  python3 -m batchllm.cli bench "${common[@]}" --workload shared --shared 2000 --distinct 200 --degree $deg \
      --requests 1024 --output 100 --configs sharing,nosharing --json-out "$OUT/shared2000_200_deg${deg}.json" \
      2>&1 | tee -a "$OUT/bench.log"
done
python3 -m batchllm.cli bench "${common[@]}" --workload decodeheavy --shared 1000 --distinct 100 --degree 8 \
    --requests 512 --configs sharing,order-prefill,order-fifo --json-out "$OUT/decodeheavy.json" \
    2>&1 | tee -a "$OUT/bench.log"
