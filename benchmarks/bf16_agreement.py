"""How often bfloat16 gives the float32 answer (issue 20), and where bfloat16 loses precision.

Agreement (default mode): the same N chat requests (greedy, 64 tokens; `chat_prompts.py`: shared
system prompts x varied questions) through the engine in float32 and in bfloat16; reports the share
of requests whose text is identical and the mean common prefix (tokens in common from the start,
over the float32 answer's length). Float32 is the reference: it is token-for-token transformers'
float32 `generate` (tests/e2e/test_hf_parity.py).

    python benchmarks/bf16_agreement.py --num-prompts 3000 --json-out bf16.json        # GPU
    python benchmarks/bf16_agreement.py --num-prompts 48 --device cpu                  # CPU, small

Layers (--layers, CPU): one prefill of a few chat prompts through the float32 model and the
bfloat16 model with each ops policy (torch ops; the Triton kernels in Triton's interpreter), and
  - per op, on the float32 run's real activations rounded to bfloat16: the op's error in bfloat16
    against the same op in float32 on the same inputs, in units of one rounding of the output
    (1.0 = as good as computing in float32 and rounding once);
  - per layer, the drift of the bfloat16 run from the float32 run (relative L2 error of the
    residual stream, attention and MLP outputs), the final norm and the logits (top-1 agreement).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--layers" in sys.argv:  # the Triton kernels run in its interpreter: set before Triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")


sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import chat_prompts  # noqa: E402

from batchllm import LLM, SamplingParams  # noqa: E402


def generate(model, dtype: str, conversations, max_tokens: int, device: str, **engine_args) -> list[list[int]]:
    llm = LLM(model, dtype=dtype, device=device, **engine_args)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    outs = llm.chat(conversations, sp, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    texts = [o.outputs[0].text for o in outs]
    if hasattr(llm, "shutdown"):  # frees the device memory for the next engine (the older code has none)
        llm.shutdown()
    del llm
    return tokens, texts, wall


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(reference: list[list[int]], ref_texts, other: list[list[int]], other_texts) -> dict:
    """identical text %, identical tokens %, mean common prefix % (of the reference's length)."""
    n = len(reference)
    prefix = [common_prefix(r, o) / len(r) if r else float(not o) for r, o in zip(reference, other)]
    identical = sum(r == o for r, o in zip(ref_texts, other_texts))
    return {
        "requests": n,
        "identical_text_pct": 100.0 * identical / n,
        "identical_tokens_pct": 100.0 * sum(r == o for r, o in zip(reference, other)) / n,
        "mean_common_prefix_pct": 100.0 * sum(prefix) / n,
        "identical_text": identical,
    }


def main_agreement(args) -> dict:
    conversations = chat_prompts(args.num_prompts, args.seed)
    engine = {"kernels": args.kernels}
    if args.kv_cache_memory_gib:
        engine["kv_cache_memory_gib"] = args.kv_cache_memory_gib
    ref, ref_texts, wall32 = generate(args.model, "float32", conversations, args.max_tokens, args.device, **engine)
    bf, bf_texts, wall16 = generate(args.model, "bfloat16", conversations, args.max_tokens, args.device, **engine)
    summary = agreement(ref, ref_texts, bf, bf_texts)
    if args.tokens_out:  # for another engine's answers to be scored against the same reference
        Path(args.tokens_out).write_text(json.dumps({"float32": ref, "bfloat16": bf}))
    summary.update(model=args.model or "SmolLM2-135M-Instruct (embedded)", device=args.device,
                   kernels=args.kernels, max_tokens=args.max_tokens, seed=args.seed,
                   wall_s={"float32": round(wall32, 2), "bfloat16": round(wall16, 2)})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--seed", type=int, default=0, help="order and choice of the prompts")
    parser.add_argument("--kv-cache-memory-gib", type=float, default=None,
                        help="KV cache of each engine (None: the engine's default)")
    parser.add_argument("--layers", action="store_true", help="per-op and per-layer error table (CPU)")
    parser.add_argument("--layer-prompts", type=int, default=16, help="--layers: chat prompts in the prefill")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--tokens-out", default=None, help="write both runs' output token ids here (JSON)")
    args = parser.parse_args()
    if args.layers:
        from bf16_layers import layer_report

        summary = layer_report(args.model, chat_prompts(args.layer_prompts, args.seed))
    else:
        summary = main_agreement(args)
    print(json.dumps(summary, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
