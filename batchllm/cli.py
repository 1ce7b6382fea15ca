"""`batchllm run INPUT.jsonl -o OUTPUT.jsonl`: a whole batch job; `batchllm plan INPUT.jsonl`: its
prefix-sharing plan, without the model.

Exit status: 0 when every line succeeded, 1 when some lines failed (each has an error record in the
output), 2 when the job could not start (unreadable input, bad model path, bad option).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from batchllm.bench import add_bench_parser, bench_command
from batchllm.config import default_log_level
from batchllm.core.policies import GROUP_ORDERS
from batchllm.inputs import PromptProcessor, TokenizedPrompt
from batchllm.io import openai_batch
from batchllm.io.job import JobError, ResultWriter, ResumeState, prepare_output
from batchllm.io.jsonl import OPENAI, PLAIN, BatchLine, LineError, read_batch_lines, result_record
from batchllm.models.spec import read_model_spec
from batchllm.prefix.plan import PLAN_MODES
from batchllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_LINES_FAILED, EXIT_CANNOT_START = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchllm", description="Offline, throughput-first LLM batch inference with prefix sharing."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a JSONL batch file",
        description="Run every request of a JSONL file and write one result line per input line "
        "(in completion order; match them by id). Input lines: "
        '{"id": ..., "prompt": "..."} | {"id": ..., "messages": [...]} | {"id": ..., "prompt_token_ids": [...]}, '
        "each optionally with sampling fields (max_tokens, temperature, top_p, top_k, min_p, stop, "
        "stop_token_ids, seed, n, min_tokens, ignore_eos, logprobs, ...) that override the options below.",
    )
    run.add_argument("input", type=Path, help="input JSONL file")
    run.add_argument("-o", "--output", type=Path, required=True,
                     help="output JSONL file; if it exists for the same input, the job resumes where it stopped")
    run.add_argument("--overwrite", action="store_true", help="start over even if the output already holds results")
    g = _add_model_options(run)
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight and KV dtype (auto: float32 on CPU, the checkpoint's 16-bit dtype on GPU)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights from config.json (benchmarking shapes)")
    s = run.add_argument_group("sampling defaults (a line's own fields take precedence)")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per request (default 256)")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="generate past EOS up to max tokens")
    s.add_argument("--seed", type=int, default=None,
                   help="seed: lines without their own seed get one derived from this and their id, "
                   "so sampled outputs are reproducible line by line")
    e = run.add_argument_group("engine")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per forward step")
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help="cap on requests running at once (default: none; admission is by projected KV memory)")
    e.add_argument("--kv-admission-threshold", type=float, default=1.0,
                   help="admit new work while its projected KV use fits this fraction of the cache (default 1.0)")
    e.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    e.add_argument("--kv-cache-memory-gib", type=float, default=None,
                   help="KV cache size in GiB (default: 2 on CPU; on GPU what --gpu-memory-utilization leaves)")
    e.add_argument("--gpu-memory-utilization", type=float, default=0.90, help="fraction of GPU memory to use")
    e.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="schedule each step while the previous one runs on the device (default auto: on for CUDA)")
    e.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (default: decode steps run as graphs on CUDA)")
    e.add_argument("--max-cudagraph-capture-size", type=int, default=512,
                   help="largest decode batch (sequences) with a CUDA graph (default 512)")
    _add_sharing_options(run)
    o = run.add_argument_group("output")
    o.add_argument("--stats", type=Path, default=None, help="write run statistics as JSON to this file")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = run.add_argument_group("cluster (Ray Data; needs `pip install batchllm[ray]`)")
    r.add_argument("--ray", action="store_true", help="run through Ray Data; -o is then a directory of JSONL shards")
    r.add_argument("--num-replicas", type=int, default=1, help="engine replicas (with --ray)")
    r.add_argument("--ray-batch-size", type=int, default=1024, help="target rows per engine call (with --ray)")
    r.add_argument("--ray-address", default=None, help="Ray cluster address (default: a running one, else local)")

    plan = sub.add_parser(
        "plan",
        help="show the prefix-sharing plan of a JSONL batch file without running the model",
        description="Read the same input as `run`, tokenize it (no model weights are loaded) and print "
        "requests, groups, sharing degrees, prompt tokens, prefill tokens after sharing and the saving ratio "
        "1 - prefill_tokens / prompt_tokens.",
    )
    plan.add_argument("input", type=Path, help="input JSONL file")
    _add_model_options(plan)
    plan.add_argument("--plan-mode", default="multi", choices=list(PLAN_MODES), help=PLAN_MODE_HELP)
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    add_bench_parser(sub)
    return parser


PLAN_MODE_HELP = ("multi: nested groups, each shared segment computed once (default); "
                  "single: BatchLLM's one-level groups")


def _add_model_options(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None, help="Hugging Face model directory (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    g.add_argument("--max-model-len", type=int, default=None, help="context length cap (default: the model's)")
    return g


def _add_sharing_options(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("prefix sharing")
    p.add_argument("--no-prefix-sharing", action="store_true", help="turn global prefix sharing off (for comparison)")
    p.add_argument("--plan-mode", default="multi", choices=list(PLAN_MODES), help=PLAN_MODE_HELP)
    p.add_argument("--group-order", default="decode", choices=list(GROUP_ORDERS),
                   help="order of groups: decode = expected decode work per prefill token (default); "
                   "prefill = BatchLLM's 1/(prefix + suffixes); fifo = input order")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=default_log_level(), format="batchllm %(levelname)s %(name)s: %(message)s")
    if args.command == "run":
        return run_command(args)
    if args.command == "plan":
        return plan_command(args)
    if args.command == "bench":
        return bench_command(args)
    return EXIT_CANNOT_START


def _fail(message: str) -> int:
    print(f"batchllm: error: {message}", file=sys.stderr)
    return EXIT_CANNOT_START


def _unreadable(path: Path) -> str | None:
    """Why the input file cannot be read, or None."""
    if not path.is_file():
        return f"cannot read input file {str(path)!r}: no such file"
    try:
        path.open("rb").close()
    except OSError as e:
        return f"cannot read input file {str(path)!r}: {e.strerror}"
    return None


def run_command(args: argparse.Namespace) -> int:
    if args.ray:
        from batchllm.ray.jsonl_job import run_command_on_ray  # the only import of batchllm.ray

        return run_command_on_ray(args)
    if problem := _unreadable(args.input):
        return _fail(problem)
    defaults = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, stop=args.stop, ignore_eos=args.ignore_eos,
    )
    try:
        SamplingParams(**defaults)
        if args.model is not None:
            read_model_spec(Path(args.model))  # a bad model path fails before anything is written
        resume = prepare_output(args.output, args.input, args.overwrite)
    except (ValueError, OSError, JobError) as e:
        return _fail(str(e))
    if resume.num_records:
        print(f"batchllm: resuming {args.output}: {len(resume.done_ids)} lines done, "
              f"{len(resume.done_error_lines)} failed before"
              + (f"; cut a torn last line ({resume.repaired_bytes} bytes)" if resume.repaired_bytes else ""),
              file=sys.stderr)

    from batchllm.llm import LLM  # heavy import after the cheap checks

    try:
        llm = LLM(
            args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
            max_model_len=args.max_model_len, load_format=args.load_format, seed=args.seed or 0,
            block_size=args.block_size, kv_cache_memory_gib=args.kv_cache_memory_gib,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
            kv_admission_threshold=args.kv_admission_threshold,
            async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
            enforce_eager=args.enforce_eager, max_cudagraph_capture_size=args.max_cudagraph_capture_size,
            prefix_sharing=not args.no_prefix_sharing,
            plan_mode=args.plan_mode, group_order=args.group_order,
        )
    except (ValueError, OSError) as e:
        return _fail(str(e))

    started = time.perf_counter()
    num_done = 0
    model_name = str(args.model or llm.model_dir.name)
    with ResultWriter(args.output) as out:
        valid, errors, file_format = prepare_lines(
            args.input, llm.prompts, defaults, args.seed, resume, progress=not args.no_progress
        )
        for error in errors:
            out.write(error.record(file_format))
        out.sync()
        num_failed = len(errors) + len(resume.done_error_lines)
        prompts = [p for _, p, _ in valid]
        params = [sp for _, _, sp in valid]
        desc = f"requests ({num_failed} failed)" if num_failed else "requests"
        for index, output in llm.iter_generate(prompts, params, use_tqdm=not args.no_progress, progress_desc=desc):
            out.write(_result(valid[index][0], output, model_name))
            num_done += 1
    wall = time.perf_counter() - started
    total_done = num_done + len(resume.done_ids)
    stats = {**llm.last_stats, "num_lines_done": total_done, "num_lines_failed": num_failed,
             "num_lines_resumed": len(resume.done_ids) + len(resume.done_error_lines), "wall_s": wall}
    print(
        f"batchllm: {total_done + num_failed} lines: {total_done} done, {num_failed} failed "
        f"({num_done} run now); {stats.get('output_tokens', 0)} output tokens in {wall:.1f} s -> {args.output}",
        file=sys.stderr,
    )
    if args.stats is not None:
        args.stats.write_text(json.dumps(stats, indent=2) + "\n")
    return EXIT_LINES_FAILED if num_failed else EXIT_OK


def _result(line: BatchLine, output, model_name: str) -> dict:
    if line.format == OPENAI:
        top = line.sampling_overrides.get("logprobs") or 0
        return openai_batch.success_record(line.request_id, line.url, line.model or model_name, output,
                                           len(output.prompt_token_ids), top)
    return result_record(line.request_id, output, len(output.prompt_token_ids))


def prepare_lines(path: Path, prompts: PromptProcessor, defaults: dict, global_seed: int | None,
                  resume: ResumeState | None = None, progress: bool = False, chunk: int = 1024):
    """Stream the file and tokenize it in batches, skipping lines a previous run finished.

    Returns (valid lines as (line, prompt, params), new errors, the file's format). Prompts are kept
    as int32 numpy arrays and identical sampling settings share one SamplingParams, so memory
    follows the token arrays, not the line count."""
    resume = resume or ResumeState()
    valid: list[tuple[BatchLine, TokenizedPrompt, SamplingParams]] = []
    errors: list[LineError] = []
    formats: dict[str, int] = {}
    params_cache: dict[str, SamplingParams] = {}
    pending: list[tuple[BatchLine, SamplingParams, Any]] = []

    def flush() -> None:
        results = prompts.tokenize_many([p for _, _, p in pending], [line.line_number for line, _, _ in pending])
        for (line, params, _), result in zip(pending, results):
            line.prompt = None  # the tokens replace the text: never hold both for a whole file
            if isinstance(result, ValueError):
                errors.append(LineError.for_line(line, result))
            else:
                valid.append((line, TokenizedPrompt(np.asarray(result.token_ids, dtype=np.int32), None), params))
        pending.clear()

    bar = tqdm(desc="reading", unit=" lines", disable=not progress, dynamic_ncols=True)
    for item in read_batch_lines(path):
        bar.update(1)
        if isinstance(item, LineError):
            errors.append(item)
            continue
        formats[item.format] = formats.get(item.format, 0) + 1
        if item.request_id in resume.done_ids:
            continue
        try:
            params = _sampling_params(item, defaults, global_seed, params_cache)
            prompt = prompts.apply_chat_template(item.prompt, item.line_number) if item.is_chat else item.prompt
        except ValueError as e:
            errors.append(LineError.for_line(item, e))
            continue
        pending.append((item, params, {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt))
        if len(pending) >= chunk:
            flush()
    if pending:
        flush()
    bar.close()
    errors = [e for e in errors if e.line_number not in resume.done_error_lines]  # written by an earlier run
    file_format = max(formats, key=formats.get) if formats else PLAIN
    return valid, errors, file_format


def _sampling_params(line: BatchLine, defaults: dict, global_seed: int | None, cache: dict) -> SamplingParams:
    fields = {**defaults, **line.sampling_overrides}
    if fields.get("seed") is None and global_seed is not None:
        fields["seed"] = zlib.crc32(f"{global_seed}:{line.request_id}".encode())
    key = json.dumps(fields, sort_keys=True, default=str)
    if key not in cache:
        cache[key] = SamplingParams(**fields)
    return cache[key]


def plan_command(args: argparse.Namespace) -> int:
    if problem := _unreadable(args.input):
        return _fail(problem)
    from batchllm.inputs import prompt_processor_for
    from batchllm.prefix import plan_prefix_sharing

    try:
        prompts = prompt_processor_for(args.model, args.tokenizer, args.max_model_len)
    except (ValueError, OSError) as e:
        return _fail(str(e))
    valid, errors, _ = prepare_lines(args.input, prompts, {}, None)
    for error in errors:
        print(f"batchllm: {error.message}", file=sys.stderr)
    token_ids = [p.token_ids for _, p, sp in valid for _ in range(sp.n)]
    if not token_ids:
        return _fail("no valid request in the input")
    started = time.perf_counter()
    plan = plan_prefix_sharing(token_ids, mode=args.plan_mode)
    summary = {**plan.summary(), "plan_seconds": round(time.perf_counter() - started, 3),
               "num_lines_failed": len(errors)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"requests             {summary['num_requests']}")
        print(f"groups               {summary['num_groups']} top-level, {summary['num_nested_groups']} nested, "
              f"{summary['num_ungrouped']} requests ungrouped ({args.plan_mode}-level plan)")
        print(f"sharing degree       mean {summary['mean_sharing_degree']:.2f}, max {summary['max_sharing_degree']}")
        print(f"prompt tokens        {summary['prompt_tokens']}")
        print(f"prefill tokens       {summary['prefill_tokens']} after sharing")
        print(f"saving ratio         {100 * summary['saving_ratio']:.1f}%  (1 - prefill / prompt tokens)")
        if errors:
            print(f"lines failed         {len(errors)} (see above)")
    return EXIT_LINES_FAILED if errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
