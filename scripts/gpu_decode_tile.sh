#!/usr/bin/env bash
# The decode attention of the decode-heavy workload (issues 14, 16), on nvidia-h200-x2, ~6 min:
#   bash scripts/gpu_decode_tile.sh     logs in $OUT/decode_tile.tgz (scripts/gpu_common.sh)
# 1. GPU 1: the decode-tile sweep (`attention_bench.py --decode-sweep`: the workload's decode steps per tile of
#    the one-query and prefix launches, then split-K per launch); GPU 0 meanwhile: the 64-token-block engine
#    GPU tests, and the decode-heavy bench at the default tile.
# 2. The sweep's best (tile, and split-K per launch if it won) written into a copy of the tree, then the engine's
#    decode-heavy run on the default and on that copy, one process each, in both orders (one order per GPU).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" decode_tile
ROOT=$PWD ALT=/tmp/alt_tree
BENCH=(--model benchmarks/configs/llama-3.1-8b --load-format dummy --dtype bfloat16 --max-model-len 20000
       --workload decodeheavy --shared 1000 --distinct 100 --degree 8 --requests 512 --configs sharing)
bench() {  # tree, GPU, log name
  (cd "$1" && CUDA_VISIBLE_DEVICES=$2 PYTHONPATH=$1 timeout "${T:-150}" python3 -m batchllm.cli bench "${BENCH[@]}" \
      --json-out "$OUT/$3.json") > "$OUT/$3.log" 2>&1
  grep -E "req/s|Error" "$OUT/$3.log" | sed "s/^/$3: /"
}
(CUDA_VISIBLE_DEVICES=1 timeout 330 python3 benchmarks/attention_bench.py --decode-sweep \
    --json-out "$OUT/decode_sweep.json" > "$OUT/decode_sweep.log" 2>&1; tail -3 "$OUT/decode_sweep.log") &
(CUDA_VISIBLE_DEVICES=0 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_triton_attention.py \
    -k "64_token" > "$OUT/block64_engine_tests.log" 2>&1; tail -1 "$OUT/block64_engine_tests.log"
 bench "$ROOT" 0 default_alone) &
wait; pack
rm -rf "$ALT" && mkdir -p "$ALT" && cp -r batchllm benchmarks "$ALT"/
python3 - "$OUT/decode_sweep.json" "$ALT" <<'PY' | tee "$OUT/variant.txt" || exit 1
import json, sys
best = json.load(open(sys.argv[1]))[-1]
edits = [("attention/triton_backend.py", "DECODE_TILE = TileConfig(64, 4, 2)", "DECODE_TILE = TileConfig(%d, %d, %d)" % tuple(best["tile"]))]
if best["split_per_launch"]:
    edits.append(("attention/work_items.py", "split_per_launch: bool = False", "split_per_launch: bool = True"))
for path, old, new in edits:
    path = f"{sys.argv[2]}/batchllm/{path}"
    text = open(path).read()
    assert old in text, (path, old)
    open(path, "w").write(text.replace(old, new))
print("variant:", best, "edits:", [e[2] for e in edits])
PY
(bench "$ROOT" 0 default_then; bench "$ALT" 0 variant_after) &
(bench "$ALT" 1 variant_then; bench "$ROOT" 1 default_after) &
wait
