#!/usr/bin/env bash
# Engine benchmarks on the GPU machine (the `device` tool), Llama-3.1-8B shape, bf16, dummy weights.
#   PART=a bash scripts/gpu_bench.sh    paper workloads at 1,024 / 256 requests (~5 min on an H200)
#   PART=b bash scripts/gpu_bench.sh    6,400 shuffled requests; HF generate_batch side by side (~6 min)
#   PART=c bash scripts/gpu_bench.sh    the Qwen2.5-7B shape; the snippet-like workload (~5 min)
#   PART=d bash scripts/gpu_bench.sh    Triton ops against torch ops (+ GPU time per kernel kind);
#                                       the prefill attention launch sweep (~5 min)
#   PART=e bash scripts/gpu_bench.sh    asynchronous scheduling against synchronous: degree 16 with and
#                                       without sharing, degree 4 (~8 min)
#   PART=f bash scripts/gpu_bench.sh    the same on 6,400 shuffled requests; 16000/200 (~8 min)
#   PART=g bash scripts/gpu_bench.sh    the same on the decode-heavy mix; the Qwen2.5-7B shape (~5 min)
#   PART=h bash scripts/gpu_bench.sh    decode CUDA graphs against eager decode steps: small batches
#                                       and the decode-heavy mix on the Llama-3.2-1B and 3.1-8B shapes (~8 min)
#   PART=i bash scripts/gpu_bench.sh    the same on the paper workloads (degree 16 and 4, no sharing) (~8 min)
# Logs and JSON: $OUT/<run>.tgz (scripts/gpu_common.sh). Each `batchllm bench` measures the bf16 matmul peak first.
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" "bench_${PART:-a}"
MODEL=${MODEL:-benchmarks/configs/llama-3.1-8b}
common=(--model "$MODEL" --load-format dummy --dtype bfloat16 --max-model-len 20000 --max-num-batched-tokens 8192)
bench() { python3 -m batchllm.cli bench "${common[@]}" "$@" 2>&1 | grep -v Warning | tee -a "$OUT/bench.log"; pack; }
python3 -c 'import torch; print(torch.cuda.get_device_name(0))' | tee "$OUT/device.txt"
case "${PART:-a}" in
a)
  bench --workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100 \
      --configs sharing,sharing-plainattn,nosharing --json-out "$OUT/shared2000_200_deg16.json"
  bench --workload shared --shared 2000 --distinct 200 --degree 4 --requests 1024 --output 100 \
      --configs sharing --json-out "$OUT/shared2000_200_deg4.json"
  bench --workload shared --shared 16000 --distinct 200 --degree 16 --requests 256 --output 100 \
      --configs sharing,sharing-plainattn --json-out "$OUT/shared16000_200_deg16.json" \
      --profile-out "$OUT/profile_16k.txt" --profile-requests 64
  ;;
b)
  bench --workload shared --shared 2000 --distinct 200 --degree 16 --requests 6400 --output 100 \
      --configs sharing --json-out "$OUT/shared2000_200_deg16_n6400.json"
  bench --workload shared --shared 2000 --distinct 200 --degree 16 --requests 256 --output 100 \
      --configs sharing,nosharing --json-out "$OUT/shared2000_200_deg16_n256.json"
  timeout 300 python3 benchmarks/hf_generate_batch.py --model "$MODEL" --shared 2000 --distinct 200 --degree 16 \
      --requests 256 --output 100 --json-out "$OUT/hf_generate_batch_n256.json" 2>&1 | grep -v Warning \
      | tail -3 | tee -a "$OUT/bench.log"
  ;;
c)
  MODEL=benchmarks/configs/qwen2.5-7b
  common=(--model "$MODEL" --load-format dummy --dtype bfloat16 --max-model-len 20000 --max-num-batched-tokens 8192)
  bench --workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100 \
      --configs sharing --json-out "$OUT/qwen2.5-7b_shared2000_200_deg16.json"
  MODEL=benchmarks/configs/llama-3.1-8b
  common=(--model "$MODEL" --load-format dummy --dtype bfloat16 --max-model-len 20000 --max-num-batched-tokens 8192)
  timeout 300 python3 -m batchllm.cli bench "${common[@]}" --workload snippet --requests 8000 --output 100 \
      --configs sharing --json-out "$OUT/snippet_n8000.json" 2>&1 | grep -v Warning | tee -a "$OUT/bench.log"
  ;;
d)
  bench --workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100 \
      --configs sharing,sharing-torchops --json-out "$OUT/shared2000_200_deg16_ops.json" \
      --profile-out "$OUT/profile_deg16_torchops.txt" --profile-requests 256
  python3 benchmarks/attention_bench.py --prefill-sweep --json-out "$OUT/prefill_sweep.json" 2>&1 \
      | tee -a "$OUT/bench.log" | cut -c1-300
  ;;
e)
  bench --workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100 \
      --configs sharing,sharing-sync,nosharing,nosharing-sync --json-out "$OUT/shared2000_200_deg16.json"
  bench --workload shared --shared 2000 --distinct 200 --degree 4 --requests 1024 --output 100 \
      --configs sharing,sharing-sync --json-out "$OUT/shared2000_200_deg4.json"
  ;;
f)
  bench --workload shared --shared 2000 --distinct 200 --degree 16 --requests 6400 --output 100 \
      --configs sharing,sharing-sync --json-out "$OUT/shared2000_200_deg16_n6400.json"
  # twice each, alternating: a process's first run of a long-prompt workload meets new shapes
  bench --workload shared --shared 16000 --distinct 200 --degree 16 --requests 256 --output 100 \
      --configs sharing-sync,sharing,sharing-sync,sharing --json-out "$OUT/shared16000_200_deg16.json"
  ;;
g)
  bench --workload decodeheavy --shared 1000 --distinct 100 --degree 8 --requests 512 --min-output 100 \
      --max-output 1000 --configs sharing,sharing-sync --json-out "$OUT/decodeheavy_n512.json"
  MODEL=benchmarks/configs/qwen2.5-7b
  common=(--model "$MODEL" --load-format dummy --dtype bfloat16 --max-model-len 20000 --max-num-batched-tokens 8192)
  bench --workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100 \
      --configs sharing,sharing-sync --json-out "$OUT/qwen2.5-7b_shared2000_200_deg16.json"
  ;;
h)
  for MODEL in benchmarks/configs/llama-3.2-1b benchmarks/configs/llama-3.1-8b; do
    name=$(basename "$MODEL")
    common=(--model "$MODEL" --load-format dummy --dtype bfloat16 --max-model-len 20000 --max-num-batched-tokens 8192)
    for n in 8 64; do
      bench --workload shared --shared 1000 --distinct 100 --degree 8 --requests $n --output 400 \
          --configs sharing-eager,sharing,sharing-eager --json-out "$OUT/${name}_batch${n}.json"
    done
    bench --workload decodeheavy --shared 1000 --distinct 100 --degree 8 --requests 512 --min-output 100 \
        --max-output 1000 --configs sharing,sharing-eager --json-out "$OUT/${name}_decodeheavy_n512.json"
  done
  ;;
i)
  bench --workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100 \
      --configs sharing,sharing-eager,nosharing,nosharing-eager --json-out "$OUT/shared2000_200_deg16.json"
  bench --workload shared --shared 2000 --distinct 200 --degree 4 --requests 1024 --output 100 \
      --configs sharing,sharing-eager --json-out "$OUT/shared2000_200_deg4.json"
  ;;
esac
