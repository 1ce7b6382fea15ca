"""`batchllm bench`: throughput on synthetic workloads (the BatchLLM paper's and a few more), or on a
JSONL file of token prompts.

Synthetic workloads are token ids drawn at random, with distinct first tokens so that groups (and
members) never share by chance: the saving ratio's bound is exact. A file workload (`--workload file`)
takes the token-prompt lines `batchllm run` reads, so both commands can time the same requests.

Each configuration runs on an engine of its own, built from the same options but the one it changes
(`CONFIGS`), one after another in one process; each engine is freed before the next is built, so
every one gets the same KV cache size.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """n random token ids of a `vocab`-token model, from 1000 up (clear of the special tokens a vocabulary starts
    with), or from its upper half where the vocabulary has no more than 1000 tokens."""
    low = 1000 if vocab > 1000 else vocab // 2
    return [rng.randrange(low, vocab) for _ in range(n)]


def _marker(first: int, i: int, vocab: int) -> int:
    """The token that opens group (or member) i's part: first + i % 900, wrapped into a vocabulary smaller than
    that (larger ones keep the paper's prompts)."""
    return (first + i % 900) % vocab


def shared_prefix_workload(
    shared: int, distinct: int, degree: int, num_requests: int, output: int, vocab: int, seed: int = 0,
    shuffle: bool = True,
) -> Workload:
    """The paper's microbenchmark: groups of `degree` prompts = one shared prefix of `shared` tokens + a distinct
    suffix of `distinct` (either may be 0, not both: `workload_option_problem`)."""
    rng = random.Random(seed)
    prompts = []
    for i in range(num_requests):
        g, m = divmod(i, degree)
        if m == 0:
            prefix = [_marker(1, g, vocab)] + _tokens(rng, shared - 1, vocab) if shared else []
        prompts.append(prefix + ([_marker(100, m, vocab)] + _tokens(rng, distinct - 1, vocab) if distinct else []))
    if shuffle:
        rng.shuffle(prompts)
    return Workload(f"shared{shared}-distinct{distinct}-degree{degree}-n{num_requests}", prompts,
                    [output] * num_requests)


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
        head = [_marker(1, g, vocab)] + _tokens(rng, p_len - 1, vocab)
        for m in range(min(size, num_requests - len(prompts))):
            suffix = _tokens(rng, max(1, int(rng.gauss(distinct, 8))) - 1, vocab)
            prompts.append(head + [_marker(100, m, vocab)] + suffix)
        g += 1
    rng.shuffle(prompts)
    return Workload(f"snippet-n{num_requests}", prompts, [output] * num_requests)


def no_sharing_workload(num_requests: int, vocab: int, prompt_len: int = 1024, output: int = 128,
                        seed: int = 0) -> Workload:
    rng = random.Random(seed)
    prompts = [[_marker(1, i, vocab)] + _tokens(rng, prompt_len - 1, vocab) for i in range(num_requests)]
    return Workload(f"nosharing-{prompt_len}-{output}-n{num_requests}", prompts, [output] * num_requests)


def decode_heavy_workload(num_requests: int, vocab: int, shared: int = 1000, distinct: int = 100, degree: int = 8,
                          min_out: int = 100, max_out: int = 1000, seed: int = 0) -> Workload:
    base = shared_prefix_workload(shared, distinct, degree, num_requests, 0, vocab, seed)
    rng = random.Random(seed + 1)
    outputs = [rng.randrange(min_out, max_out + 1) for _ in base.prompts]
    return Workload(f"decodeheavy-{min_out}-{max_out}-n{num_requests}", base.prompts, outputs)


def prompt_file_workload(path: str, output: int, vocab: int | None = None) -> Workload:
    """The requests of a JSONL file of token prompts, one per line: {"prompt_token_ids": [ids], "max_tokens": n}
    (max_tokens optional: `output`; other fields, such as an id or sampling settings, are not read: bench runs
    greedily with ignore_eos). Raises ValueError naming the file, the line and the problem; with `vocab`, also
    for an id outside [0, vocab). A byte-order mark opening the file is not read (as `run` reads its input)."""
    prompts, max_tokens = [], []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompt, n = _token_prompt(json.loads(line), output, vocab)
            except (ValueError, TypeError) as e:  # json's errors are ValueErrors too
                raise ValueError(f"{path}, line {number}: {e}") from None
            prompts.append(prompt)
            max_tokens.append(n)
    if not prompts:
        raise ValueError(f"{path} holds no requests")
    return Workload(f"file-{Path(path).stem}-n{len(prompts)}", prompts, max_tokens)


def _token_prompt(line: Any, output: int, vocab: int | None) -> tuple[list[int], int]:
    if not isinstance(line, dict) or "prompt_token_ids" not in line:
        raise ValueError("expected an object with 'prompt_token_ids' (bench reads token prompts only)")
    ids = line["prompt_token_ids"]
    if not (isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
        raise ValueError("'prompt_token_ids' must be a non-empty list of integers")
    if min(ids) < 0 or (vocab is not None and max(ids) >= vocab):
        raise ValueError(f"a token id lies outside the vocabulary [0, {vocab if vocab is not None else 'vocab'})")
    n = line.get("max_tokens", output)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"'max_tokens' must be a positive integer, got {n!r}")
    return ids, n


def run_workload(llm, workload: Workload, matmul_peak_tflops: float | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Run greedily with ignore_eos (every request makes exactly its max_tokens), from an empty prefix cache
    (`LLM.reset_prefix_cache`); return the stats. progress:
    `generate`'s token progress bar on stderr (as `run` shows; updated at most every 0.2 s, or where stderr is no
    terminal one plain line every `progress.LOG_INTERVAL_S`).

    On CUDA also: peak GPU memory, the fraction of the run the GPU sat idle between steps (CUDA
    events around each step's forward and sampling), and model-FLOPs utilisation counted as
    2 x parameters x tokens computed (prefill + decode) against `matmul_peak_tflops`."""
    by_length = {m: SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in set(workload.max_tokens)}
    params = [by_length[m] for m in workload.max_tokens]  # (one object per length: `generate` copies each once)
    prompts = [{"prompt_token_ids": p} for p in workload.prompts]
    llm.reset_prefix_cache()  # (as vLLM's benchmarks: nothing an earlier run, the warm-up's, left is found)
    if llm.engine is None:
        return _run_data_parallel(llm, workload, prompts, params, progress)
    engine = llm.engine
    runner = engine.runner
    cuda = engine.device.type == "cuda"
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats(engine.device)
        runner.gpu_timeline = []
    _sync(llm)
    graph_steps = runner.num_graph_steps
    compiled = triton_kernels_compiled() if cuda else None
    start = time.perf_counter()
    try:
        llm.generate(prompts, params, use_tqdm=progress)
        _sync(llm)
    finally:
        timeline, runner.gpu_timeline = runner.gpu_timeline, None
    wall = time.perf_counter() - start
    s = dict(llm.last_stats)
    s["graph_steps"] = runner.num_graph_steps - graph_steps  # steps run as a decode CUDA graph
    if compiled is not None:  # Triton compiles inside the timed run: kernels the warm-up did not reach
        s["triton_compiles"] = triton_kernels_compiled() - compiled
    if cuda and timeline:
        busy_ms = sum(a.elapsed_time(b) for a, b in timeline)
        span_ms = timeline[0][0].elapsed_time(timeline[-1][1])
        s.update(gpu_idle_fraction=1.0 - busy_ms / span_ms,
                 peak_gpu_memory_gib=torch.cuda.max_memory_allocated(engine.device) / 2**30)
    computed = s["prefill_tokens_computed"] + s["decode_tokens"]
    num_params = sum(p.numel() for p in engine.model.parameters())
    s.update(model_tflops_per_s=2 * num_params * computed / wall / 1e12, num_params=num_params)
    if matmul_peak_tflops:
        s.update(mfu=s["model_tflops_per_s"] / matmul_peak_tflops, matmul_peak_tflops=matmul_peak_tflops)
        gpus = llm.config.parallel.tensor_parallel_size  # the limit is the whole model's on every GPU it runs on
        s.update(_compute_limit(llm.model_spec, s, sum(workload.max_tokens), matmul_peak_tflops * gpus, wall))
    s.update(_rates(s, workload, wall), tokens_per_step=[r.num_tokens for r in engine.core.step_log[-s["num_steps"]:]])
    return s


def triton_kernels_compiled() -> int:
    """How many compiled variants BatchLLM's Triton kernels hold now, over all devices (a kernel
    compiles once per specialization: constexprs, dtypes, integer arguments' divisibility by 16)."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        return 0
    kernels = set()
    for name, module in list(sys.modules.items()):
        if name.startswith("batchllm") and module is not None:
            for value in vars(module).values():
                while isinstance(getattr(value, "fn", None), KernelInterface):  # autotuner / heuristics
                    value = value.fn
                if isinstance(value, KernelInterface):
                    kernels.add(value)
    return sum(len(caches[0]) for k in kernels for caches in getattr(k, "device_caches", {}).values())


def _rates(s: dict, workload: Workload, wall: float) -> dict[str, Any]:
    """The run's wall time and throughputs, from its statistics `s` (`LLM.last_stats`)."""
    return dict(workload=workload.name, wall_s=wall, requests_per_s=len(workload.prompts) / wall,
                output_tokens_per_s=s["output_tokens"] / wall,
                total_tokens_per_s=(s["output_tokens"] + s["prompt_tokens"]) / wall)


def _run_data_parallel(llm, workload: Workload, prompts: list, params: list, progress: bool) -> dict[str, Any]:
    """The workload through the data-parallel workers: requests/s and tokens/s of the whole job, and
    each rank's share and finish time (`last_stats["ranks"]`)."""
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=progress)
    wall = time.perf_counter() - start
    s = dict(llm.last_stats)
    s.update(_rates(s, workload, wall))
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


def _sync(llm) -> None:
    if llm.engine.device.type == "cuda":
        import torch

        torch.cuda.synchronize(llm.engine.device)


def bench_refusal(problem: str) -> SystemExit:
    """`bench`'s refusal of its options or inputs, said on stderr: exit 2 (can't start), as `run`'s and argparse's
    (a bare `SystemExit(message)` exited 1, which means "some lines failed")."""
    print(f"batchllm bench: {problem}", file=sys.stderr)
    return SystemExit(2)


def resolve_workload(args) -> str:
    """`args.workload`, set where the command line left it out: file with --prompts-file, else shared.
    Exits where --prompts-file is given to a synthetic workload, or --sorted to another than shared (each was
    ignored, and that workload ran)."""
    if getattr(args, "workload", None) is None:
        args.workload = "file" if getattr(args, "prompts_file", None) else "shared"
    if getattr(args, "prompts_file", None) and args.workload != "file":
        raise bench_refusal(f"--prompts-file is read by --workload file, not --workload {args.workload}")
    if getattr(args, "sorted", False) and args.workload != "shared":  # (the others' order is their own)
        raise bench_refusal(f"--sorted orders --workload shared, not --workload {args.workload}")
    return args.workload


def make_workload(args, vocab: int) -> Workload:
    """The workload `args` describe (sizes left out: `fill_workload_sizes`' defaults for --device)."""
    resolve_workload(args)
    fill_workload_sizes(args)
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
    if args.workload == "file":
        return prompt_file_workload(args.prompts_file, args.output, vocab)
    raise ValueError(f"unknown workload {args.workload!r}")


WORKLOAD_SIZES = {  # flag -> (default on a GPU, default on the CPU)
    "--requests": (1024, 64), "--shared": (2000, 256), "--distinct": (200, 32), "--output": (100, 16),
    "--prompt-len": (1024, 256), "--min-output": (100, 16), "--max-output": (1000, 64),
}
"""The workload sizes left out of the command line, by device: the GPU's are the paper's (1,024 requests of
2,000 + 200 tokens, which a CPU takes hours over); the CPU's run a small model's configurations in about a
minute or two each (issue 14: sensible CPU defaults)."""


def _sized_help(what: str, flag: str) -> str:
    gpu, cpu = WORKLOAD_SIZES[flag]
    return f"{what} (default: {gpu}; {cpu} on the CPU)"


def output_tokens(text: str) -> int:
    """bench's --output: the output tokens per request, an integer. Anything else is refused saying what the flag
    is and where results go (--json-out): `--output results.json`, as run's -o/--output names its output file,
    was argparse's bare "invalid int value"."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of tokens: bench's --output is the output tokens per request (an integer); "
            "bench writes its results as JSON with --json-out FILE") from None


def _device_type(args) -> str:
    """The type of the device the engines will run on ("cuda", "cpu"), from --device; "cuda" for one the
    engine will refuse (it names the problem itself)."""
    from batchllm.engine import resolve_device

    try:
        return resolve_device(getattr(args, "device", None) or "auto").type
    except (ValueError, RuntimeError):
        return "cuda"


def fill_workload_sizes(args, device_type: str | None = None) -> dict[str, int]:
    """Set each workload size the command line left out (None) to its default for `device_type` (else the
    device --device names): `WORKLOAD_SIZES`. Returns the CPU defaults it set ({} on a GPU, or where every size
    was given). Sizes already set are kept, so a second call changes nothing."""
    device_type = device_type or _device_type(args)
    filled = {}
    for flag, (gpu, cpu) in WORKLOAD_SIZES.items():
        name = flag[2:].replace("-", "_")
        if getattr(args, name, None) is None:
            setattr(args, name, cpu if device_type == "cpu" else gpu)
            if device_type == "cpu":
                filled[flag] = cpu
    return filled


_READS = {"shared": ("--requests", "--shared", "--distinct", "--output"), "snippet": ("--requests", "--output"),
          "nosharing": ("--requests", "--prompt-len", "--output"),
          "decodeheavy": ("--requests", "--shared", "--distinct", "--min-output", "--max-output"),
          "file": ("--output",)}
"""The workload sizes each --workload reads."""


def cpu_sizes_note(workload: str, filled: dict[str, int]) -> str | None:
    """The line saying which CPU-sized defaults (`fill_workload_sizes`) the workload reads, naming the flags
    that override them; None where it reads none."""
    used = [flag for flag in _READS[workload] if flag in filled]
    if not used:
        return None
    return (f"batchllm bench: on the CPU, a CPU-sized workload: {' '.join(f'{f} {filled[f]}' for f in used)} "
            f"(on a GPU: {' '.join(f'{f} {WORKLOAD_SIZES[f][0]}' for f in used)}); give these flags to change it")


def add_bench_parser(sub) -> None:
    from batchllm.config_file import add_config_file_argument
    from batchllm.options import DefaultsHelpFormatter, add_engine_arguments, add_vllm_arguments

    b = sub.add_parser("bench", help="measure throughput on a synthetic workload",
                       formatter_class=DefaultsHelpFormatter,
                       description="Run a synthetic workload once per configuration, each on an engine of its "
                       "own, one after another in one process. Engine options set every configuration's "
                       "engine; a configuration changes one of them.")
    add_config_file_argument(b)
    w = b.add_argument_group("workload")
    w.add_argument("--workload", default=None, choices=["shared", "snippet", "nosharing", "decodeheavy", "file"],
                   help="shared: the paper's groups of --degree prompts sharing a --shared token prefix; snippet: "
                   "the snippet-like mix; nosharing: --prompt-len distinct prompts; decodeheavy: shared "
                   "prompts with outputs of --min-output to --max-output tokens; file: the token prompts of "
                   "--prompts-file (default: file with --prompts-file, else shared)")
    w.add_argument("--prompts-file", default=None,
                   help="JSONL of token prompts for --workload file, one request per line: "
                   '{"prompt_token_ids": [...], "max_tokens": N} (max_tokens optional: --output)')
    for flag, what in (("--shared", "shared prefix tokens (shared, decodeheavy)"),
                       ("--distinct", "distinct suffix tokens (shared, decodeheavy)"),
                       ("--degree", "prompts per shared prefix"), ("--requests", "requests in the workload"),
                       ("--output", "output tokens per request (ignore_eos; file: where a line gives no max_tokens)"),
                       ("--prompt-len", "prompt tokens (nosharing)"), ("--min-output", "shortest output (decodeheavy)"),
                       ("--max-output", "longest output (decodeheavy)")):
        if flag == "--degree":  # (a shape, not a size: the same on every device)
            w.add_argument(flag, type=int, default=16, help=what)
        else:
            tokens = flag == "--output"  # (not run's -o/--output file: `output_tokens` says so)
            w.add_argument(flag, type=output_tokens if tokens else int, default=None,
                           metavar="TOKENS" if tokens else None, help=_sized_help(what, flag))
    w.add_argument("--sorted", action="store_true", help="keep requests grouped by prefix (else shuffled; shared)")
    r = b.add_argument_group("run")
    r.add_argument("--configs", default="sharing,nosharing",
                   help="comma list of: " + "; ".join(f"{name} ({what})" for name, (what, _) in CONFIGS.items()))
    r.add_argument("--warmup-requests", type=int, default=8, help="a small run on each engine first, not measured")
    r.add_argument("--json-out", default=None, metavar="FILE",
                   help="write every configuration's stats as JSON here (run's -o; --output is output tokens)")
    r.add_argument("--no-progress", action="store_true",
                   help="no progress bar during a configuration's measured run on the CPU (its start line stays; "
                        "on a GPU the measured run shows none, as every GPU number was taken)")
    r.add_argument("--peak-tflops", type=_positive(float), default=None,
                   help="the bf16 matmul peak (TFLOP/s) for MFU, the compute limit and the profile's rates, "
                        "instead of measuring it (an 8192^3 matmul, which varies by a few percent from process to "
                        "process); also on CPU")
    r.add_argument("--profile-out", default=None,
                   help="then profile the workload (last config; --profile-requests: its first N requests) and "
                        "write the GPU time per kernel category here")
    r.add_argument("--profile-requests", type=_positive(int), default=None,
                   help="requests of the profiled runs (default: the whole workload)")
    r.add_argument("--cpu-profile-out", default=None,
                   help="then run the first --profile-requests requests (last config) under cProfile and write "
                        "the host functions with the most own time here")
    # workloads are token ids: no tokenizer; every other default is `run`'s (the user gets what is measured)
    add_engine_arguments(b, exclude=["skip_tokenizer_init"])
    add_vllm_arguments(b, run_batch=False)  # run's: --disable-log-stats, -pp 1, --task generate ... (vLLM bench's)


def _positive(kind: type):
    """An argparse type: a number of `kind` above 0 (argparse names the option and the value otherwise)."""
    def parse(text: str):
        value = kind(text)
        if not value > 0:
            raise ValueError(text)
        return value
    parse.__name__ = f"positive {kind.__name__}"  # (argparse's "invalid positive float value: '-5'")
    return parse


_ON, _OFF = dict(prefix_sharing=True), dict(prefix_sharing=False)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (what it measures, engine options it sets)
    "sharing": ("prefix sharing", _ON),
    "nosharing": ("prefix sharing off", _OFF),
    "single": ("one-level plan", dict(_ON, plan_mode="single")),
    "order-prefill": ("BatchLLM's group order", dict(_ON, group_order="prefill")),
    "order-fifo": ("groups in input order", dict(_ON, group_order="fifo")),
    "sharing-plainattn": ("prefix-shared attention off", dict(_ON, shared_prefix_attention=False)),
    "sharing-torchops": ("torch norm/rotary/SiLU ops", dict(_ON, kernels="torch")),
    "sharing-sync": ("asynchronous scheduling off", dict(_ON, async_scheduling=False)),
    "nosharing-sync": ("no sharing, asynchronous scheduling off", dict(_OFF, async_scheduling=False)),
    "sharing-eager": ("decode CUDA graphs off", dict(_ON, enforce_eager=True)),
    "nosharing-eager": ("no sharing, decode CUDA graphs off", dict(_OFF, enforce_eager=True)),
    **{f"dp{n}": (f"sharing, {n} data-parallel engines", dict(_ON, data_parallel_size=n)) for n in (1, 2, 4, 8)},
    **{f"pergpu{n}": (f"sharing, {n} engine processes per GPU", dict(_ON, engines_per_gpu=n)) for n in (2, 3, 4)},
    **{f"tp{n}": (f"sharing, model over {n} GPUs", dict(_ON, tensor_parallel_size=n)) for n in (1, 2, 4, 8)},
    **{f"steps{n // 1024}k": (f"sharing, {n}-token steps", dict(_ON, max_num_batched_tokens=n))
       for n in (2048, 4096, 8192, 16384, 32768)},
    "fp8": ("sharing, FP8 weights and activations", dict(_ON, quantization="fp8")),
    "fp8-unfused": ("sharing, FP8, each layer quantizing its own input (not the norm/SiLU kernels)",
                    dict(_ON, quantization="fp8", fp8_fused_quant=False)),
    "fp8kv": ("sharing, FP8 KV cache (2x the tokens per GiB; 64-token blocks, V keys-major)",
              dict(_ON, kv_cache_dtype="fp8")),
    "sharing-block64": ("sharing, 64-token KV blocks (one block index per attention tile; TMA tiles on Hopper)",
                        dict(_ON, block_size=64)),
    "nosharing-block64": ("no sharing, 64-token KV blocks", dict(_OFF, block_size=64)),
    "sharing-block16": ("sharing, 16-token KV blocks (a block index per key)", dict(_ON, block_size=16)),
    "nosharing-block16": ("no sharing, 16-token KV blocks", dict(_OFF, block_size=16)),
    "fp8-block64": ("sharing, FP8 weights, 64-token KV blocks", dict(_ON, quantization="fp8", block_size=64)),
    "sharing-torchstore": ("K/V stored by torch ops, not the one-kernel store", dict(_ON, kv_store="torch")),
    "fp8kv-torchstore": ("FP8 KV cache stored by torch ops", dict(_ON, kv_cache_dtype="fp8", kv_store="torch")),
    "fp8w+kv": ("sharing, FP8 weights and KV cache", dict(_ON, quantization="fp8", kv_cache_dtype="fp8")),
    "fp8w+kv-rowscaled": ("sharing, FP8 weights and KV cache, every matmul row-scaled (no deferred scales)",
                          dict(_ON, quantization="fp8", kv_cache_dtype="fp8", fp8_deferred_scales=False)),
    "fp8kv-block16": ("sharing, FP8 KV cache of 16-token blocks (V head-dim-major, as K; its default: 64)",
                      dict(_ON, kv_cache_dtype="fp8", block_size=16)),
    "fp8w+kv-block16": ("sharing, FP8 weights, FP8 KV cache of 16-token blocks",
                        dict(_ON, quantization="fp8", kv_cache_dtype="fp8", block_size=16)),
    "fp8w+kv-block128": ("sharing, FP8 weights, FP8 KV cache of 128-token blocks (128-key decode tiles in a block)",
                         dict(_ON, quantization="fp8", kv_cache_dtype="fp8", block_size=128)),
    "fp8attn": ("sharing, FP8 KV cache and FP8 attention", dict(_ON, kv_cache_dtype="fp8", fp8_attention=True)),
    "fp8w+attn": ("sharing, FP8 weights, KV cache and attention",
                  dict(_ON, quantization="fp8", kv_cache_dtype="fp8", fp8_attention=True)),
}


def bench_command(args) -> int:
    """Build one engine per configuration, run the workload on it, free it before the next (the KV
    cache is sized from the free memory, so engines side by side would not be measured alike)."""
    from batchllm.llm import LLM
    from batchllm.options import engine_kwargs_from_args

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if problem := _configs_problem(names, engine_kwargs_from_args(args)) or _output_paths_problem(args):
        raise bench_refusal(problem)
    filled = fill_workload_sizes(args)  # (before the checks: they read the sizes)
    if problem := workload_option_problem(args):
        raise bench_refusal(problem)
    if note := cpu_sizes_note(args.workload, filled):
        print(note, file=sys.stderr, flush=True)
    base = {**engine_kwargs_from_args(args), "skip_tokenizer_init": True}
    workload, peak, results, info = _file_workload(args), None, [], {}
    for i, name in enumerate(names):
        try:
            llm = LLM(**{**base, **CONFIGS[name][1]})
        except (ValueError, OSError, RuntimeError, MemoryError) as e:  # (those measured before it are written)
            from batchllm.cli import cannot_allocate

            if isinstance(e, RuntimeError) and not cannot_allocate(e):
                raise
            print(f"batchllm bench: configuration {name!r} could not start: {type(e).__name__}: {e}",
                  file=sys.stderr)
            return 2
        workload = workload or make_workload(args, llm.model_spec.vocab_size)
        if problem := workload_fit_problem(llm, workload, args.workload):  # (a user error: measured ones are kept)
            llm.shutdown()
            print(f"batchllm bench: configuration {name!r}: the workload does not fit: {problem}", file=sys.stderr)
            return 2
        print(f"batchllm bench: configuration {name!r} ({i + 1} of {len(names)}): {_size(workload)}",
              file=sys.stderr, flush=True)
        if llm.engine is None:  # data parallel: the engines are in the worker processes
            info = info or _data_parallel_device_info(llm, args.peak_tflops)
            results.append(_bench_data_parallel(llm, name, args, workload))
        else:
            if not info:
                peak, info = _device_info(llm.engine, args.peak_tflops)
            results.append(_bench_engine(llm, name, workload, peak, args, profile=i == len(names) - 1))
        llm.shutdown()  # frees the engine's device memory before the next one is built
        del llm
        if args.json_out:  # after each configuration: one that fails later loses none measured before it
            with open(args.json_out, "w") as f:
                json.dump({**info, "results": results}, f)
    return 0


def _configs_problem(names: list[str], engine_kwargs: dict) -> str | None:
    """What is wrong with --configs (none named, an unknown one, or one that turns prefix sharing back on under
    --no-prefix-sharing, which it overrode in silence), or None."""
    if not names:
        return f"--configs names no configuration; choose from {list(CONFIGS)}"
    if unknown := [c for c in names if c not in CONFIGS]:
        return f"unknown config(s) {unknown}; choose from {list(CONFIGS)}"
    on = [c for c in names if CONFIGS[c][1].get("prefix_sharing")]
    if engine_kwargs.get("prefix_sharing") is False and on:
        return (f"--no-prefix-sharing: the configuration(s) {on} turn prefix sharing on, as each configuration sets "
                "it; measure without it with --configs nosharing")
    return None


def _output_paths_problem(args) -> str | None:
    """Why --json-out, --profile-out or --cpu-profile-out could not be written, or None: checked before any engine
    is built (they were written after the measurement, and a bad path failed it as an unexpected error)."""
    from batchllm.io.job import later_write_problem

    for flag in ("json_out", "profile_out", "cpu_profile_out"):
        path = getattr(args, flag, None)
        if path and (problem := later_write_problem(Path(path), "--" + flag.replace("_", "-"))):
            return problem
    return None


def _size(workload: Workload) -> str:
    """A workload's size in words: its name, requests, prompt and output tokens (before sharing)."""
    return (f"{workload.name}: {len(workload.prompts):,} requests, {workload.num_prompt_tokens:,} prompt tokens, "
            f"{sum(workload.max_tokens):,} output tokens")


_SYNTHETIC = ("shared", "snippet", "nosharing", "decodeheavy")
_WORKLOAD_MINIMA = {"requests": (1, _SYNTHETIC), "degree": (1, ("shared", "decodeheavy")),
                    "shared": (0, ("shared", "decodeheavy")), "distinct": (0, ("shared", "decodeheavy")),
                    "output": (1, ("shared", "snippet", "nosharing", "file")), "prompt_len": (1, ("nosharing",)),
                    "min_output": (1, ("decodeheavy",)), "warmup_requests": (0, (*_SYNTHETIC, "file"))}
"""The least value of each numeric workload option, and the workloads that read it (`workload_option_problem`)."""


def workload_option_problem(args) -> str | None:
    """What is wrong with the options `bench`'s workload reads (a value below its least, --min-output above
    --max-output), or None: checked before any model loads (--degree 0 failed with a ZeroDivisionError after it,
    --requests 0 measured nothing). Options the workload does not read are not checked."""
    workload = resolve_workload(args)
    for name, (least, readers) in _WORKLOAD_MINIMA.items():
        if workload in readers and getattr(args, name) < least:
            return f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}"
    if workload in ("shared", "decodeheavy") and args.shared + args.distinct < 1:
        return "--shared + --distinct must be at least 1 (a prompt of no tokens), got 0"
    if workload == "decodeheavy" and args.min_output > args.max_output:
        return f"--min-output ({args.min_output}) must not exceed --max-output ({args.max_output})"
    return None


