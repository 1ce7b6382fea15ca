"""Host (Python) time per engine step, measured on CPU with a model whose compute is negligible.

    PYTHONPATH=. .venv/bin/python benchmarks/host_overhead.py [--path both|generate|run] [--repeat
3] [--temperature T] [--profile]

Small models on a GPU are host-bound (issue 14): the device idles while Python schedules, builds
inputs, samples and processes outputs. This runs a decode-heavy shared-prefix batch (default: 512
requests, 8 shared prefixes of 1,000 tokens, 100-300 greedy output tokens each, ignore_eos, a
16,384-token step budget, asynchronous scheduling as on CUDA) through a tiny random-weight Llama
(2 layers, hidden 64; `tests/helpers.py`) with the SmolLM2 tokenizer, so that detokenisation is
real, along two paths:

  generate: `LLM.generate` on token-id prompts;
  run:      the user path, `batchllm run` on a JSONL file (ingest, engine loop, records, writer),
            of which only the engine loop and the output writing (`cli._generate_into`) are timed.

On this CPU the attention (a batched SDPA over up to 1,300 keys per sequence) and the LM head
([512, 64] x [64, 49152]) would be 90% of a step, so by default (`--full-model` keeps them) each
attention layer returns its query and the LM head covers the first 2,048 token ids only: the
model still maps each token to a varied, real next token, and nothing the host does changes.
Reported per path: steps, wall ms per step, and the share of that spent in the model's device work
on CPU (the decoder's forward, the LM head and the sampler's tensor operations; on a GPU these run
on the device and cost the host only their launches): "host" = wall - device work, in wall time and
in this process's CPU time (torch on one thread). The sampler's Python (its per-row walks over the
requests' settings) is host time, as on a GPU, and is also shown on its own (`DeviceWork`); up to
session 41's first pass the whole sampler counted as device work. CPU time is what other processes
on a shared machine disturb least, so it is the number to compare; the median is taken by it. The CPU attention's
loop is part of "device work" here; the Triton backend's host planning is not covered
(`benchmarks/step_overhead.py` measures it). Each path runs `--repeat` times. An output digest
(sha1 of every completion's token ids, or of the output records' text) shows that a change kept
the results. `--profile` prints cProfile's top 25 by tottime of the last repetition's timed region.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

from batchllm import LLM, SamplingParams  # noqa: E402
from batchllm.attention import TorchReferenceBackend  # noqa: E402
from batchllm.models.decoder import DecoderForCausalLM  # noqa: E402
from batchllm.models.default_model import default_model_dir  # noqa: E402
from tests.helpers import make_tiny_model  # noqa: E402


def _first_tokens_logits(model: DecoderForCausalLM, hidden):
    """The LM head over the first STUB_VOCAB token ids only (short, frequent BPE tokens in SmolLM2's
    vocabulary): the sampler's argmax then picks among real tokens at 1/24 of the matmul."""
    return hidden @ model.lm_head.weight[:STUB_VOCAB].T


STUB_VOCAB = 2048


