"""Beam search with the KV of each step kept for the next (the default) against recomputed (the engine's KV cache
switched off, `kv.cache = None`: what every call did before, each step still sharing its beams' prefixes within
itself): every step is one call over the live beams (`beam_search.py`), so without kept KV each step computes every
prompt again. One engine per setting, in this process, one after the other; prints wall time, prefill tokens computed
and engine steps of each, and their ratio. PYTHONPATH=<another tree> runs this script on that tree's engine.

    python3 benchmarks/beam_steps.py --model benchmarks/configs/llama-3.1-8b --prompts 16 --prompt-len 1000 \\
        --beam-width 4 --max-tokens 32 -- --load-format dummy --dtype bfloat16                  # GPU
    python3 benchmarks/beam_steps.py --model <tiny model dir> --prompts 2 --prompt-len 64 --beam-width 2 \\
        --max-tokens 4 -- --device cpu                                                       # CPU, small
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main() -> int:
    from batchllm import LLM
    from batchllm.cli import build_parser
    from batchllm.options import engine_kwargs_from_args
    from batchllm.sampling_params import BeamSearchParams

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=1000)
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    ours, engine_flags = parser.parse_known_args()
    engine_flags = [f for f in engine_flags if f != "--"]
    kwargs = engine_kwargs_from_args(build_parser().parse_args(["bench", "--model", ours.model, *engine_flags]))
    results = {}
    for caching in (True, False):
        llm = LLM(**{**kwargs, "skip_tokenizer_init": True})  # (token ids only: a config dir holds no tokenizer)
        if not caching:
            llm.engine.core.scheduler.kv.cache = None
        vocab = llm.model_spec.vocab_size
        prompts = [{"prompt_token_ids": np.random.default_rng(i).integers(0, vocab, ours.prompt_len).tolist()}
                   for i in range(ours.prompts)]
        params = BeamSearchParams(beam_width=ours.beam_width, max_tokens=ours.max_tokens, ignore_eos=True)
        llm.beam_search(prompts[:1], BeamSearchParams(beam_width=2, max_tokens=2))  # (warm-up: compiles, graphs)
        llm.reset_prefix_cache()
        stats = llm.engine.core.scheduler.stats
        computed, steps = stats.prefill_tokens, stats.num_steps
        started = time.perf_counter()
        llm.beam_search(prompts, params)
        results["kept" if caching else "recomputed"] = {
            "wall_s": round(time.perf_counter() - started, 3),
            "prefill_tokens_computed": stats.prefill_tokens - computed, "engine_steps": stats.num_steps - steps}
        llm.shutdown()
    ratio = results["recomputed"]["wall_s"] / results["kept"]["wall_s"]
    print(json.dumps({**results, "speedup": round(ratio, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