_SHAPED_BY = {"shared": ("--shared + --distinct", "--output"), "snippet": ("the snippet workload's", "--output"),
              "nosharing": ("--prompt-len", "--output"), "decodeheavy": ("--shared + --distinct", "--max-output"),
              "file": ("in --prompts-file", "the line's max_tokens, else --output")}
"""Per workload, the options that set its prompts' lengths and its outputs' (`workload_fit_problem`)."""


def workload_fit_problem(llm, workload: Workload, kind: str) -> str | None:
    """Why a request of `workload` (of `kind`, a --workload) could not run on `llm` even alone, naming the options
    that shape it, or None: a prompt that leaves no room to generate in the context, or a request whose prompt
    and output the KV cache cannot hold (`LLM.kv_cache_problem`). `generate` refuses such a workload whole (a
    ValueError, which bench reported as an unexpected failure). One check per (prompt length, max_tokens); the
    warm-up's requests are never longer than the workload's (`_warm_up`)."""
    prompts_by, outputs_by = _SHAPED_BY[kind]
    for length, max_tokens in sorted({(len(p), m) for p, m in zip(workload.prompts, workload.max_tokens)},
                                     reverse=True):
        if length >= llm.max_model_len:
            return (f"a prompt of {length} tokens ({prompts_by}) leaves no room to generate in the context "
                    f"(max_model_len {llm.max_model_len}); raise --max-model-len or shorten the prompts")
        if length + max_tokens > llm.max_model_len:  # (it would stop at the context, and be measured as done)
            return (f"a request of {length} prompt tokens ({prompts_by}) and {max_tokens} output tokens "
                    f"({outputs_by}) does not fit the context (max_model_len {llm.max_model_len}): bench measures "
                    "every request to its max_tokens; raise --max-model-len or shorten the requests")
        if llm.kv_cache_problem(length, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)):
            return (f"a request of {length} prompt tokens ({prompts_by}) and {max_tokens} output tokens "
                    f"({outputs_by}) does not fit the KV cache, which holds {llm.kv_cache_tokens} tokens; "
                    f"{llm.kv_cache_advice()} or shorten the requests")
    return None


