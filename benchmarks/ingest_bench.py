"""Reading a large batch file: streaming, batched tokenisation, memory against the token arrays.

    .venv/bin/python benchmarks/ingest_bench.py [--lines 1000000]

Writes a JSONL file of N plain prompts (a shared instruction + a distinct sentence, ~40 tokens),
then runs the same reading path as `batchllm run` (parse, tokenize in batches, keep int32 token
arrays) and the prefix planner, and prints the time and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

from batchllm.inputs import prompt_processor_for
from batchllm.io.ingest import prepare_lines
from batchllm.prefix import plan_prefix_sharing


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = random.Random(0)
    words = "alpha beta gamma delta river mountain city forest ocean desert music science history".split()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        with open(path, "w") as f:
            for i in range(args.lines):
                text = " ".join(rng.choice(words) for _ in range(rng.randrange(10, 30)))
                f.write(json.dumps({"id": i, "prompt": f"Classify the topic of this sentence: {text}"}) + "\n")
        file_mib = path.stat().st_size / 2**20
        prompts = prompt_processor_for(None)
        base = rss_mib()
        start = time.perf_counter()
        valid, errors, *_ = prepare_lines(path, prompts, {"max_tokens": 16}, None)
        read_s = time.perf_counter() - start
        token_mib = sum(p.token_ids.nbytes for _, p, _ in valid) / 2**20
        after_read = rss_mib()
        start = time.perf_counter()
        plan = plan_prefix_sharing([p.token_ids for _, p, _ in valid])
        plan_s = time.perf_counter() - start
        print(json.dumps({
            "lines": args.lines, "file_mib": round(file_mib), "read_and_tokenize_s": round(read_s, 1),
            "lines_per_s": round(args.lines / read_s), "errors": len(errors),
            "token_arrays_mib": round(token_mib), "rss_growth_reading_mib": round(after_read - base),
            "plan_s": round(plan_s, 1), "peak_rss_mib": round(rss_mib()),
            "saving_ratio": round(plan.saving_ratio, 3),
        }))


if __name__ == "__main__":
    main()
