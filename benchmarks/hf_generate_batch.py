"""Hugging Face transformers' own continuous batching (`generate_batch`, paged attention) on the same
model shape and workload as `batchllm bench`, for the side-by-side table in docs/benchmarks.md.

    python3 benchmarks/hf_generate_batch.py --model benchmarks/configs/llama-3.1-8b \
        --shared 2000 --distinct 200 --degree 16 --requests 256 --output 100 --json-out hf.json

Random bf16 weights (`from_config`) on CUDA; greedy; EOS is never produced as a stop (every request
makes exactly --output tokens, like ignore_eos). Prompts come from batchllm.bench's generators with
the same seed, so they are token for token those of `batchllm bench`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation import ContinuousBatchingConfig, GenerationConfig

from batchllm.bench import Workload, make_workload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="directory with config.json")
    parser.add_argument("--workload", default="shared", choices=["shared", "snippet", "nosharing", "decodeheavy"])
    parser.add_argument("--shared", type=int, default=2000)
    parser.add_argument("--distinct", type=int, default=200)
    parser.add_argument("--degree", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--output", type=int, default=100)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--min-output", type=int, default=100)
    parser.add_argument("--max-output", type=int, default=1000)
    parser.add_argument("--sorted", action="store_true")
    parser.add_argument("--attn", default="sdpa", help="attn_implementation (paged by generate_batch)")
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()

    config = AutoConfig.from_pretrained(args.model, trust_remote_code=False)
    workload = make_workload(args, config.vocab_size)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=args.attn)
    model.eval()
    never = config.vocab_size  # no token has this id: nothing stops a request early
    cb = ContinuousBatchingConfig(max_batch_tokens=args.max_batch_tokens, allow_block_sharing=True)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(w: Workload) -> tuple[float, int]:
        gen = GenerationConfig(max_new_tokens=max(w.max_tokens), do_sample=False, eos_token_id=never,
                               pad_token_id=0)
        sync()
        start = time.perf_counter()
        results = model.generate_batch(w.prompts, generation_config=gen, continuous_batching_config=cb,
                                       progress_bar=False)
        sync()
        wall = time.perf_counter() - start
        return wall, sum(len(r.generated_tokens) for r in results.values())

    run(Workload("warmup", workload.prompts[:8], [4] * 8))
    wall, output_tokens = run(workload)
    row = {"engine": "transformers generate_batch", "attn_implementation": args.attn, "workload": workload.name,
           "requests_per_s": len(workload.prompts) / wall, "output_tokens_per_s": output_tokens / wall,
           "output_tokens": output_tokens, "wall_s": wall,
           "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device}
    print(json.dumps(row), flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(row, f)


if __name__ == "__main__":
    main()
