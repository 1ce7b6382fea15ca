"""What `LLM.generate` pays before its first model step, on CPU without running the model:

    python benchmarks/ingest_overhead.py --repeats 5

An engine on CPU with a tiny random model (tests/helpers.py `make_tiny_model`, no tokenizer) gets
prompts as {"prompt_token_ids": [...]} dicts. For each workload it prints, in milliseconds (median
of the repeats):

  validate   `LLM._validate`: what `generate` does to its input before submitting (tokenize_prompt
             of every prompt: type, range and length checks; the SamplingParams checks)
  plan       `plan_prefix_sharing` over the prompt ids exactly as `LLM._submit` passes them
  submit     the whole `LLM._submit` as `iter_generate` calls it: requests, the plan, the ordered
             submission, add_request (the requests are aborted afterwards; no step runs)

Workloads: (a) the paper's 1,024 prompts of 2,000 shared + 200 distinct tokens, degree 16;
(b) 100,000 prompts of 150 shared + 50 distinct tokens, degree 32 (3,125 shared prefixes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

WORKLOADS = {
    "a_1024x2200": dict(shared=2000, distinct=200, degree=16, num_requests=1024),
    "b_100000x200": dict(shared=150, distinct=50, degree=32, num_requests=100_000),
}


def _time_workload(llm, prompts: list[dict], repeats: int) -> dict[str, float]:
    from batchllm import llm as llm_module
    from batchllm.prefix import plan_prefix_sharing
    from batchllm.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=100, ignore_eos=True)
    sharing = llm.config.sharing
    times: dict[str, list[float]] = {"validate": [], "plan": [], "submit": []}
    reference = None
    for _ in range(repeats):
        t = time.perf_counter()
        tokenized, plist = llm._validate(prompts, params)
        times["validate"].append(time.perf_counter() - t)
        ids = [_submitted_ids(p) for p in tokenized]
        t = time.perf_counter()
        plan = plan_prefix_sharing(ids, mode=sharing.plan_mode, share=sharing.prefix_sharing)
        times["plan"].append(time.perf_counter() - t)
        summary = plan.summary()
        assert reference is None or summary == reference, "the plan changed between repeats"
        reference = summary
        t = time.perf_counter()
        with getattr(llm_module, "_quiet_gc", contextlib.nullcontext)():  # as iter_generate calls it
            call = llm._submit(tokenized, plist)
        times["submit"].append(time.perf_counter() - t)
        llm.engine.core.finish_requests(list(call.states), "abort")
        del tokenized, ids, call
    out = {k: round(statistics.median(v) * 1000, 1) for k, v in times.items()}
    out.update(saving_ratio=round(reference["saving_ratio"], 4), num_groups=reference["num_groups"],
               num_nested_groups=reference["num_nested_groups"])
    return out


def _submitted_ids(prompt):
    """The ids `_submit` gives the planner for this prompt (its Request's prompt_token_ids)."""
    return getattr(prompt, "array", None) if getattr(prompt, "array", None) is not None else prompt.token_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    from batchllm.bench import shared_prefix_workload
    from batchllm.llm import LLM
    from tests.helpers import make_tiny_model

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_tiny_model("llama", Path(tmp), max_position_embeddings=4096)
        llm = LLM(str(model_dir), device="cpu", dtype="float32", skip_tokenizer_init=True, num_kv_blocks=512)
        for name in args.only or sorted(WORKLOADS):
            workload = shared_prefix_workload(**WORKLOADS[name], output=100, vocab=30000)
            prompts = [{"prompt_token_ids": p} for p in workload.prompts]
            del workload
            results[name] = _time_workload(llm, prompts, args.repeats)
            print(name, json.dumps(results[name]), flush=True)
        llm.shutdown()
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
