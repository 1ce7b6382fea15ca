# session 51: where a small job's engine build goes (build_phases), one engine vs two at once; the run path
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
s=$(date +%s)
python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'benchmarks')
from user_path import chat_prompts, write_chat_batch
write_chat_batch(Path('$OUT/chat.jsonl'), chat_prompts(6000), 64, ignore_eos=True, temperature=0)"
timeout 200 python3 benchmarks/engine_start.py ${COUNTS:-1 2 1 2} > $OUT/engine_start.log 2>&1; cat $OUT/engine_start.log | grep built
echo "engine_start done at $(( $(date +%s) - s )) s"
for e in ${ENGINES:-2 1 2}; do
  t0=$(date +%s.%N)
  timeout 120 python3 -m batchllm.cli run $OUT/chat.jsonl -o $OUT/out.jsonl --overwrite --no-progress \
     --stats $OUT/stats_e$e.json --model benchmarks/configs/smollm2-135m --load-format dummy \
     --tokenizer .tok/smol --engines-per-gpu $e $EXTRA > $OUT/run_e$e.log 2>&1
  p=$(python3 -c "print(round($(date +%s.%N)-$t0,2))")
  python3 -c "import json; d=json.load(open('$OUT/stats_e$e.json')); print('engines $e process $p s, wall_s %.2f, engine_build_s %.2f' % (d['wall_s'], d['engine_build_s']), d.get('build_phases') and {k: round(v,2) for k,v in d['build_phases'].items()}); [print('  rank', r['rank'], 'import', round(r['import_s'],2), 'build', round(r['build_s'],2), 'ready', round(r['ready_s'],2), {k: round(v,2) for k,v in r['build_phases'].items()}) for r in d.get('ranks', [])]" || tail -5 $OUT/run_e$e.log
done
echo "all done at $(( $(date +%s) - s )) s"
rm -f $OUT/chat.jsonl $OUT/out.jsonl
