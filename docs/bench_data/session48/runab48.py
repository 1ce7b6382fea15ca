"""`batchllm run` on 20 chat lines (8 tokens each, /tmp/small48.jsonl) with the default model, OLD tree (a worktree of
db81ff5: before the plain tokenizer config) against NEW (this tree), each a process of its own, alternating: wall
time, the process's CPU time (user + system) and generation (`wall_s` of --stats). Session 48."""
import json
import os
import resource
import subprocess
import sys
import time

OLD, NEW = (sys.argv[1:3] if len(sys.argv) > 2 else ("/tmp/old48", "/work/main"))


def run(tree):
    s = time.perf_counter()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(["/work/main/.venv/bin/python", "-m", "batchllm", "run", "/tmp/small48.jsonl", "-o",
                    f"/tmp/out48_{os.path.basename(tree)}.jsonl", "--overwrite", "--no-progress", "--stats",
                    "/tmp/st48.json"], cwd=tree, env={**os.environ, "PYTHONPATH": tree}, capture_output=True,
                   check=True)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open("/tmp/st48.json") as f:
        d = json.load(f)
    return time.perf_counter() - s, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), d["wall_s"]


for _ in range(3):
    for tree in (OLD, NEW):
        w, c, g = run(tree)
        print(f"{tree:12} process {w:.2f} s, CPU {c:.2f} s, generation {g:.2f} s", flush=True)
