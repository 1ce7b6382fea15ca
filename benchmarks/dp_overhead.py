"""The data-parallel parent's critical path on CPU, without a model (issue 12):

    python benchmarks/dp_overhead.py --repeats 5

Runs the real `DataParallelEngine.generate` (planning, partitioning, what goes down each worker's
pipe, the tail-queue pulls, the results coming back) over real spawned worker processes whose
engine takes no time: each worker runs the real job loop (`data_parallel.serve_jobs`, so the real
receive and unpack), re-plans what it holds with the real `LLM._submit` (its engine discards the
requests), pulls the tail until it is empty, then sends back one RequestOutput of `--output` tokens
per prompt. On the paper's workload (2,000-token shared prefix + 200 distinct, degree 16, 1,024
requests) it prints, in milliseconds (median of the repeats):

  validate        the parent's `LLM.generate` validation of token-id prompts (DP=1 pays it too)
  plan            plan_prefix_sharing over the whole batch, in the parent
  partition       partition_plan
  held_r          from the start of `generate` until rank r holds its pinned shard (received and
                  unpacked: the moment a real worker's engine could start)
  replan_r        rank r's own `LLM._submit` of what it holds (its prefix plan and requests)
  started_r       held_r + replan_r: when rank r's engine would run its first step
  tail_r          rank r's pulls of the tail queue until empty (round trips, unpack, re-plan)
  results         from the last worker's first result send until the parent yielded the last one
                  (every result at once: a real run spreads them over its last steps)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

_TIMINGS = "BATCHLLM_DP_OVERHEAD_DIR"


class _NoModelLLM:
    """What `serve_jobs` needs of an LLM, with an engine that takes no time."""

    def __init__(self, rank: int, config, output_tokens: int) -> None:
        from batchllm.llm import LLM

        self.rank, self.output_tokens = rank, output_tokens
        self.llm = LLM.__new__(LLM)  # the real _submit over a stub engine: plans and builds the requests
        self.llm.config, self.llm.tokenizer, self.llm.eos_token_ids = config, None, frozenset()
        self.llm._model_eos_token_id = None
        self.llm._crowded_members = lambda requests: set()  # (a stub cache: every member fits with its prefixes)
        self.llm.max_model_len = config.model.max_model_len
        self.llm.engine = SimpleNamespace(core=SimpleNamespace(add_request=lambda request: None))
        self.llm._request_counter = itertools.count()
        self.last_stats: dict = {}

    def iter_generate(self, prompts, params, *, use_tqdm=False, refill=None, stop_asked=None):
        from batchllm.request_output import CompletionOutput, RequestOutput

        held = time.perf_counter()
        call = self.llm._submit(prompts, params)
        planned = time.perf_counter()
        while refill is not None and (more := refill()) is not None:
            self.llm._submit(*more, call=call)
        tail_done = time.perf_counter()
        for local, prompt in enumerate(call.prompts):
            tokens = list(range(1000, 1000 + self.output_tokens))
            yield local, RequestOutput(f"{call.call_id}-{local}", prompt.text, prompt.token_ids, None,
                                       [CompletionOutput(0, "", tokens, None, None, finish_reason="length")])
        sent = time.perf_counter()
        timings = {"held": held, "planned": planned, "tail_done": tail_done, "sent": sent, "first_send": tail_done}
        Path(os.environ[_TIMINGS], f"rank{self.rank}.json").write_text(json.dumps(timings))
        n = len(call.prompts)
        self.last_stats = {"num_requests": n, "prompt_tokens": sum(len(p.token_ids) for p in call.prompts),
                           "prefill_tokens_computed": 0, "output_tokens": n * self.output_tokens, "num_steps": 0,
                           "wall_s": sent - held}

    def shutdown(self) -> None:
        pass


def _worker(rank: int, size: int, config, conn) -> None:
    from batchllm.parallel.data_parallel import serve_jobs

    llm = _NoModelLLM(rank, config, int(os.environ["BATCHLLM_DP_OVERHEAD_OUTPUT"]))
    conn.send(("ready",))
    serve_jobs(llm, conn)


def _phases(engine, workload, timings_dir: Path) -> dict[str, float]:
    from batchllm.inputs import PromptProcessor
    from batchllm.parallel.partition import partition_plan
    from batchllm.prefix import plan_prefix_sharing
    from batchllm.sampling_params import SamplingParams

    out: dict[str, float] = {}
    checker = PromptProcessor(None, 1 << 20, engine.max_model_len)
    t = time.perf_counter()
    prompts = [checker.tokenize_prompt({"prompt_token_ids": p}, i) for i, p in enumerate(workload.prompts)]
    out["validate"] = time.perf_counter() - t
    params = [SamplingParams(max_tokens=workload.max_tokens[0], ignore_eos=True)] * len(prompts)
    t = time.perf_counter()
    plan = plan_prefix_sharing([p.array for p in prompts], mode=engine.sharing.plan_mode)  # as the engine does
    out["plan"] = time.perf_counter() - t
    t = time.perf_counter()
    partition_plan(plan, [sp.max_tokens for sp in params], engine.size)
    out["partition"] = time.perf_counter() - t

    started = time.perf_counter()
    last_result = started
    results = 0
    for _ in engine.generate(prompts, params, use_tqdm=False):
        results += 1
        last_result = time.perf_counter()
    assert results == len(prompts), f"{results} results for {len(prompts)} prompts"
    out["generate_total"] = time.perf_counter() - started
    ranks = [json.loads((timings_dir / f"rank{r}.json").read_text()) for r in range(engine.size)]
    for r, rank in enumerate(ranks):
        out[f"held_{r}"] = rank["held"] - started
        out[f"replan_{r}"] = rank["planned"] - rank["held"]
        out[f"started_{r}"] = rank["planned"] - started
        out[f"tail_{r}"] = rank["tail_done"] - rank["planned"]
    out["results"] = last_result - max(rank["first_send"] for rank in ranks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shared", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--degree", type=int, default=16)
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--output", type=int, default=100)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from batchllm.bench import shared_prefix_workload
    from batchllm.options import engine_config
    from batchllm.parallel.data_parallel import DataParallelEngine

    workload = shared_prefix_workload(args.shared, args.distinct, args.degree, args.requests, args.output,
                                      vocab=30000)
    max_len = args.shared + args.distinct + args.output + 1
    config = engine_config(device="cpu", data_parallel_size=args.ranks, max_model_len=max_len)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[_TIMINGS] = tmp
        os.environ["BATCHLLM_DP_OVERHEAD_OUTPUT"] = str(args.output)

        engine = DataParallelEngine(config, Path(tmp), max_len, worker_main=_worker)
        engine.wait_ready()
        try:
            runs = [_phases(engine, workload, Path(tmp)) for _ in range(args.repeats)]
        finally:
            engine.shutdown()
    median = {k: 1000 * statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"{workload.name}, {args.ranks} ranks, {args.repeats} repeats; ms, median (min-max):")
    for k, v in median.items():
        lo, hi = (1000 * f(r[k] for r in runs) for f in (min, max))
        print(f"  {k:15s} {v:8.1f}   ({lo:.1f}-{hi:.1f})")
    if args.json_out:
        args.json_out.write_text(json.dumps({"workload": workload.name, "ranks": args.ranks, "median_ms": median,
                                             "runs_s": runs}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
