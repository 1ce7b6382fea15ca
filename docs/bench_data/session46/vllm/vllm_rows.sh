#!/usr/bin/env bash
# vLLM 0.26 on issue 14's rows (the prompts `batchllm bench` builds), its own default step budget, one process each.
# usage on the device, after /root/peer holds .peer0's part: bash .scratch/dev/vllm_rows.sh deg16 deg4 k16 noapc decode
set -uo pipefail
mkdir -p /tmp/site
[ -d /tmp/site/vllm ] || (cat /root/peer/vpart0 /root/peer/vpart1 .peerv2/vpart2 | xz -d -T16 | tar -x -C /tmp/site)
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0 NCCL_NVLS_ENABLE=0
P="--workload shared --shared 2000 --distinct 200 --requests 1024 --output 100"
for row in "$@"; do
  case $row in
    deg16) a="$P --degree 16";;
    deg4) a="$P --degree 4";;
    k16) a="--workload shared --shared 16000 --distinct 200 --degree 16 --requests 256 --output 100";;
    noapc) a="$P --degree 16 --no-apc";;
    decode) a="--workload decodeheavy --shared 1000 --distinct 100 --degree 8 --requests 512";;
    *) echo "unknown row $row"; continue;;
  esac
  t0=$(date +%s)
  timeout 280 python3 .peerbin/vllm_same.py $a --max-num-batched-tokens 0 > "$OUT/vllm_$row.log" 2>&1
  echo "$row rc=$? $(( $(date +%s) - t0 ))s $(grep VLLM_RESULT "$OUT/vllm_$row.log" || tail -3 "$OUT/vllm_$row.log")"
done