def _file_workload(args) -> Workload | None:
    """`--workload file`'s requests, read and checked against the model's vocabulary (its config, no
    weights) before any model loads; None for a synthetic workload (`args.workload` resolved: file where
    --prompts-file is given, else shared). Exits naming the problem."""
    if resolve_workload(args) != "file":
        return None
    if not args.prompts_file:
        raise bench_refusal("--workload file needs --prompts-file PATH")
    from batchllm.inputs import local_model_dir
    from batchllm.models.spec import read_model_spec

    try:
        vocab = read_model_spec(local_model_dir(args.model)).vocab_size
        return prompt_file_workload(args.prompts_file, args.output, vocab)
    except (OSError, ValueError) as e:
        raise bench_refusal(str(e)) from None


def _device_info(engine, given_peak: float | None = None) -> tuple[float | None, dict]:
    """The bf16 matmul peak (`given_peak`, else measured on CUDA; printed; None on CPU unless given)
    and the run's device facts for the JSON output."""
    import torch

    cuda = engine.device.type == "cuda"
    if given_peak:
        peak = given_peak
        print(f"bf16 matmul peak (given): {peak:g} TFLOP/s", flush=True)
    else:
        peak = measure_matmul_peak_tflops(engine.device) if cuda else None
        if peak:
            print(f"bf16 matmul peak (8192^3, random data): {peak:.0f} TFLOP/s", flush=True)
    name = torch.cuda.get_device_name(engine.device) if cuda else str(engine.device)
    return peak, {"device": name, "dtype": str(engine.dtype), "model": str(engine.model_dir),
                  "kv_blocks": engine.kv_spec.num_blocks, "matmul_peak_tflops": peak}


