#!/usr/bin/env bash
# Run on the GPU machine (the `device` tool), from the repository root:
#   bash scripts/gpu_check.sh            logs in $OUT/<RUN or check>.tgz (scripts/gpu_common.sh)
# 1. the GPU tests (kernels against the torch reference, engine Triton vs reference);
# 2. the attention, FP8 GEMM and KV store micro-benchmarks; 3. a short engine benchmark on the Llama-3.1-8B shape.
# The device image has torch, Triton and transformers; batchllm runs from the tree (PYTHONPATH).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" "${RUN:-check}"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' >> "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
# TESTS: pytest arguments (default: the whole GPU suite), e.g. to split it over two GPUs; T: seconds for them.
# tests/gpu/test_structured_gpu.py needs xgrammar and a tokenizer, which the device lacks: carry xgrammar's wheels
# (.whl, installed into PYTHONPATH first, as the device README says) and the default model's tokenizer files
# (.tok/smol) with BATCHLLM_TEST_TOKENIZER_DIR=.tok/smol; without them it skips.
timeout "${T:-3000}" python3 -m pytest -q -p no:cacheprovider --durations=10 ${TESTS:-tests/gpu} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || status=1
pack
summary=$(tail -1 "$OUT/gpu_tests.log")  # pytest's last line; a timeout leaves none with "passed"
[[ $summary == *" passed"* && $summary != *failed* && $summary != *error* ]] || status=1
[ "${SKIP_BENCH:-0}" = 1 ] && exit $status
python3 benchmarks/attention_bench.py --json-out "$OUT/attention_bench.json" 2>&1 | tee "$OUT/attention_bench.log"; pack
python3 benchmarks/fp8_gemm.py --json-out "$OUT/fp8_gemm.json" 2>&1 | tee "$OUT/fp8_gemm.log"; pack
python3 benchmarks/kv_store_bench.py --json-out "$OUT/kv_store_bench.json" 2>&1 | tee "$OUT/kv_store_bench.log"; pack
python3 -m batchllm.cli bench --model benchmarks/configs/llama-3.1-8b --load-format dummy --dtype bfloat16 \
    --max-model-len 20000 --workload shared --shared 2000 --distinct 200 --degree 16 \
    --requests "${BENCH_REQUESTS:-256}" --output 100 --configs sharing,nosharing \
    --max-num-batched-tokens 8192 --json-out "$OUT/engine_bench.json" 2>&1 | tee "$OUT/engine_bench.log"
exit $status
