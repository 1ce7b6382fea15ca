"""bf16 agreement of tensor parallelism with one GPU: the same prompts, greedy, through LLM(tp=1) and
LLM(tp=N) on the same (dummy) weights; reports, over the steps both runs reached with the same
tokens so far, how often the greedy token and the top-5 set agree, and the mean |delta logprob| of
the chosen token. Run on a machine with N GPUs:

  python3 benchmarks/tp_agreement.py --model benchmarks/configs/llama-3.1-8b --tp 2
"""

from __future__ import annotations

import argparse
import json
import random

from batchllm import LLM, SamplingParams


def run(model: str, tp: int, prompts: list[list[int]], max_tokens: int) -> list:
    llm = LLM(model, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=4096,
              tensor_parallel_size=tp)
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=5)
        return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    finally:
        llm.shutdown()


def compare(a: list, b: list) -> dict:
    steps = same_token = same_top5 = 0
    deltas = []
    identical = 0
    for x, y in zip(a, b):
        identical += x.token_ids == y.token_ids
        for tx, ty, lx, ly in zip(x.token_ids, y.token_ids, x.logprobs, y.logprobs):
            steps += 1
            same_token += tx == ty
            same_top5 += set(lx) == set(ly)
            deltas.append(abs(lx[tx].logprob - ly[tx].logprob) if tx in ly else float("nan"))
            if tx != ty:
                break  # later steps condition on different tokens
    finite = [d for d in deltas if d == d]
    return {"requests": len(a), "identical_outputs": identical / len(a), "steps_compared": steps,
            "greedy_token_agreement": same_token / steps, "top5_set_agreement": same_top5 / steps,
            "mean_abs_delta_logprob": sum(finite) / len(finite)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model directory (config.json; dummy weights)")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel size compared with 1")
    parser.add_argument("--requests", type=int, default=64, help="prompts")
    parser.add_argument("--prompt-len", type=int, default=256, help="prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--json-out", default=None, help="write the result here")
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 30000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    one = run(args.model, 1, prompts, args.max_tokens)
    many = run(args.model, args.tp, prompts, args.max_tokens)
    result = {"tp": args.tp, **compare(one, many)}
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