def _data_parallel_device_info(llm, given_peak: float | None) -> dict:
    """`_device_info`'s facts for the JSON output where the engines are data-parallel workers (as their ranks
    reported them: `DataParallelEngine.start_times`); the matmul peak only where given (measuring it needs a device
    in this process)."""
    first = llm._data_parallel.start_times[0]  # (every rank builds the same engine; each rank's cache is in "ranks")
    return {"device": first.get("device"), "dtype": first.get("dtype"), "model": str(llm.model_dir),
            "matmul_peak_tflops": given_peak}


def _bench_engine(llm, name: str, workload: Workload, peak: float | None, args, profile: bool) -> dict:
    """One single-process configuration: warm up, run the workload, print its line; then, for the
    last configuration, the profiles asked for."""
    engine = llm.engine
    graph_info = _graph_info(engine.runner.decode_graphs)
    _warm_up(llm, workload, args.warmup_requests)
    stats = run_workload(llm, workload, peak, progress=_shows_progress(args))
    stats.update(config=name, async_scheduling=engine.core.async_scheduling, cuda_graphs=graph_info is not None,
                 kv_blocks=engine.kv_spec.num_blocks, graph_capture=graph_info)
    print(_line(stats), flush=True)
    if profile:
        _profile(llm, workload, args, peak)
    return stats