class DeviceWork:
    """Time spent in what a GPU would run: the decoder's forward, the LM head, and the sampler's tensor operations.
    Installed on the classes (and the runner's and the sampler's modules) so that the CLI's engine is timed too.

    The sampler's Python (its walks over the rows' SamplingSpecs, the lists it builds) is host time on a GPU, where
    each tensor operation costs the host only its launch: inside `sample_on_device` only the torch operations are
    timed as device work (a TorchFunctionMode), except the building of host tensors from per-row lists (`to_device`:
    host work, then a copy) and nested operations (timed once, by the outermost); each operation's dispatch through
    the mode (a few us) stays host time, as a kernel launch would. Seeded noise computed with numpy on the host
    (`seeded_exponential_host`) is one kernel on a GPU: device work. `sampler_seconds` is the sampler's
    whole time, so the sampler's host part is `sampler_seconds - sampler_device_seconds` (and so in CPU time)."""

    def __init__(self, stub: bool) -> None:
        self.stub = stub
        self.seconds = self.cpu_seconds = 0.0  # device work, wall and CPU
        self.sampler_seconds = self.sampler_cpu_seconds = 0.0  # the whole sampler, device work included
        self.sampler_device_seconds = self.sampler_device_cpu_seconds = 0.0  # its torch operations
        self._depth = 0  # > 0 inside a region timed as device work, or inside host work the mode must not time
        self._in_sampler = False
        self._undo: list[tuple[object, str, object]] = []

    def _timed(self, original: Callable, device: bool) -> Callable:
        """`original`, timed as device work (device=True) or hidden from the op timer (host work: device=False)."""
        def timed(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            self._depth += 1
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                if device:
                    self._add(time.perf_counter() - start, time.process_time() - cpu_start)
        return timed

    def _add(self, seconds: float, cpu_seconds: float) -> None:
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        if self._in_sampler:
            self.sampler_device_seconds += seconds
            self.sampler_device_cpu_seconds += cpu_seconds

    def _patch(self, owner: object, name: str, replacement: object) -> None:
        self._undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def _sampler(self, original: Callable) -> Callable:
        """`sample_on_device`, timed whole, with its torch operations timed as device work."""
        ops = _OpTimer(self)

        def timed(*args, **kwargs):
            start, cpu_start = time.perf_counter(), time.process_time()
            self._in_sampler = True
            try:
                with ops:
                    return original(*args, **kwargs)
            finally:
                self._in_sampler = False
                self.sampler_seconds += time.perf_counter() - start
                self.sampler_cpu_seconds += time.process_time() - cpu_start
        return timed

    def __enter__(self) -> DeviceWork:
        import batchllm.layers.logits_processors as logits_processors
        import batchllm.layers.sampler as sampler
        import batchllm.layers.seeded_noise as seeded_noise
        import batchllm.runner.model_runner as model_runner

        if self.stub:
            self._patch(TorchReferenceBackend, "forward", lambda backend, query, *args, **kwargs: query)
            self._patch(DecoderForCausalLM, "compute_logits", _first_tokens_logits)
        for owner, name in [(DecoderForCausalLM, "forward"), (DecoderForCausalLM, "compute_logits"),
                            (seeded_noise, "seeded_exponential_host")]:
            self._patch(owner, name, self._timed(getattr(owner, name), device=True))
        for module in (sampler, logits_processors, seeded_noise):
            self._patch(module, "to_device", self._timed(module.to_device, device=False))
        self._patch(model_runner, "sample_on_device", self._sampler(model_runner.sample_on_device))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


class _OpTimer(TorchFunctionMode):
    """Times each torch operation called (outside `DeviceWork`'s nested regions) as device work."""

    def __init__(self, work: DeviceWork) -> None:
        super().__init__()
        self.work = work

    def __torch_function__(self, func, types, args=(), kwargs=None):
        work = self.work
        if work._depth:
            return func(*args, **(kwargs or {}))
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            return func(*args, **(kwargs or {}))
        finally:
            work._add(time.perf_counter() - start, time.process_time() - cpu_start)


def workload(args) -> list[tuple[list[int], int]]:
    """(prompt token ids, max_tokens) per request: `--prefixes` random prefixes of `--prefix-len`
    tokens, each request one of them plus a 16-48 token suffix of its own."""
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(100, 49000, args.prefix_len).tolist() for _ in range(args.prefixes)]
    out = []
    for i in range(args.requests):
        suffix = rng.integers(100, 49000, int(rng.integers(16, 49))).tolist()
        out.append((prefixes[i % args.prefixes] + suffix, int(rng.integers(args.min_out, args.max_out + 1))))
    return out


def engine_options(args) -> dict:
    return dict(device="cpu", dtype="float32", max_model_len=2048, max_num_batched_tokens=args.step_tokens,
                async_scheduling=True, seed=0)


@contextlib.contextmanager
def profiled(enabled: bool):
    profiler = cProfile.Profile() if enabled else None
    if profiler:
        profiler.enable()
    try:
        yield
    finally:
        if profiler:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def run_generate(model_dir: Path, work, args, profile: bool) -> tuple[float, int, str]:
    llm = LLM(str(model_dir), **engine_options(args))
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    params = [SamplingParams(max_tokens=m, temperature=args.temperature, ignore_eos=True, stop=args.stop,
                             seed=i if args.temperature else None) for i, (_, m) in enumerate(work)]
    try:
        with profiled(profile):
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        digest = hashlib.sha1(json.dumps([o.outputs[0].token_ids for o in outputs]).encode()).hexdigest()[:12]
        return wall, cpu, llm.last_stats["num_steps"], digest
    finally:
        llm.shutdown()


