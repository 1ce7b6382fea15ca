#!/usr/bin/env bash
# Device measurements for issues 14, 15 and 16 (one H200 each; on nvidia-h200-x2 give each PART its own
# GPU with CUDA_VISIBLE_DEVICES and run two at once). Logs and JSON go under $OUT (or ./gpu_out).
#   PART=fp8tests bash scripts/gpu_issues.sh   the FP8 GPU tests (weights, KV cache, fused KV store), the GEMM and
#                                              KV store benchmarks (~3 min)
#   PART=fp8paper bash scripts/gpu_issues.sh   bf16 / FP8 weights / FP8 KV cache / both, paper workload (~4 min)
#   PART=fp8decode bash scripts/gpu_issues.sh  the same four on the decode-heavy mix (~3 min)
#   PART=steps bash scripts/gpu_issues.sh      8,192 / 16,384 / 32,768-token steps on the 8B and 1B shapes (~5 min)
#   PART=structured TOKENIZER=dir bash scripts/gpu_issues.sh   structured-output cost (needs xgrammar) (~2 min)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
M8=(--model benchmarks/configs/llama-3.1-8b --load-format dummy --dtype bfloat16 --max-model-len 20000
    --max-num-batched-tokens 8192)
PAPER=(--workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100)
DECODE=(--workload decodeheavy --shared 1000 --distinct 100 --degree 8 --requests 512)
bench() { local log=$1; shift; python3 -m batchllm.cli bench "$@" > "$OUT/$log.log" 2>&1; grep -E "req/s|Error" "$OUT/$log.log"; }
case "${PART:-fp8tests}" in
fp8tests)
  python3 -m pytest -q -p no:cacheprovider tests/gpu -k "fp8 or kv_store" > "$OUT/fp8_tests.log" 2>&1; tail -3 "$OUT/fp8_tests.log"
  python3 benchmarks/fp8_gemm.py --json-out "$OUT/fp8_gemm.json" > "$OUT/fp8_gemm.log" 2>&1; cat "$OUT/fp8_gemm.log"
  python3 benchmarks/kv_store_bench.py --json-out "$OUT/kv_store.json" > "$OUT/kv_store.log" 2>&1; cat "$OUT/kv_store.log"
  ;;
fp8paper)
  bench fp8_paper "${M8[@]}" "${PAPER[@]}" --configs sharing,fp8,fp8kv,fp8w+kv --json-out "$OUT/fp8_paper.json"
  ;;
fp8decode)
  bench fp8_decode "${M8[@]}" "${DECODE[@]}" --configs sharing,fp8,fp8kv,fp8w+kv --json-out "$OUT/fp8_decode.json"
  ;;
steps)
  M8S=("${M8[@]:0:8}")  # the 8B shape without a step budget: each config sets its own
  bench steps_8b "${M8S[@]}" "${PAPER[@]}" --configs steps8k,steps16k,steps32k --json-out "$OUT/steps_8b.json"
  bench steps_1b --model benchmarks/configs/llama-3.2-1b --load-format dummy --dtype bfloat16 --max-model-len 20000 \
      "${DECODE[@]}" --configs steps8k,steps16k --json-out "$OUT/steps_1b_decode.json"
  ;;
structured)
  python3 benchmarks/structured_cost.py --model benchmarks/configs/llama-3.1-8b --tokenizer "$TOKENIZER" \
      --json-out "$OUT/structured.json" > "$OUT/structured.log" 2>&1; grep -v Warning "$OUT/structured.log" | tail -8
  ;;
esac