def _shows_progress(args) -> bool:
    """Whether a measured run shows the token progress bar: on the CPU, where a configuration takes minutes, unless
    --no-progress; never on a GPU, where the bar's updates would fall inside the timed run and its GPU-idle
    measurement (every GPU number in docs/benchmarks.md was taken without one)."""
    return not getattr(args, "no_progress", False) and _device_type(args) == "cpu"


def _warm_up(llm, workload: Workload, requests: int) -> None:
    """A short unmeasured run of the workload's first prompts (compiles, allocates, starts workers), each with
    at most 4 output tokens (never more than its own: a workload that fits the engine warms it up)."""
    n = min(requests, len(workload.prompts))
    if n:
        run_workload(llm, Workload("warmup", workload.prompts[:n], [min(4, m) for m in workload.max_tokens[:n]]))


def _bench_data_parallel(llm, name: str, args, workload: Workload) -> dict[str, Any]:
    _warm_up(llm, workload, args.warmup_requests * llm.config.parallel.num_engines)
    stats = run_workload(llm, workload, progress=_shows_progress(args))
    stats.update(config=name)
    print(_line(stats), flush=True)
    print("  ranks: " + "; ".join(f"{r['rank']}: {r['num_requests']} req, prefill {r['prefill_tokens_computed']}, "
                                  f"done at {r['finish_s']:.1f} s" for r in stats["ranks"])
          + f"; finish spread {100 * stats['finish_time_spread']:.1f}%, duplicated prefill "
            f"{stats['duplicated_prefill_tokens']}", flush=True)
    return stats


