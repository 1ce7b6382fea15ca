"""`batchllm bench`: throughput on synthetic workloads (the BatchLLM paper's and a few more).

Workloads are token ids drawn at random, with distinct first tokens so that groups (and members)
never share by chance: the saving ratio's bound is exact. All configurations run in one engine,
one after another (same weights, same KV cache), so their ratios are measured side by side.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Any

from batchllm.config import SharingConfig
from batchllm.sampling_params import SamplingParams


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1000, vocab) for _ in range(n)]


def shared_prefix_workload(
    shared: int, distinct: int, degree: int, num_requests: int, output: int, vocab: int, seed: int = 0,
    shuffle: bool = True,
) -> Workload:
    """The paper's microbenchmark: groups of `degree` prompts = one shared prefix + a distinct suffix."""
    rng = random.Random(seed)
    prompts = []
    for i in range(num_requests):
        g, m = divmod(i, degree)
        if m == 0:
            prefix = [1 + g % 900] + _tokens(rng, shared - 1, vocab)
        prompts.append(prefix + [100 + m % 900] + _tokens(rng, distinct - 1, vocab))
    if shuffle:
        rng.shuffle(prompts)
    return Workload(f"shared{shared}-distinct{distinct}-degree{degree}-n{num_requests}", prompts, [output] * num_requests)


def snippet_workload(num_requests: int, vocab: int, seed: int = 0, mean_degree: float = 3.0, prefix: int = 1570,
                     distinct: int = 30, output: int = 100) -> Workload:
    """Snippet-like: geometric group sizes with mean ~3, prefixes ~N(1570, 300), suffixes ~30 tokens."""
    rng = random.Random(seed)
    prompts: list[list[int]] = []
    g = 0
    while len(prompts) < num_requests:
        size = 1
        while rng.random() > 1 / mean_degree:
            size += 1
        p_len = max(64, int(rng.gauss(prefix, 300)))
        head = [1 + g % 900] + _tokens(rng, p_len - 1, vocab)
        for m in range(min(size, num_requests - len(prompts))):
            prompts.append(head + [100 + m % 900] + _tokens(rng, max(1, int(rng.gauss(distinct, 8))) - 1, vocab))
        g += 1
    rng.shuffle(prompts)
    return Workload(f"snippet-n{num_requests}", prompts, [output] * num_requests)


def no_sharing_workload(num_requests: int, vocab: int, prompt_len: int = 1024, output: int = 128, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts = [[1 + i % 900] + _tokens(rng, prompt_len - 1, vocab) for i in range(num_requests)]
    return Workload(f"nosharing-{prompt_len}-{output}-n{num_requests}", prompts, [output] * num_requests)


def decode_heavy_workload(num_requests: int, vocab: int, shared: int = 1000, distinct: int = 100, degree: int = 8,
                          min_out: int = 100, max_out: int = 1000, seed: int = 0) -> Workload:
    base = shared_prefix_workload(shared, distinct, degree, num_requests, 0, vocab, seed)
    rng = random.Random(seed + 1)
    outputs = [rng.randrange(min_out, max_out + 1) for _ in base.prompts]
    return Workload(f"decodeheavy-{min_out}-{max_out}-n{num_requests}", base.prompts, outputs)


def run_workload(llm, workload: Workload, matmul_peak_tflops: float | None = None) -> dict[str, Any]:
    """Run greedily with ignore_eos (every request makes exactly its max_tokens); return the stats.

    On CUDA also: peak GPU memory, the fraction of the run the GPU sat idle between steps (CUDA
    events around each step's forward and sampling), and model-FLOPs utilisation counted as
    2 x parameters x tokens computed (prefill + decode) against `matmul_peak_tflops`."""
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in workload.max_tokens]
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    runner = llm.engine.executor
    cuda = llm.device.type == "cuda"
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats(llm.device)
        runner.gpu_timeline = []
    _sync(llm)
    graph_steps = runner.num_graph_steps
    start = time.perf_counter()
    try:
        llm.generate(prompts, params, use_tqdm=False)
        _sync(llm)
    finally:
        timeline, runner.gpu_timeline = runner.gpu_timeline, None
    wall = time.perf_counter() - start
    s = dict(llm.last_stats)
    s["graph_steps"] = runner.num_graph_steps - graph_steps  # steps run as a decode CUDA graph
    if cuda and timeline:
        busy_ms = sum(a.elapsed_time(b) for a, b in timeline)
        span_ms = timeline[0][0].elapsed_time(timeline[-1][1])
        s.update(gpu_idle_fraction=1.0 - busy_ms / span_ms, peak_gpu_memory_gib=torch.cuda.max_memory_allocated(llm.device) / 2**30)
    computed = s["prefill_tokens_computed"] + s["decode_tokens"]
    num_params = sum(p.numel() for p in llm.model.parameters())
    s.update(model_tflops_per_s=2 * num_params * computed / wall / 1e12, num_params=num_params)
    if matmul_peak_tflops:
        s.update(mfu=s["model_tflops_per_s"] / matmul_peak_tflops, matmul_peak_tflops=matmul_peak_tflops)
    s.update(
        workload=workload.name,
        wall_s=wall,
        requests_per_s=len(workload.prompts) / wall,
        output_tokens_per_s=s["output_tokens"] / wall,
        total_tokens_per_s=(s["output_tokens"] + s["prompt_tokens"]) / wall,
        tokens_per_step=[r.num_tokens for r in llm.engine.step_log[-s["num_steps"]:]],
    )
    return s