def run_cli(model_dir: Path, work, args, profile: bool) -> tuple[float, int, str]:
    from batchllm import cli

    tmp = Path(tempfile.mkdtemp(prefix="batchllm-host-run-"))
    source, output, stats = tmp / "in.jsonl", tmp / "out.jsonl", tmp / "stats.json"
    with source.open("w") as f:
        for i, (ids, m) in enumerate(work):
            f.write(json.dumps({"id": f"r{i}", "prompt_token_ids": ids, "max_tokens": m, "stop": args.stop}) + "\n")
    timed: dict[str, float] = {}
    original: Callable = cli._generate_into

    def generate_into(*a, **kw):
        with profiled(profile):
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                return original(*a, **kw)
            finally:
                timed["wall"], timed["cpu"] = time.perf_counter() - start, time.process_time() - cpu_start

    cli._generate_into = generate_into
    try:
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in engine_options(args).items() if k != "async_scheduling"]
        rc = cli.main(["run", "-i", str(source), "-o", str(output), "--model", str(model_dir),
                       "--temperature", str(args.temperature), "--ignore-eos", "--no-progress", "--stats", str(stats),
                       "--async-scheduling", "on", *flags])
    finally:
        cli._generate_into = original
    if rc != 0:
        raise SystemExit(f"batchllm run failed with exit status {rc}")
    records = sorted((json.loads(line) for line in output.open()), key=lambda r: r["id"])
    digest = hashlib.sha1(json.dumps([r["text"] if "text" in r else r for r in records]).encode()).hexdigest()[:12]
    return timed["wall"], timed["cpu"], json.loads(stats.read_text())["num_steps"], digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default="both", choices=["both", "generate", "run"])
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--min-out", type=int, default=100)
    parser.add_argument("--max-out", type=int, default=300)
    parser.add_argument("--step-tokens", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stop", action="append", default=None,
                        help="a stop string for every request (repeatable): the output text is then "
                        "decoded and searched after every token")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="above 0: every request samples, seeded (`run --seed`, as the run path always is): "
                        "each row's noise comes from its seed and position (`layers/seeded_noise.py`)")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (the model's work)")
    parser.add_argument("--full-model", action="store_true",
                        help="run the CPU attention and the whole LM head (default: attention returns its query "
                        "and the LM head covers the first 2,048 token ids, which keeps the outputs varied and "
                        "real tokens, and the step's device work a few ms)")
    parser.add_argument("--profile", action="store_true", help="cProfile the last repetition (slows it down)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # device work on one core: CPU seconds then split host from device
    model_dir = make_tiny_model("llama", Path(tempfile.mkdtemp(prefix="batchllm-host-model-")),
                                tokenizer_dir=default_model_dir(), max_position_embeddings=2048)
    work = workload(args)
    paths = {"generate": run_generate, "run": run_cli}
    for name in ["generate", "run"] if args.path == "both" else [args.path]:
        rows = []
        for rep in range(args.repeat):
            with DeviceWork(not args.full_model) as device:
                wall, cpu, steps, digest = paths[name](model_dir, work, args, args.profile and rep == args.repeat - 1)
            host, host_cpu = 1e3 * (wall - device.seconds) / steps, 1e3 * (cpu - device.cpu_seconds) / steps
            sampler_host = 1e3 * (device.sampler_cpu_seconds - device.sampler_device_cpu_seconds) / steps
            rows.append((host_cpu, host, 1e3 * wall / steps, 1e3 * device.seconds / steps, sampler_host, steps, digest))
            print(f"{name} #{rep + 1}: {steps} steps in {wall:.2f} s: {rows[-1][2]:.2f} ms/step, device work "
                  f"{rows[-1][3]:.2f}, host {host:.2f} ms/step wall, {host_cpu:.2f} ms/step CPU (of which the "
                  f"sampler's Python {sampler_host:.2f}) (outputs {digest})", flush=True)
        host_cpu, host, wall, dev, sampler_host, steps, digest = sorted(rows)[len(rows) // 2]
        print(f"{name} median (by host CPU): host {host_cpu:.2f} ms/step CPU (sampler's Python {sampler_host:.2f}), "
              f"{host:.2f} wall; whole step {wall:.2f} ms, device work {dev:.2f} ms ({100 * dev / wall:.0f}%); "
              f"{steps} steps, outputs {digest}", flush=True)


if __name__ == "__main__":
    main()