def _graph_info(graphs) -> dict | None:
    if graphs is None or not graphs.capture_seconds:
        return None
    info = dict(sizes=graphs.sizes, capture_s=graphs.capture_seconds, memory_gib=graphs.capture_memory_bytes / 2**30)
    print(f"decode CUDA graphs: {len(graphs.sizes)} batch sizes up to {graphs.max_batch}, captured in "
          f"{graphs.capture_seconds:.1f} s, {info['memory_gib']:.2f} GiB", flush=True)
    return info


def linear_flops(spec, tokens_computed: int, tokens_sampled: int) -> float:
    """FLOPs (2 per multiply-add) of the decoder's linear layers (attention projections and MLP, every
    layer) over `tokens_computed` tokens, plus the LM head over `tokens_sampled`: the matmul part of
    issue 14's compute limit. (The MFU of `run_workload` counts every parameter for every computed
    token instead, the embedding and LM head included.)"""
    return 2.0 * (spec.num_layers * spec.layer_linear_parameters * tokens_computed
                  + spec.hidden_size * spec.vocab_size * tokens_sampled)


def attention_flops(spec, attended_keys: int) -> float:
    """FLOPs (2 per multiply-add) of the attention's two matmuls (q.k and p.v, every query head and
    layer) over `attended_keys` (query, key) pairs (`SchedulerStats.attended_keys`)."""
    return 4.0 * spec.num_heads * spec.head_dim * spec.num_layers * attended_keys


