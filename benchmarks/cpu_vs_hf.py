"""BatchLLM against transformers' batched `generate` on CPU: the same chat prompts, the same weights
(the embedded SmolLM2-135M-Instruct unless --model), float32, greedy, in one process.

    python benchmarks/cpu_vs_hf.py --prompts 32 --max-tokens 64 --rounds 2

Each round runs BatchLLM (the LLM API, defaults for CPU) and then transformers (`generate` over
left-padded batches of --hf-batch-size); the best round of each is reported, since the machine may
be shared. Output tokens count what each request really produced: up to and including its EOS.
Prints one JSON line: output tokens/s of each, the ratio, and how many greedy outputs agree token
for token (left padding in transformers can flip a near-tie, so a few may differ).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch  # noqa: E402

from batchllm import LLM, SamplingParams  # first: it sets OpenMP's wait policy before torch loads

_TOPICS = ["the sea", "autumn", "a city at night", "coffee", "mountains", "a robot", "the moon", "trains",
           "a library", "winter", "bees", "the desert"]
_COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "Norway", "India", "Kenya", "Peru", "Italy"]
_TEMPLATES = [
    "What is the capital of {country}?",
    "Write a haiku about {topic}.",
    "Write a Python function that {task}.",
    "Explain {topic} to a child in two sentences.",
    "Name three facts about {country}.",
    "Give me a short story opening about {topic}.",
]
_TASKS = ["reverses a string", "sums a list", "checks for a palindrome", "counts vowels", "merges two dicts"]


def chat_prompts(n: int) -> list[list[dict]]:
    """n distinct single-turn chats in the style of examples/prompts.jsonl (deterministic)."""
    out = []
    for i in range(n):
        text = _TEMPLATES[i % len(_TEMPLATES)].format(
            topic=_TOPICS[i % len(_TOPICS)], country=_COUNTRIES[i % len(_COUNTRIES)], task=_TASKS[i % len(_TASKS)])
        out.append([{"role": "user", "content": text}])
    return out


def run_batchllm(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], max_tokens: int, batch_size: int, pad_id: int,
           eos_ids: set[int]) -> tuple[float, list[list[int]]]:
    """transformers' generate over left-padded batches; each row cut after its first EOS."""
    results = []
    start = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=pad_id)
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
            results.append(row[:cut])
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF model directory; default: the embedded SmolLM2-135M")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-batch-size", type=int, default=None, help="default: all prompts in one batch")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    llm = LLM(args.model, dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(str(llm.model_dir), dtype=torch.float32, trust_remote_code=False).eval()
    prompts = [llm.tokenize_prompt(llm.apply_chat_template(c)).token_ids for c in chat_prompts(args.prompts)]
    eos = set(llm.eos_token_ids)
    pad = hf.generation_config.pad_token_id if hf.generation_config.pad_token_id is not None else min(eos)
    batch_size = args.hf_batch_size or len(prompts)

    run_batchllm(llm, prompts[:2], 4)  # warm-up: first-call allocations, lazy imports
    run_hf(hf, prompts[:2], 4, 2, pad, eos)
    ours_s = theirs_s = float("inf")
    for _ in range(args.rounds):
        wall, ours = run_batchllm(llm, prompts, args.max_tokens)
        ours_s = min(ours_s, wall)
        wall, theirs = run_hf(hf, prompts, args.max_tokens, batch_size, pad, eos)
        theirs_s = min(theirs_s, wall)
    ours_tokens, theirs_tokens = sum(map(len, ours)), sum(map(len, theirs))
    row = {
        "prompts": len(prompts), "max_tokens": args.max_tokens, "hf_batch_size": batch_size, "rounds": args.rounds,
        "batchllm_output_tokens": ours_tokens, "batchllm_wall_s": round(ours_s, 2),
        "batchllm_tokens_per_s": round(ours_tokens / ours_s, 1),
        "hf_output_tokens": theirs_tokens, "hf_wall_s": round(theirs_s, 2),
        "hf_tokens_per_s": round(theirs_tokens / theirs_s, 1),
        "ratio": round((ours_tokens / ours_s) / (theirs_tokens / theirs_s), 2),
        "greedy_outputs_agree": f"{sum(a == b for a, b in zip(ours, theirs))}/{len(prompts)}",
        "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()} x{torch.get_num_threads()}",
        "torch": torch.__version__,
    }
    print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(row, f)


if __name__ == "__main__":
    main()
