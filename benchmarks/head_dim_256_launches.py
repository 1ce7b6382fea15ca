"""Launches for head dim 256 on a GPU (session 35, docs/benchmarks.md): a tiny Llama of head dim 256 (bf16, random
weights), 96 prompts sharing a 1,200-token prefix plus 3 others, 24 output tokens each. Per candidate (the prefill
launch: rows, keys per tile, warps, stages; the decode tile), over a bf16 and an fp8 cache: whether the engine starts,
the seconds for the batch, and (bf16 cache) how many outputs equal the torch reference's.

Usage, on the device from the repository root: PYTHONPATH=$PWD python3 benchmarks/head_dim_256_launches.py
"""

from __future__ import annotations

import gc
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from batchllm import LLM, SamplingParams
from batchllm.attention import triton_backend

MODEL_DIR = "/tmp/batchllm-head-dim-256"
CANDIDATES = {"A": ((64, 32, 4, 2), (32, 4, 2)), "B": ((64, 64, 4, 1), (64, 4, 1)), "C": ((32, 32, 4, 1), (32, 4, 1)),
              "D": ((64, 32, 4, 1), (32, 4, 1)), "E": ((32, 64, 4, 2), (32, 4, 2))}


def make_model() -> None:
    config = AutoConfig.for_model("llama", vocab_size=4000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=256,
                                  max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(MODEL_DIR)


def timed_run(options: dict) -> tuple[float, list]:
    shared = list(range(3, 1203))
    prompts = [{"prompt_token_ids": shared + [7 + i % 50] * (5 + i % 40)} for i in range(96)]
    prompts += [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 300, 2000)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    llm = None
    try:
        llm = LLM(MODEL_DIR, skip_tokenizer_init=True, engines_per_gpu=1, max_model_len=4096, **options)
        llm.generate(prompts[:4], params, use_tqdm=False)  # (compiles)
        torch.cuda.synchronize()
        started = time.perf_counter()
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        torch.cuda.synchronize()
        return time.perf_counter() - started, outputs
    finally:
        if llm is not None:
            llm.shutdown()
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    make_model()
    _, reference = timed_run({"attention_backend": "torch"})
    for name, (prefill, decode) in CANDIDATES.items():
        triton_backend.HEAD_256_PREFILL_LAUNCH = prefill
        triton_backend.HEAD_256_DECODE_TILE = triton_backend.TileConfig(*decode)
        for cache in ("auto", "fp8"):
            try:
                seconds, outputs = timed_run({"kv_cache_dtype": cache})
            except Exception as e:  # noqa: BLE001 - a launch that does not fit is a result
                print(f"FAIL {name} {prefill} {decode} cache {cache}: {type(e).__name__}: {str(e)[:150]}", flush=True)
                continue
            same = sum(a == b for a, b in zip(outputs, reference)) if cache == "auto" else "-"
            print(f"OK {name} {prefill} {decode} cache {cache}: {seconds:.3f} s, equal to the reference: {same}",
                  flush=True)


if __name__ == "__main__":
    main()
