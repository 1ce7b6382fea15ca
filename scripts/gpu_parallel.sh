#!/usr/bin/env bash
# Multi-GPU checks and benchmarks (issue 12) on the device, kind nvidia-h200-x2 (NCCL, NVLS off).
#   PART=t  bash scripts/gpu_parallel.sh   every GPU test (the 2-GPU ones included); bf16 TP=2 vs TP=1
#                                          agreement on the Llama-3.1-8B shape (~6 min)
#   PART=tp bash scripts/gpu_parallel.sh   TP=2 against TP=1 on the 8B shape; the Llama-3.1-70B shape
#                                          under TP=2 (~6 min)
#   PART=dp0 bash scripts/gpu_parallel.sh  DP=2 against DP=1: 2000/200 degree 16 (~3 min)
#   PART=dp bash scripts/gpu_parallel.sh   DP=2 against DP=1: 2000/200 degree 4, decode-heavy (~5 min)
#   PART=dp6400 bash scripts/gpu_parallel.sh   DP=2 against DP=1 on 6,400 shuffled requests (~5 min)
# Logs and JSON: $OUT/<run>.tgz (scripts/gpu_common.sh).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" "parallel_${PART:-t}"
M8=(--model benchmarks/configs/llama-3.1-8b --load-format dummy --dtype bfloat16 --max-model-len 20000
    --max-num-batched-tokens 8192)
bench() { python3 -m batchllm.cli bench "$@" 2>&1 | grep -v Warning | tee -a "$OUT/bench_${PART}.log"; pack; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
case "${PART:-t}" in
t)
  python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
  python3 benchmarks/tp_agreement.py --model benchmarks/configs/llama-3.1-8b --tp 2 \
      --json-out "$OUT/tp_agreement_8b.json" 2>&1 | grep -v Warning | tail -12
  ;;
tp)
  bench "${M8[@]}" --workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100 \
      --configs tp1,tp2 --json-out "$OUT/tp_8b_shared2000_deg16.json"
  bench --model benchmarks/configs/llama-3.1-70b --load-format dummy --dtype bfloat16 --max-model-len 8192 \
      --max-num-batched-tokens 8192 --workload shared --shared 2000 --distinct 200 --degree 16 --requests 512 \
      --output 100 --configs tp2 --json-out "$OUT/tp_70b_shared2000_deg16.json"
  ;;
dp0)
  bench "${M8[@]}" --workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100 \
      --configs dp1,dp2 --json-out "$OUT/dp_shared2000_deg16.json"
  ;;
dp)
  bench "${M8[@]}" --workload shared --shared 2000 --distinct 200 --degree 4 --requests 1024 --output 100 \
      --configs dp1,dp2 --json-out "$OUT/dp_shared2000_deg4.json"
  bench "${M8[@]}" --workload decodeheavy --shared 1000 --distinct 100 --degree 8 --requests 512 \
      --configs dp1,dp2 --json-out "$OUT/dp_decodeheavy.json"
  ;;
dp6400)
  bench "${M8[@]}" --workload shared --shared 2000 --distinct 200 --degree 16 --requests 6400 --output 100 \
      --configs dp1,dp2 --json-out "$OUT/dp_shared2000_deg16_n6400.json"
  ;;
esac