def measure_matmul_peak_tflops(device) -> float:
    """bf16 8192^3 matmul on random data, median of repeated runs: the MFU denominator."""
    import torch

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(10):
        a @ b
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return 2 * 8192**3 / (times[len(times) // 2] / 1e3) / 1e12


def _device_name(device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return str(device)


def _sync(llm) -> None:
    if llm.device.type == "cuda":
        import torch

        torch.cuda.synchronize(llm.device)


def make_workload(args) -> Workload:
    vocab = args.vocab
    if args.workload == "shared":
        return shared_prefix_workload(args.shared, args.distinct, args.degree, args.requests, args.output, vocab,
                                      shuffle=not args.sorted)
    if args.workload == "snippet":
        return snippet_workload(args.requests, vocab, output=args.output)
    if args.workload == "nosharing":
        return no_sharing_workload(args.requests, vocab, args.prompt_len, args.output)
    if args.workload == "decodeheavy":
        return decode_heavy_workload(args.requests, vocab, args.shared, args.distinct, args.degree,
                                     args.min_output, args.max_output)
    raise ValueError(f"unknown workload {args.workload!r}")


def add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="measure throughput on a synthetic workload",
                       description="Run a synthetic workload once per configuration, side by side in one process.")
    b.add_argument("--workload", default="shared", choices=["shared", "snippet", "nosharing", "decodeheavy"])
    b.add_argument("--shared", type=int, default=2000, help="shared prefix tokens (shared, decodeheavy)")
    b.add_argument("--distinct", type=int, default=200, help="distinct suffix tokens (shared, decodeheavy)")
    b.add_argument("--degree", type=int, default=16, help="prompts per shared prefix")
    b.add_argument("--requests", type=int, default=1024)
    b.add_argument("--output", type=int, default=100, help="output tokens per request (ignore_eos)")
    b.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens (nosharing)")
    b.add_argument("--min-output", type=int, default=100, help="shortest output (decodeheavy)")
    b.add_argument("--max-output", type=int, default=1000, help="longest output (decodeheavy)")
    b.add_argument("--sorted", action="store_true", help="keep requests grouped by prefix (default: shuffled)")
    b.add_argument("--configs", default="sharing,nosharing",
                   help="comma list of: sharing, nosharing, single (one-level plan), order-prefill, order-fifo; "
                        "sharing-plainattn (prefix-shared attention off), sharing-fused, sharing-narrow "
                        "(its launch modes; Triton backend), sharing-prefill64, sharing-torchops, "
                        "sharing-sync and nosharing-sync (asynchronous scheduling off), sharing-eager and "
                        "nosharing-eager (decode CUDA graphs off)")
    b.add_argument("--model", default=None, help="model directory (config.json; weights unless --load-format dummy)")
    b.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    b.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    b.add_argument("--device", default="auto")
    b.add_argument("--max-model-len", type=int, default=None)
    b.add_argument("--max-num-batched-tokens", type=int, default=8192)
    b.add_argument("--kv-cache-memory-gib", type=float, default=None)
    b.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    b.add_argument("--prefill-launch", default=None,
                   help="Triton attention in steps with prefill: rows,keys,warps,stages (e.g. 128,64,8,2)")
    b.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"],
                   help="norm, rotary and SiLU: one Triton kernel each (auto on CUDA) or torch")
    b.add_argument("--enforce-eager", action="store_true", help="capture no CUDA graphs (every config runs eagerly)")
    b.add_argument("--max-cudagraph-capture-size", type=int, default=512,
                   help="largest decode batch with a CUDA graph (default 512)")
    b.add_argument("--warmup-requests", type=int, default=8, help="a small run first, not measured")
    b.add_argument("--json-out", default=None, help="write every configuration's stats as JSON here")
    b.add_argument("--profile-out", default=None,
                   help="then profile the first --profile-requests requests (last config) and write the GPU "
                        "time per kernel category here")
    b.add_argument("--profile-requests", type=int, default=256)
    b.add_argument("--cpu-profile-out", default=None,
                   help="then run the first --profile-requests requests (last config) under cProfile and write "
                        "the host functions with the most own time here")


BACKEND_CONFIGS = {  # Triton backend settings of the prefix-sharing variants (defaults for every other config)
    "sharing-plainattn": dict(use_prefix_groups=False),
    "sharing-fused": dict(group_launch="fused"),
    "sharing-narrow": dict(group_launch="narrow"),
    "sharing-prefill64": dict(prefill_launch=(64, 64, 4, 2)),  # the attention launch of prefill before session 3
}
OPS_CONFIGS = {"sharing-torchops": "torch"}  # the model's elementwise ops ("sharing-torchops": torch, not Triton)
SYNC_CONFIGS = {"sharing-sync", "nosharing-sync"}  # asynchronous scheduling off (each step waits for the one before)
EAGER_CONFIGS = {"sharing-eager", "nosharing-eager"}  # no CUDA graphs (every decode step launched kernel by kernel)
CONFIGS = {
    "sharing": dict(prefix_sharing=True),
    **{name: dict(prefix_sharing=True) for name in (*BACKEND_CONFIGS, *OPS_CONFIGS, "sharing-sync", "sharing-eager")},
    "nosharing": dict(prefix_sharing=False),
    "nosharing-sync": dict(prefix_sharing=False),
    "nosharing-eager": dict(prefix_sharing=False),
    "single": dict(prefix_sharing=True, plan_mode="single"),
    "order-prefill": dict(prefix_sharing=True, group_order="prefill"),
    "order-fifo": dict(prefix_sharing=True, group_order="fifo"),
}


def bench_command(args) -> int:
    from batchllm.layers.ops import make_ops
    from batchllm.llm import LLM

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"batchllm bench: unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, device=args.device,
              max_model_len=args.max_model_len, max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_gib=args.kv_cache_memory_gib, attention_backend=args.attention_backend,
              kernels=args.kernels, enforce_eager=args.enforce_eager,
              max_cudagraph_capture_size=args.max_cudagraph_capture_size,
              skip_tokenizer_init=True)  # workloads are token ids
    args.vocab = llm.model_spec.vocab_size
    workload = make_workload(args)
    peak = measure_matmul_peak_tflops(llm.device) if llm.device.type == "cuda" else None
    if peak:
        print(f"bf16 matmul peak (8192^3, random data): {peak:.0f} TFLOP/s", flush=True)
    graphs = llm.engine.executor.decode_graphs
    graph_info = None
    if graphs is not None and graphs.capture_seconds:
        graph_info = dict(sizes=graphs.sizes, capture_s=graphs.capture_seconds,
                          memory_gib=graphs.capture_memory_bytes / 2**30)
        print(f"decode CUDA graphs: {len(graphs.sizes)} batch sizes up to {graphs.max_batch}, captured in "
              f"{graphs.capture_seconds:.1f} s, {graph_info['memory_gib']:.2f} GiB", flush=True)
    if args.warmup_requests:
        n = min(args.warmup_requests, len(workload.prompts))
        run_workload(llm, Workload("warmup", workload.prompts[:n], [4] * n))
    results = []
    backend = llm.attention_backend
    if args.prefill_launch:
        backend.prefill_launch = tuple(int(x) for x in args.prefill_launch.split(","))
    defaults = {key: getattr(backend, key) for key in ("use_prefix_groups", "group_launch", "prefill_launch")
                if hasattr(backend, key)}
    overlap = llm.engine.async_scheduling
    for name in names:
        llm.sharing = SharingConfig(**CONFIGS[name])
        llm.engine.async_scheduling = overlap and name not in SYNC_CONFIGS
        llm.engine.executor.use_cuda_graphs = name not in EAGER_CONFIGS
        if defaults:
            for key, value in {**defaults, **BACKEND_CONFIGS.get(name, {})}.items():
                setattr(backend, key, value)
        llm.model.use_ops(make_ops(OPS_CONFIGS.get(name, args.kernels), llm.device))
        stats = run_workload(llm, workload, peak)
        stats["config"] = name
        stats["async_scheduling"] = llm.engine.async_scheduling
        runner = llm.engine.executor
        stats["cuda_graphs"] = runner.decode_graphs is not None and runner.use_cuda_graphs
        results.append(stats)
        print(_line(stats), flush=True)
    n = args.profile_requests
    profiled = Workload(f"{workload.name} (first {n})", workload.prompts[:n], workload.max_tokens[:n])
    if args.profile_out:
        _profile_kernels(llm, profiled, args.profile_out)
    if args.cpu_profile_out:
        _profile_host(llm, profiled, args.cpu_profile_out)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": _device_name(llm.device), "dtype": str(llm.dtype), "model": str(llm.model_dir),
                       "kv_blocks": llm.kv_spec.num_blocks, "matmul_peak_tflops": peak, "cuda_graphs": graph_info,
                       "results": results}, f)
    return 0