def _compute_limit(spec, stats: dict, tokens_sampled: int, peak_tflops: float, wall_s: float) -> dict[str, float]:
    """Issue 14's compute limit of the run: its linear and attention FLOPs (on the tokens it computed:
    with the plan's sharing, that is the limit's perfect sharing unless it preempted) at `peak_tflops`
    (the measured matmul peak of every GPU the model runs on), as requests/s, and the share of it the
    run reached."""
    flops = (linear_flops(spec, stats["prefill_tokens_computed"] + stats["decode_tokens"], tokens_sampled)
             + attention_flops(spec, stats["attended_keys"]))
    limit_s = flops / (peak_tflops * 1e12)
    return dict(compute_limit_requests_per_s=stats["num_requests"] / limit_s, compute_limit_share=limit_s / wall_s)


def _profile(llm, workload: Workload, args, peak: float | None) -> None:
    n = args.profile_requests
    profiled = workload if n is None else Workload(f"{workload.name} (first {n})", workload.prompts[:n],
                                                   workload.max_tokens[:n])
    if args.profile_out:
        _profile_kernels(llm, profiled, args.profile_out, peak)
    if args.cpu_profile_out:
        _profile_host(llm, profiled, args.cpu_profile_out)


KERNEL_CATEGORIES = (  # (category, substrings of CUDA kernel names), first match wins
    ("attention", ("_paged_attention", "_merge_partials")),
    ("norm/rotary/silu (Triton)", ("_rms_norm", "_silu_and_mul", "_rotary")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "matmul", "cublas", "aten::mm", "aten::addmm")),  # (aten: CPU)
    ("kv store / gathers", ("index", "scatter", "gather")),
    ("torch elementwise / reductions", ("elementwise", "vectorized", "reduce", "unrolled")),
)


def kernel_category(name: str) -> str:
    """The KERNEL_CATEGORIES entry of a kernel (or, on CPU, op) name; "other" if none matches."""
    return next((c for c, keys in KERNEL_CATEGORIES if any(k in name.lower() for k in keys)), "other")


def time_by_category(timed) -> dict[str, float]:
    """The summed time of (name, time) pairs per `kernel_category`."""
    totals: dict[str, float] = {}
    for name, t in timed:
        category = kernel_category(name)
        totals[category] = totals.get(category, 0.0) + t
    return totals


def time_by_step_kind(events, cuda: bool) -> dict[str, dict[str, float]]:
    """Time (microseconds) per step kind ("decode", "prefill": `step_markers.step_kind`) and kernel
    category, from a profile's `events()` of a run whose steps the runner marked
    (`ModelRunner.annotate_steps`). On CUDA a step's kernels are those from its marker kernel to
    the next (`kernels_by_step_kind`); on CPU, the ops inside its host range (their own CPU time)."""
    from torch.autograd import DeviceType

    from batchllm.runner.step_markers import STEP_ANNOTATION, kernels_by_step_kind

    if cuda:
        device = [(e.name, e.time_range.start, e.time_range.elapsed_us()) for e in events
                  if e.device_type == DeviceType.CUDA and not e.name.startswith(STEP_ANNOTATION)]
        timed = kernels_by_step_kind(device)
    else:
        timed = {}
        for step in events:
            if step.device_type == DeviceType.CPU and step.name.startswith(STEP_ANNOTATION):
                ops = timed.setdefault(step.name[len(STEP_ANNOTATION):], [])
                stack = list(step.cpu_children)
                while stack:
                    op = stack.pop()
                    stack.extend(op.cpu_children)
                    ops.append((op.name, op.self_cpu_time_total))
    return {kind: time_by_category(named) for kind, named in timed.items()}


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


