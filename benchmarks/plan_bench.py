"""Planner speed and memory: 100,000 prompts of ~2,000 tokens on this machine.

    .venv/bin/python benchmarks/plan_bench.py [--prompts 100000] [--shared 1800] [--distinct 200] [--degree 20]
    .venv/bin/python benchmarks/plan_bench.py --nested --prompts 5000 --shared 100 --distinct 2

--nested: one conversation expanded one request per turn: prompt i is prompt i - 1 and `distinct` more tokens
(the first is `shared` tokens), so every prompt is nested in the next and the nesting is `prompts` deep.

Prompts are int32 numpy arrays (the engine's token arrays); the benchmark prints the planning time
and the peak resident memory above the token arrays, as a multiple of their size.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from batchllm.prefix import plan_prefix_sharing


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_prompts(n, shared, distinct, degree, seed=0):
    rng = np.random.default_rng(seed)
    prompts = []
    prefix = None
    for i in range(n):
        if i % degree == 0:
            prefix = rng.integers(1, 49152, shared, dtype=np.int32)
        prompts.append(np.concatenate([prefix, rng.integers(1, 49152, distinct, dtype=np.int32)]))
    order = rng.permutation(n)
    return [prompts[i] for i in order]


def make_nested_prompts(n, shared, distinct, seed=0):
    """Prompt i = prompt i - 1 + `distinct` tokens (prompt 0: `shared` tokens), shuffled."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 49152, shared + distinct * (n - 1), dtype=np.int32)
    prompts = [tokens[:shared + distinct * i] for i in range(n)]
    return [prompts[i] for i in rng.permutation(n)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=100_000)
    ap.add_argument("--shared", type=int, default=1800)
    ap.add_argument("--distinct", type=int, default=200)
    ap.add_argument("--degree", type=int, default=20)
    ap.add_argument("--mode", default="multi", choices=["single", "multi"])
    ap.add_argument("--nested", action="store_true", help="each prompt nested in the next (module docstring)")
    args = ap.parse_args()
    prompts = (make_nested_prompts(args.prompts, args.shared, args.distinct) if args.nested
               else make_prompts(args.prompts, args.shared, args.distinct, args.degree))
    token_bytes = sum(p.nbytes for p in prompts)
    base_rss = peak_rss_bytes()
    start = time.perf_counter()
    plan = plan_prefix_sharing(prompts, mode=args.mode)
    seconds = time.perf_counter() - start
    extra = max(peak_rss_bytes() - base_rss, 0)
    result = {
        "prompts": args.prompts, "nested": args.nested, "tokens": int(sum(len(p) for p in prompts)), "mode": args.mode,
        "plan_seconds": round(seconds, 2), "token_array_mib": round(token_bytes / 2**20),
        "peak_rss_mib": round(peak_rss_bytes() / 2**20),
        "planner_extra_mib": round(extra / 2**20), "extra_over_token_arrays": round(extra / token_bytes, 2),
        **{k: plan.summary()[k] for k in ("num_groups", "saving_ratio")},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
