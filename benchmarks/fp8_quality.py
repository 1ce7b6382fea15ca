"""FP8 quality on real weights (issue 16): SmolLM2-135M-Instruct with FP8 weights, an FP8 KV cache,
FP8 attention over it (`fp8_attention`) and their combinations, against the same engine in bfloat16,
on deterministic chat prompts (`chat_prompts.py`), greedy. Reports per variant: identical outputs,
greedy-token and top-5-set agreement over the steps both runs reached with the same tokens so far,
and the mean |delta logprob| of the reference's chosen token (`tp_agreement.compare`).

    python benchmarks/fp8_quality.py --num-prompts 300 --json-out fp8_quality.json     # CPU: emulated FP8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import chat_prompts  # noqa: E402
from tp_agreement import compare  # noqa: E402

from batchllm import LLM, SamplingParams  # noqa: E402

VARIANTS = {"bf16": {}, "fp8 weights": {"quantization": "fp8"}, "fp8 kv": {"kv_cache_dtype": "fp8"},
            "fp8 weights + kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
            "fp8 kv + attention": {"kv_cache_dtype": "fp8", "fp8_attention": True},
            "fp8 weights + kv + attention": {"quantization": "fp8", "kv_cache_dtype": "fp8", "fp8_attention": True},
            "fp8 weights row-scaled": {"quantization": "fp8", "fp8_deferred_scales": False},
            "fp8 weights deferred": {"quantization": "fp8", "fp8_deferred_scales": True},
            "fp8 weights + kv deferred": {"quantization": "fp8", "kv_cache_dtype": "fp8", "fp8_deferred_scales": True}}
"""On a GPU with FP8 tensor cores "fp8 weights" defers its scales (the default); on CPU it does not, and
"fp8 weights deferred" (or "fp8 weights + kv deferred") makes the model defer there too
(`match_deferred_scales`): the unscaled product rounded to bfloat16 before the scales, as `_scaled_mm` gives
it on the GPU."""


def run(conversations, max_tokens: int, device: str, options: dict) -> tuple[list, float]:
    llm = LLM(None, dtype="bfloat16", device=device, **options)
    if options.get("fp8_deferred_scales") and device == "cpu":  # defer as on an FP8 GPU (there: the default)
        llm.engine.model.match_deferred_scales(True)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=5)
    start = time.perf_counter()
    outs = [o.outputs[0] for o in llm.chat(conversations, params, use_tqdm=False)]
    wall = time.perf_counter() - start
    llm.shutdown()
    return outs, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default=None)
    p.add_argument("--variants", default=",".join(list(VARIANTS)[1:]),
                   help=f"comma-separated, each against bf16; of {list(VARIANTS)[1:]}")
    args = p.parse_args()
    conversations = chat_prompts(args.num_prompts, args.seed)
    reference, wall = run(conversations, args.max_tokens, args.device, VARIANTS["bf16"])
    result = {"prompts": args.num_prompts, "max_tokens": args.max_tokens, "device": args.device,
              "wall_s": {"bf16": round(wall, 1)}}
    for name in args.variants.split(","):
        options = VARIANTS[name]
        outs, wall = run(conversations, args.max_tokens, args.device, options)
        result[name] = compare(reference, outs)
        result["wall_s"][name] = round(wall, 1)
        r = result[name]
        print(f"{name:17s} vs bf16: identical {100 * r['identical_outputs']:5.1f}%  greedy token "
              f"{100 * r['greedy_token_agreement']:5.1f}%  top-5 set {100 * r['top5_set_agreement']:5.1f}%  "
              f"mean |dlogprob| {r['mean_abs_delta_logprob']:.4f}  ({r['steps_compared']} steps)", flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