def _profile_kernels(llm, workload: Workload, path: str, peak: float | None = None) -> None:
    """Run the workload (last config's settings) under torch.profiler and write where the GPU's
    time goes: per category (KERNEL_CATEGORIES), the rate the matmul kernels reached on the run's
    linear FLOPs (`linear_flops`; against `peak`, the measured bf16 matmul peak, where given), and
    the top kernels. Not a throughput run."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from batchllm.runner.step_markers import MARKER_KERNELS, STEP_ANNOTATION

    cuda = llm.engine.device.type == "cuda"
    runner = llm.engine.runner
    runner.annotate_steps = True
    try:
        # CPU activity on CUDA too: the step ranges, and the ops and launches under them, are host events
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            stats = run_workload(llm, workload)
    finally:
        runner.annotate_steps = False
    events = prof.key_averages()  # on CPU: the ops' own CPU time, for a dry run of this code
    if cuda:  # the kernels themselves (a host op's device time is that of the kernels it launched)
        events = [e for e in events if e.device_type == DeviceType.CUDA]
    kernels = [(e.key, e.device_time_total if cuda else e.self_cpu_time_total, e.count) for e in events
               if not e.key.startswith(STEP_ANNOTATION) and e.key not in MARKER_KERNELS.values()]
    kernels = [k for k in kernels if k[1] > 0]
    total = sum(t for _, t, _ in kernels) or 1.0
    by_category = time_by_category((name, t) for name, t, _ in kernels)
    lines = [f"{workload.name}: {stats['num_steps']} steps, wall {stats['wall_s']:.2f} s (profiled), "
             f"{'GPU kernel' if cuda else 'CPU op'} time {total / 1e6:.3f} s"]
    lines += [f"  {c:<32} {t / 1e6:8.3f} s {100 * t / total:5.1f}%" for c, t in sorted(by_category.items(),
                                                                                      key=lambda kv: -kv[1])]
    for kind, categories in sorted(time_by_step_kind(prof.events(), cuda).items()):
        lines.append(f"  in {kind} steps: {sum(categories.values()) / 1e6:.3f} s: " + ", ".join(
            f"{c} {t / 1e6:.3f} s" for c, t in sorted(categories.items(), key=lambda kv: -kv[1])))
    lines.append(_matmul_rate(llm.model_spec, stats, sum(workload.max_tokens), by_category.get("matmul", 0.0), peak))
    lines.append(_attention_rate(llm.model_spec, stats, by_category.get("attention", 0.0)))
    lines.append("top kernels (total ms, calls, name):")
    lines += [f"  {t / 1e3:10.1f} {n:7d}  {name[:150]}" for name, t, n in sorted(kernels, key=lambda k: -k[1])[:30]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:12]), flush=True)


def _matmul_rate(spec, stats: dict, tokens_sampled: int, matmul_us: float, peak: float | None) -> str:
    """One line: the run's linear FLOPs over its matmul kernels' time (microseconds), as TFLOP/s and
    as a share of the bf16 peak (measured, or `--peak-tflops`)."""
    computed = stats["prefill_tokens_computed"] + stats["decode_tokens"]
    flops = linear_flops(spec, computed, tokens_sampled)
    line = f"linear layers over {computed} computed and {tokens_sampled} sampled tokens: {flops / 1e12:.6g} TFLOP"
    if matmul_us:
        rate = flops / (matmul_us * 1e-6) / 1e12
        line += f" in {matmul_us / 1e6:.3f} s of matmul kernels: {rate:.0f} TFLOP/s"
        if peak:
            line += f", {100 * rate / peak:.1f}% of the bf16 peak ({peak:.0f})"
    return line


def _attention_rate(spec, stats: dict, attention_us: float) -> str:
    """One line: the run's attention FLOPs (`attention_flops`) over its attention kernels' time."""
    flops = attention_flops(spec, stats["attended_keys"])
    line = f"attention over {stats['attended_keys']} (query, key) pairs: {flops / 1e12:.6g} TFLOP"
    if attention_us:
        rate = flops / (attention_us * 1e-6) / 1e12
        line += f" in {attention_us / 1e6:.3f} s of attention kernels: {rate:.0f} TFLOP/s"
    return line


def _line(s: dict) -> str:
    return (f"{s['workload']:<40} {s['config']:<14} {s['requests_per_s']:8.2f} req/s "
            f"{s['output_tokens_per_s']:9.1f} out tok/s "
            f"saving {100 * s['saving_ratio']:5.1f}%  steps {s['num_steps']:6d}  "
            f"tok/step {s['mean_tokens_per_step']:7.1f}  "
            f"preempt {s['num_preemptions']}  {s['wall_s']:.1f}s"
            + (f"  MFU {100 * s['mfu']:4.1f}%" if "mfu" in s else "")
            + (f"  limit {s['compute_limit_requests_per_s']:.1f} req/s ({100 * s['compute_limit_share']:.0f}%)"
               if "compute_limit_share" in s else "")
            + (f"  GPU idle {100 * s['gpu_idle_fraction']:4.1f}%  peak mem {s['peak_gpu_memory_gib']:.1f} GiB"
               if "gpu_idle_fraction" in s else "")
            + (f"  graph steps {s['graph_steps']}" if s.get("graph_steps") else "")
            + (f"  Triton compiles {s['triton_compiles']}" if s.get("triton_compiles") else "")
            + (f"  KV {s['kv_cache_dtype']} {s['kv_tokens']} tok" if "kv_tokens" in s else ""))
