"""The fastest a device could run a decode-heavy `batchllm bench` workload (issue 14: "where a target
proves physically out of reach, show the arithmetic"). No GPU, no engine: arithmetic on the model's
shape (config.json) and the workload `batchllm bench` builds from the same flags.

Model of the run (what the engine does when the KV cache holds the whole batch: `preempt 0`, every
request admitted in the first wave): one prefill pass computing each group's shared prefix once and
every request's own tokens; then one decode step per output position, each step computing one token
for every request still running. Per decode step:
- matmuls: the larger of the compute (2 x parameters x tokens, at the matmul peak) and one read of
  the weights (bytes / bandwidth): small batches are bandwidth-bound;
- attention: one read of every running request's own KV (its distinct prompt tokens and outputs so
  far) and of each running group's shared prefix once (prefix-shared attention), at the bandwidth.
Two bounds: "sequential" adds matmuls and attention per step (each layer's attention needs its
projections and feeds the next layer); "overlapped" takes per step the larger of compute and all
memory traffic, as if nano-batches hid one under the other perfectly (NanoFlow-style), which no
engine measured here does. Prefill counts linear-layer FLOPs only. Both bounds ignore the host, the
LM head's share, norms, sampling, and attention FLOPs: real runs can only be slower.

    python benchmarks/decode_bound.py --model benchmarks/configs/llama-3.1-8b --workload decodeheavy \\
        --shared 1000 --distinct 100 --degree 8 --requests 512 --peak-tflops 780 --bandwidth-tbs 4.8 4.0
    (FP8 weights: --weight-bytes 1 --peak-tflops 1300, the measured FP8 GEMM rate; FP8 KV: --dtype-bytes 1)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from batchllm.bench import add_bench_parser, make_workload  # noqa: E402
from batchllm.models.spec import read_model_spec  # noqa: E402


def parameter_count(spec) -> int:
    """Decoder linear layers + embedding + LM head (untied); the norm weights (0.003% on 8B) are left out."""
    h, i, L = spec.hidden_size, spec.intermediate_size, spec.num_layers
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i
    embeddings = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    return L * per_layer + embeddings


def group_of(prompt: list[int], shared: int) -> tuple[int, ...]:
    return tuple(prompt[:shared])


def decode_bounds(prompts, outputs, shared: int, params: int, weight_bytes: float, kv_bytes_per_token: int,
                  peak: float, bandwidth: float) -> dict[str, float]:
    """Seconds of the sequential and overlapped bounds (module docstring) for one device, and the
    sequential bound's decode matmul and attention parts (sequential = prefill + matmul + attention)."""
    groups: dict[tuple, list[int]] = {}
    for prompt, n in zip(prompts, outputs):
        groups.setdefault(group_of(prompt, shared), []).append(n)
    group_ends = [max(ns) for ns in groups.values()]
    own_prompt = [len(p) - shared for p in prompts]
    prefill = 2 * params * (len(groups) * shared + sum(own_prompt)) / peak
    sequential = overlapped = prefill
    matmul = attention = 0.0
    for step in range(1, max(outputs) + 1):
        running = [i for i, n in enumerate(outputs) if n >= step]
        compute = 2 * params * len(running) / peak
        own_tokens = sum(own_prompt[i] + step for i in running)
        shared_tokens = shared * sum(1 for end in group_ends if end >= step)
        kv_read = (own_tokens + shared_tokens) * kv_bytes_per_token
        matmul += max(compute, weight_bytes / bandwidth)
        attention += kv_read / bandwidth
        sequential += max(compute, weight_bytes / bandwidth) + kv_read / bandwidth
        overlapped += max(compute, (weight_bytes + kv_read) / bandwidth)
    return {"prefill_s": prefill, "sequential_s": sequential, "overlapped_s": overlapped,
            "decode_matmul_s": matmul, "decode_attention_s": attention}


def main() -> None:
    parser = argparse.ArgumentParser(prog="batchllm")
    add_bench_parser(parser.add_subparsers(dest="command"))
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--peak-tflops", type=float, default=780.0, help="matmul peak (H200 bf16, measured: ~780)")
    own.add_argument("--bandwidth-tbs", type=float, nargs="+", default=[4.8, 4.0],
                     help="memory bandwidth(s) in TB/s (H200: 4.8 peak; ~4.0 reached by streaming kernels)")
    own.add_argument("--dtype-bytes", type=int, default=2, help="bytes per KV element (bf16: 2, fp8: 1)")
    own.add_argument("--weight-bytes", type=int, default=2, help="bytes per weight (bf16: 2, fp8: 1)")
    ours, rest = own.parse_known_args()
    args = parser.parse_args(["bench", *rest])
    spec = read_model_spec(Path(args.model))
    workload = make_workload(args, spec.vocab_size)
    params = parameter_count(spec)
    shared = args.shared if args.workload in ("shared", "decodeheavy") else 0
    for bandwidth in ours.bandwidth_tbs:
        b = decode_bounds(workload.prompts, workload.max_tokens, shared, params, params * ours.weight_bytes,
                          spec.kv_bytes_per_token * ours.dtype_bytes, ours.peak_tflops * 1e12, bandwidth * 1e12)
        n = len(workload.prompts)
        print(json.dumps({"workload": workload.name, "parameters": params, "peak_tflops": ours.peak_tflops,
                          "bandwidth_tbs": bandwidth, **{k: round(v, 2) for k, v in b.items()},
                          "sequential_req_s": round(n / b["sequential_s"], 1),
                          "overlapped_req_s": round(n / b["overlapped_s"], 1)}))


if __name__ == "__main__":
    main()
