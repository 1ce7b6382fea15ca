"""One prompt of n completions (parallel sampling): the call's wall time and its engine steps, per n.
The facade finishes a prompt when its last completion ends; it checked every completion's state at each end (n^2
checks per prompt, 28 s of a 67 s call at n = 16,384 on CPU) before it counted them down. PYTHONPATH=<another tree>
runs this script on that tree's engine.

    python3 benchmarks/many_completions.py --model <model dir> --n 4096 16384 --max-tokens 1 -- --device cpu
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> int:
    from batchllm import LLM, SamplingParams
    from batchllm.cli import build_parser
    from batchllm.options import engine_kwargs_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--max-tokens", type=int, default=1)
    parser.add_argument("--prompt", default="hi there")
    parser.add_argument("engine_args", nargs="*", help="engine options after --, as batchllm run takes them")
    args = parser.parse_args()
    options = build_parser().parse_args(["run", "in", "-o", "out", "--model", args.model, *args.engine_args])
    engine = engine_kwargs_from_args(options)
    llm = LLM(**engine)
    try:
        for n in args.n:
            params = SamplingParams(n=n, temperature=1.0, max_tokens=args.max_tokens, seed=1)
            started = time.perf_counter()
            output = llm.generate([args.prompt], params, use_tqdm=False)[0]
            wall = time.perf_counter() - started
            print(json.dumps({"n": n, "wall_s": round(wall, 2), "completions": len(output.outputs),
                              "engine_steps": llm.last_stats.get("num_steps")}), flush=True)
    finally:
        llm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
