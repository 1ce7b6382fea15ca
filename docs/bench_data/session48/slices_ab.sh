# Host time per step on the 6,000-request run path, before the sampling slices (c4fe5f3^, a worktree) and after
# (this tree), alternating, greedy then temperature 0.8. Session 48.
OLD=${OLD:-/tmp/preslice}; NEW=${NEW:-/work/main}
for temp in 0 0.8; do for i in 1 2 3; do for tree in $OLD $NEW; do
  echo "$tree temperature $temp: $(cd $tree && PYTHONPATH=$tree /work/main/.venv/bin/python benchmarks/host_overhead.py \
    --path run --requests 6000 --prefixes 6 --prefix-len 30 --min-out 4 --max-out 124 --repeat 1 \
    --temperature $temp 2>&1 | grep '^run median')"
done; done; done
