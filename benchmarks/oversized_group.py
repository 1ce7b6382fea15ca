"""Scheduling one prefix group far larger than the KV pool: steps, preemptions, prefill tokens and host time.

    PYTHONPATH=. .venv/bin/python benchmarks/oversized_group.py [--members 5000] [--blocks 20000] [--output 200]

The commonest batch job is one instruction (a system prompt) over a dataset: one group whose members' KV far
exceeds the pool, so members must start as others finish. This runs such a batch (a 200-token shared prompt,
42 distinct tokens per member, `--output` greedy tokens each, ignore_eos) through the real scheduler and engine
loop with a runner that returns a fixed token instead of running a model (only the scheduler's and the engine
loop's host work is timed), in a pool of `--blocks` KV blocks. Prints the engine's steps, preemptions and
prefill tokens computed (the plan's are 200 + 42 per member) and the wall time of `generate`.
Used to reject an admission rule that started members against part of their output (docs/benchmarks.md,
session 40): it preempted and recomputed where the worst-case charge never does.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

from batchllm import LLM, SamplingParams  # noqa: E402
from batchllm.core import engine_core  # noqa: E402
from batchllm.outputs import RunnerOutput  # noqa: E402
from tests.helpers import make_tiny_model  # noqa: E402


class FixedTokenRunner:
    """Stands in for the executor: every sampled request gets token 5, nothing is computed."""

    def execute(self, batch):
        return RunnerOutput({r.request_id: 5 for r in batch.requests if r.sampling is not None})

    def submit(self, batch):
        return engine_core._Done(self.execute(batch))


def without_a_model(llm: LLM) -> None:
    """Swap the engine core's executor for `FixedTokenRunner`."""
    llm.engine.core.executor = FixedTokenRunner()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=5000)
    ap.add_argument("--blocks", type=int, default=20000, help="KV blocks in the pool")
    ap.add_argument("--output", type=int, default=200, help="output tokens per member")
    args = ap.parse_args()
    model_dir = make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="batchllm-oversized-")))
    llm = LLM(str(model_dir), device="cpu", dtype="float32", skip_tokenizer_init=True, num_kv_blocks=args.blocks,
              max_num_batched_tokens=8192)
    without_a_model(llm)
    system = list(range(10, 210))
    prompts = [{"prompt_token_ids": system + [300 + i % 97, 400 + (i // 97) % 89] + list(range(500, 540))}
               for i in range(args.members)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - start
    stats = llm.last_stats
    counts = {k: stats[k] for k in ("num_steps", "num_preemptions", "prefill_tokens_computed")}
    print(json.dumps({**vars(args), **counts, "wall_s": round(wall, 2)}))


if __name__ == "__main__":
    main()
