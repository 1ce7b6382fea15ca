"""CPU cost of the engine around the model: scheduling, input building, the attention work plan,
sampling and output handling, with the model replaced by a stub (no GPU needed).

    .venv/bin/python benchmarks/step_overhead.py [--requests 1024] [--profile]

Runs the 2000/200 degree-16 workload through `LLM.generate` with a model whose forward and logits
are skipped (zeros), so almost all time is the per-step CPU work that a GPU run must hide. Prints
milliseconds per decode step.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig

from batchllm import LLM
from batchllm.attention.triton_backend import TritonBackend
from batchllm.bench import run_workload, shared_prefix_workload, snippet_workload


class PlanningStub:
    """Stands in for the attention backend: runs the Triton backend's planning half (work plan,
    launches, packed arrays; CPU) once per step, as its first layer would, and attends to nothing.
    Planned for the Llama-3-8B head layout (32 query heads, 8 KV heads, head dim 128)."""

    def __init__(self) -> None:
        self.triton = TritonBackend()

    def forward(self, query, key, value, kv_cache, metadata, scale):
        self.triton._plan(metadata, 4, 32, 128, 8)
        return query


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--output", type=int, default=30)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--kv-gib", type=float, default=4.0,
                        help="KV cache size (the stub model is 64 wide: 4 GiB ~ 4M tokens)")
    parser.add_argument("--workload", default="shared", choices=["shared", "snippet"])
    parser.add_argument("--tokenizer", default=None,
                        help="a model directory whose tokenizer detokenizes the outputs (default: token ids only)")
    args = parser.parse_args()
    model_dir = Path(tempfile.mkdtemp(prefix="batchllm-step-overhead-"))
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096,
                architectures=["LlamaForCausalLM"]).save_pretrained(model_dir)
    llm = LLM(str(model_dir), load_format="dummy", device="cpu", dtype="float32",
              skip_tokenizer_init=args.tokenizer is None, tokenizer=args.tokenizer, max_model_len=4096,
              kv_cache_memory_gib=args.kv_gib, max_num_batched_tokens=8192)
    llm.engine.runner.backend = PlanningStub()
    model = llm.engine.runner.model
    model.forward = lambda input_ids, positions, kv_caches, md, backend: (
        backend.forward(None, None, None, None, md, 1.0), torch.zeros(len(input_ids), model.spec.hidden_size))[1]
    model.compute_logits = lambda hidden: torch.zeros(hidden.shape[0], 8)  # no vocab-sized matmul either
    if args.workload == "snippet":
        workload = snippet_workload(args.requests, llm.model_spec.vocab_size, output=args.output)
    else:
        workload = shared_prefix_workload(2000, 200, 16, args.requests, args.output, llm.model_spec.vocab_size)
    phase_ms: dict[str, list[float]] = {"schedule": [], "update": []}
    scheduler = llm.engine.core.scheduler
    for phase, name in (("schedule", "schedule"), ("update", "update_from_output")):
        method = getattr(scheduler, name)

        def timed(*a, _method=method, _phase=phase):
            start = time.perf_counter()
            result = _method(*a)
            batch = result if _phase == "schedule" else a[0]
            if batch.requests and batch.num_tokens == len(batch.requests) > 1:  # pure decode steps
                phase_ms[_phase].append(1e3 * (time.perf_counter() - start))
            return result

        setattr(scheduler, name, timed)
    profiler = cProfile.Profile() if args.profile else None
    if profiler:
        profiler.enable()
    start = time.perf_counter()
    stats = run_workload(llm, workload)
    wall = time.perf_counter() - start
    if profiler:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    decode_steps = [r for r in llm.engine.core.step_log[-stats["num_steps"]:] if r.num_tokens == r.num_requests] or [
        max(llm.engine.core.step_log[-stats["num_steps"]:], key=lambda r: r.num_requests)]
    print(f"{stats['num_steps']} steps in {wall:.2f} s; {len(decode_steps)} pure decode steps of "
          f"~{max(r.num_requests for r in decode_steps)} requests: runner "
          f"{1e3 * sum(r.seconds for r in decode_steps) / len(decode_steps):.2f} ms/step; whole loop "
          f"{1e3 * wall / stats['num_steps']:.2f} ms/step on average")
    for phase, values in phase_ms.items():
        if values:
            print(f"  scheduler {phase}: median {sorted(values)[len(values) // 2]:.2f} ms per pure decode step")


if __name__ == "__main__":
    main()
