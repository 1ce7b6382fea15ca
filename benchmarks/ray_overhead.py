"""The Ray Data path's overhead against `batchllm run` on the same rows (issue 13), on CPU:

    python benchmarks/ray_overhead.py --rows 1000 --max-tokens 8

Writes N chat rows (10 system prompts, greedy) to a temporary directory, runs `batchllm run` on them,
then `batchllm run --ray --num-replicas 1`, then `batchllm run` again, and prints each command's wall
time. Needs the `ray` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_rows(path: Path, rows: int, max_tokens: int) -> None:
    rng = random.Random(0)
    systems = [f"You are assistant number {i}. Answer briefly and politely, in one sentence." for i in range(10)]
    words = "apple river mountain city music science history ocean planet garden".split()
    with open(path, "w") as f:
        for i in range(rows):
            question = f"Tell me one fact about {rng.choice(words)} and {rng.choice(words)}."
            messages = [{"role": "system", "content": systems[i % 10]}, {"role": "user", "content": question}]
            row = {"id": f"r{i}", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
            f.write(json.dumps(row) + "\n")


def timed(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "batchllm.cli", "run", *args, "--no-progress"], check=True,
                   env={**os.environ, "RAY_memory_monitor_refresh_ms": "0"}, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="chat rows")
    parser.add_argument("--max-tokens", type=int, default=8, help="greedy output tokens per row")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = Path(tmp) / "rows.jsonl"
        write_rows(rows, args.rows, args.max_tokens)
        single = timed([str(rows), "-o", str(Path(tmp) / "out.jsonl")])
        ray = timed([str(rows), "-o", str(Path(tmp) / "ray_out"), "--ray", "--num-replicas", "1"])
        again = timed([str(rows), "-o", str(Path(tmp) / "out.jsonl"), "--overwrite"])
    print(json.dumps({"rows": args.rows, "batchllm_run_s": [single, again], "ray_s": ray,
                      "ray_over_run": ray / min(single, again)}, indent=2))


if __name__ == "__main__":
    main()
