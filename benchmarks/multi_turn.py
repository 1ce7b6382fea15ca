"""Two rounds of a shared-prefix batch on one `LLM`: the second turn of a batch user's conversations.

Round one is `batchllm bench`'s shared-prefix workload (same generator and seed). Round two continues every
round-one sequence: its prompt, its answer, then --followup new tokens (seeded by the request's index), each asking
for --output tokens again (greedy, ignore_eos). Both rounds run on the same engine after a warm-up, and round two
runs twice:
  - `kept`: right after round one, taking the KV round one left in the cache (`core/prefix_cache.py`, the default);
  - `recomputed`: after `llm.reset_prefix_cache()`, so that round two computes every prompt again (sharing within
    the call still plans each group's prefix once): what every call did before the cache.
With several engines (--data-parallel-size, --engines-per-gpu), a third run of round two, after round one again:
  - `kept, placed blind`: the parent places round two without regard to where round one ran (what it did before
    `parallel/kept_placement.py`), so a conversation finds its first turn's KV only where it lands on the same rank.
--order shuffled sends round two in a seeded shuffled order (a user's second turn need not come in the first's
order; in the same order, equal-cost groups are placed as before even blind).
Prints one JSON line per run (requests/s, prefill tokens computed, tokens taken from the cache) and their ratio.

    python3 benchmarks/multi_turn.py --model benchmarks/configs/llama-3.1-8b --requests 512 \\
        -- --load-format dummy --dtype bfloat16                                          # GPU
    python3 benchmarks/multi_turn.py --model <tiny model dir> --requests 16 --shared 64 --distinct 8 \\
        --output 4 --followup 8 -- --device cpu                                          # CPU, small
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def round_two(prompts: list[list[int]], answers: list[list[int]], followup: int, vocab: int) -> list[list[int]]:
    """Each prompt, its answer, then `followup` tokens drawn from a generator seeded by the request's index."""
    return [list(p) + list(a) + np.random.default_rng(i).integers(0, vocab, followup).tolist()
            for i, (p, a) in enumerate(zip(prompts, answers))]


def main() -> int:
    from batchllm import LLM, SamplingParams
    from batchllm.bench import Workload, make_workload, run_workload
    from batchllm.cli import build_parser
    from batchllm.options import engine_kwargs_from_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--shared", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--degree", type=int, default=16)
    parser.add_argument("--output", type=int, default=100)
    parser.add_argument("--followup", type=int, default=50)
    parser.add_argument("--order", choices=("same", "shuffled"), default="same")
    parser.add_argument("--json-out")
    ours, engine_flags = parser.parse_known_args()
    engine_flags = [f for f in engine_flags if f != "--"]
    bench_args = build_parser().parse_args(
        ["bench", "--model", ours.model, "--workload", "shared", "--requests", str(ours.requests), "--shared",
         str(ours.shared), "--distinct", str(ours.distinct), "--degree", str(ours.degree), "--output",
         str(ours.output), *engine_flags])
    llm = LLM(**{**engine_kwargs_from_args(bench_args), "skip_tokenizer_init": True})
    vocab = llm.model_spec.vocab_size
    first = make_workload(bench_args, vocab)
    run_workload(llm, Workload("warmup", first.prompts[:8], [4] * min(8, len(first.prompts))))
    llm.reset_prefix_cache()
    greedy = SamplingParams(temperature=0, max_tokens=ours.output, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in first.prompts], greedy, use_tqdm=False)
    results = [_line("round one", llm.last_stats, time.perf_counter() - started, len(first.prompts))]
    second = round_two(first.prompts, [o.outputs[0].token_ids for o in outputs], ours.followup, vocab)
    if ours.order == "shuffled":
        np.random.default_rng(0).shuffle(second)
    data_parallel = llm._data_parallel
    for name in ("kept", "kept, placed blind", "recomputed"):
        if name == "kept, placed blind":
            if data_parallel is None:
                continue
            llm.reset_prefix_cache()
            data_parallel._kept_placement = lambda: None  # (an instance attribute over the method: no memory)
            llm.generate([{"prompt_token_ids": p} for p in first.prompts], greedy, use_tqdm=False)
        if name == "recomputed":
            llm.reset_prefix_cache()
        started = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in second], greedy, use_tqdm=False)
        results.append(_line(f"round two, {name}", llm.last_stats, time.perf_counter() - started, len(second)))
    ratio = results[1]["requests_per_s"] / results[-1]["requests_per_s"]
    device = str(llm.engine.device) if llm.engine is not None else f"{len(data_parallel.processes)} engines"
    summary = {"model": ours.model, "device": device, "requests": ours.requests, "order": ours.order,
               "kept_over_recomputed": round(ratio, 3), "runs": results}
    if data_parallel is not None:
        summary["kept_over_blind"] = round(results[1]["requests_per_s"] / results[2]["requests_per_s"], 3)
        print(f"round two, kept / placed blind: {summary['kept_over_blind']:.3f}x", flush=True)
    print(f"round two, kept / recomputed: {ratio:.3f}x", flush=True)
    if ours.json_out:
        with open(ours.json_out, "w") as f:
            json.dump(summary, f, indent=1)
    llm.shutdown()
    return 0


def _line(name: str, stats: dict, wall: float, requests: int) -> dict:
    line = {"run": name, "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
            "prefill_tokens_computed": stats["prefill_tokens_computed"],
            "kept_prefill_tokens": stats["kept_prefill_tokens"], "prompt_tokens": stats["prompt_tokens"],
            "num_preemptions": stats["num_preemptions"],
            "kv_blocks": [r.get("kv_blocks") for r in stats["ranks"]] if stats.get("ranks") else stats["kv_blocks"],
            "placed_on_held_tokens": stats.get("placed_on_held_tokens")}
    if stats.get("ranks"):  # per engine: requests, prefill computed, seconds to its last result
        line["ranks"] = [[r["num_requests"], r["prefill_tokens_computed"], round(r["finish_s"], 2)]
                         for r in stats["ranks"]]
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    sys.exit(main())
