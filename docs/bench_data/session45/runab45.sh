for i in 1 2 3; do for tree in /tmp/pre45 /work/main; do
  s=$(date +%s.%N)
  (cd $tree && PYTHONPATH=$tree /work/main/.venv/bin/python -m batchllm run /tmp/small45.jsonl -o /tmp/out45_$(basename $tree).jsonl --overwrite --no-progress --stats /tmp/st45.json >/dev/null 2>&1)
  e=$(date +%s.%N)
  echo "$tree process $(python3 -c "print(round($e-$s,2))") s $(python3 -c "import json; d=json.load(open('/tmp/st45.json')); print('engine_build_s', round(d.get('engine_build_s',0),2), 'wall_s', round(d['wall_s'],2))")"
done; done
