# engine build and `batchllm run` start-up: this tree (new) against .peerbuild (old), alternating
R=$PWD; mkdir -p $OUT
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from user_path import chat_prompts, write_chat_batch
write_chat_batch(Path('$OUT/chat.jsonl'), chat_prompts(6000), 64, ignore_eos=True, temperature=0)"
for t in ${STARTS:-new old new}; do
  d=$R; [ $t = old ] && d=$R/.peerbuild
  s=$(date +%s.%N)
  (cd $d && PYTHONPATH=$d timeout 100 python3 benchmarks/engine_start.py 1 2>&1 | grep 'built in')
  echo "$t engine_start process $(python3 -c "print(round($(date +%s.%N)-$s,2))") s"
done
for t in ${RUNS:-new old}; do
  d=$R; [ $t = old ] && d=$R/.peerbuild
  s=$(date +%s.%N)
  (cd $d && PYTHONPATH=$d timeout 100 python3 -m batchllm.cli run $OUT/chat.jsonl -o $OUT/out_$t.jsonl --overwrite \
     --no-progress --stats $OUT/stats_$t.json --model $R/benchmarks/configs/smollm2-135m --load-format dummy \
     --tokenizer $R/.tok/smol > $OUT/run_$t.log 2>&1)
  p=$(python3 -c "print(round($(date +%s.%N)-$s,2))")
  python3 -c "import json; d=json.load(open('$OUT/stats_$t.json')); print('$t run process $p s, wall_s %.2f, engine_build_s %.2f, ranks (import, build, ready):' % (d['wall_s'], d['engine_build_s']), [(round(r['import_s'],2), round(r['build_s'],2), round(r['ready_s'],2)) for r in d['ranks']])"
done
rm -f $OUT/chat.jsonl $OUT/out_*.jsonl