KERNEL_CATEGORIES = (  # (category, substrings of CUDA kernel names), first match wins
    ("attention", ("_paged_attention", "_merge_partials")),
    ("norm/rotary/silu (Triton)", ("_rms_norm", "_silu_and_mul", "_rotary")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "matmul", "cublas")),
    ("kv store / gathers", ("index", "scatter", "gather")),
    ("torch elementwise / reductions", ("elementwise", "vectorized", "reduce", "unrolled")),
)


def _profile_host(llm, workload: Workload, path: str) -> None:
    """Run the workload under cProfile; write the 40 functions with the most own (host) time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    stats = run_workload(llm, workload)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    with open(path, "w") as f:
        f.write(f"{workload.name}: {stats['num_steps']} steps, {stats['wall_s']:.1f} s under cProfile\n")
        f.write(text.getvalue())


def _profile_kernels(llm, workload: Workload, path: str) -> None:
    """Run the workload (last config's settings) under torch.profiler and write where the GPU's
    time goes: per category (KERNEL_CATEGORIES) and the top kernels. Not a throughput run."""
    from torch.profiler import ProfilerActivity, profile

    cuda = llm.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        stats = run_workload(llm, workload)
    events = prof.key_averages()  # on CPU: the ops' own CPU time, for a dry run of this code
    kernels = [(e.key, e.device_time_total if cuda else e.self_cpu_time_total, e.count) for e in events]
    kernels = [k for k in kernels if k[1] > 0]
    total = sum(t for _, t, _ in kernels) or 1.0
    by_category: dict[str, float] = {}
    for name, t, _ in kernels:
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name.lower() for k in keys)), "other")
        by_category[category] = by_category.get(category, 0.0) + t
    lines = [f"{workload.name}: {stats['num_steps']} steps, wall {stats['wall_s']:.2f} s (profiled), "
             f"{'GPU kernel' if cuda else 'CPU op'} time {total / 1e6:.2f} s"]
    lines += [f"  {c:<32} {t / 1e6:8.3f} s {100 * t / total:5.1f}%" for c, t in sorted(by_category.items(),
                                                                                      key=lambda kv: -kv[1])]
    lines.append("top kernels (total ms, calls, name):")
    lines += [f"  {t / 1e3:10.1f} {n:7d}  {name[:150]}" for name, t, n in sorted(kernels, key=lambda k: -k[1])[:30]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:12]), flush=True)


def _line(s: dict) -> str:
    return (f"{s['workload']:<40} {s['config']:<14} {s['requests_per_s']:8.2f} req/s {s['output_tokens_per_s']:9.1f} out tok/s "
            f"saving {100 * s['saving_ratio']:5.1f}%  steps {s['num_steps']:6d}  tok/step {s['mean_tokens_per_step']:7.1f}  "
            f"preempt {s['num_preemptions']}  {s['wall_s']:.1f}s"
            + (f"  MFU {100 * s['mfu']:4.1f}%" if "mfu" in s else "")
            + (f"  GPU idle {100 * s['gpu_idle_fraction']:4.1f}%  peak mem {s['peak_gpu_memory_gib']:.1f} GiB"
               if "gpu_idle_fraction" in s else "")
            + (f"  graph steps {s['graph_steps']}" if s.get("graph_steps") else ""))
