"""GPU memory of an engine with an automatically sized KV cache: what it reserved for the steps against what
they took, on workloads that stress the step's activations.

Builds one `LLM` (default settings unless given), prints its KV cache and activation reserve
(`runner.activation_profile`), then runs each case and prints torch's peak allocation over what the built
engine holds, against the reserve; a case that runs out of memory is reported, and the next one runs.

  paper: 1,024 prompts of 2,000 shared (degree 16) + 200 own tokens, 100 out, greedy (full prefill steps)
  wide_greedy / wide_sampled: 12,000 prompts of 32 tokens, 16 out, decoding together (steps of thousands of
  sampling rows), greedy / top-p with logprobs
  prompt_logprobs: 64 prompts of 4,000 tokens with prompt_logprobs=5 (every row through the LM head)

  python benchmarks/memory_probe.py [--model benchmarks/configs/llama-3.1-8b] [--load-format dummy] \
      [--cases paper,wide_sampled] [--json-out FILE] [any engine option of `batchllm bench`: --max-model-len 20000 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from batchllm import LLM, SamplingParams
from batchllm.options import add_engine_arguments, engine_kwargs_from_args

GIB = 2**30


def workload(case: str, rng: random.Random) -> tuple[list[dict], SamplingParams]:
    def tokens(n: int) -> list[int]:
        return [rng.randrange(1000, 30000) for _ in range(n)]
    if case == "paper":
        prompts = [{"prompt_token_ids": shared + tokens(200)}
                   for shared in (tokens(2000) for _ in range(64)) for _ in range(16)]
        return prompts, SamplingParams(max_tokens=100, ignore_eos=True, temperature=0)
    if case in ("wide_greedy", "wide_sampled"):
        params = (SamplingParams(max_tokens=16, ignore_eos=True, temperature=0) if case == "wide_greedy" else
                  SamplingParams(max_tokens=16, ignore_eos=True, temperature=1.0, top_p=0.9, logprobs=5))
        return [{"prompt_token_ids": tokens(32)} for _ in range(12000)], params
    if case == "prompt_logprobs":
        return ([{"prompt_token_ids": tokens(4000)} for _ in range(64)],
                SamplingParams(max_tokens=4, ignore_eos=True, temperature=0, prompt_logprobs=5))
    raise SystemExit(f"unknown case {case!r}")


def run_case(llm: LLM, case: str, built: int) -> dict:
    prompts, params = workload(case, random.Random(0))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    row = {"case": case, "requests": len(prompts)}
    try:
        llm.generate(prompts, params, use_tqdm=False)
        row["ok"] = True
    except torch.OutOfMemoryError as error:
        row.update(ok=False, error=str(error).splitlines()[0][:300])
    row["seconds"] = round(time.perf_counter() - started, 2)
    row["peak_over_built_gib"] = round((torch.cuda.max_memory_allocated() - built) / GIB, 3)
    row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="paper,wide_greedy,wide_sampled,prompt_logprobs")
    parser.add_argument("--json-out")
    add_engine_arguments(parser, exclude=["skip_tokenizer_init"])  # (the engine options, as `batchllm bench` takes)
    parser.set_defaults(model="benchmarks/configs/llama-3.1-8b", load_format="dummy")
    args = parser.parse_args()
    llm = LLM(**engine_kwargs_from_args(args), skip_tokenizer_init=True)
    engine = llm.engine
    free, total = torch.cuda.mem_get_info()
    built = torch.cuda.memory_allocated()
    reserve = engine.kv_spec.activation_reserve
    summary = {"device": torch.cuda.get_device_name(), "card_gib": round(total / GIB, 2),
               "kv_cache_gib": round(engine.kv_spec.num_bytes / GIB, 2), "kv_tokens": engine.kv_spec.num_tokens,
               "used_after_build_gib": round((total - free) / GIB, 2),
               "step_tokens": engine.core.scheduler.config.max_num_batched_tokens,
               "reserve_gib": None if reserve is None else round(reserve.total / GIB, 3),
               "reserve": None if reserve is None else reserve.describe()}
    print(json.dumps(summary), flush=True)
    rows = []
    for case in args.cases.split(","):
        rows.append(run_case(llm, case, built))
        print(json.dumps(rows[-1]), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"summary": summary, "cases": rows}, f, indent=1)


if __name__ == "__main__":
    main()
