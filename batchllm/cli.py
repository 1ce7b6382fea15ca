"""`batchllm run INPUT.jsonl -o OUTPUT.jsonl`: a whole batch job; `batchllm plan INPUT.jsonl`: its
prefix-sharing plan, without the model.

Exit status: 0 when every line succeeded, 1 when some lines failed (each has an error record in the
output), 2 when the job could not start (unreadable input, bad model path, bad option, damaged
output), 3 on an unexpected failure (one `batchllm: error:` line; the traceback with --debug or
BATCHLLM_LOG_LEVEL=DEBUG).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from pathlib import Path

from batchllm.bench import add_bench_parser, bench_command
from batchllm.config import default_log_level
from batchllm.io.ingest import input_problem, prepare_lines, record_for
from batchllm.io.job import JobError, OutputLock, ResultWriter, prepare_output, same_file
from batchllm.models.spec import read_model_spec
from batchllm.options import add_engine_arguments, engine_kwargs_from_args
from batchllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_LINES_FAILED, EXIT_CANNOT_START, EXIT_UNEXPECTED = 0, 1, 2, 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchllm", description="Offline, throughput-first LLM batch inference with prefix sharing."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run a JSONL batch file",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    s = run.add_argument_group("sampling defaults (a line's own fields take precedence)")
    s.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate per request")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    s.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    s.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    s.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    s.add_argument("--ignore-eos", action="store_true", help="generate past EOS up to max tokens")
    s.add_argument("--seed", type=int, default=None,
                   help="seed: lines without their own seed get one derived from this and their id, "
                   "so sampled outputs are reproducible line by line (also the engine's seed)")
    o = run.add_argument_group("output")
    o.add_argument("--stats", type=Path, default=None, help="write run statistics as JSON to this file")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_arguments(run, exclude=["seed"])  # --seed above seeds the lines and the engine
    r = run.add_argument_group("cluster (Ray Data; needs `pip install batchllm[ray]`)")
    r.add_argument("--ray", action="store_true", help="run through Ray Data; -o is then a directory of JSONL shards")
    r.add_argument("--num-replicas", type=int, default=1, help="engine replicas (with --ray)")
    r.add_argument("--ray-batch-size", type=int, default=1024, help="target rows per engine call (with --ray)")
    r.add_argument("--ray-address", default=None, help="Ray cluster address (default: a running one, else local)")

    plan = sub.add_parser(
        "plan",
        help="show the prefix-sharing plan of a JSONL batch file without running the model",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Read the same input as `run`, tokenize it (no model weights are loaded) and print "
        "requests, groups, sharing degrees, prompt tokens, prefill tokens after sharing and the saving ratio "
        "1 - prefill_tokens / prompt_tokens.",
    )
    plan.add_argument("input", type=Path, help="input JSONL file")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    add_engine_arguments(plan, names=["model", "tokenizer", "max_model_len", "plan_mode"])
    add_bench_parser(sub)
    _add_job_options(run, plan)
    return parser


def _add_job_options(run: argparse.ArgumentParser, plan: argparse.ArgumentParser) -> None:
    """Options of the job's input/output handling (kept apart from the engine and sampling options)."""
    for p in (run, plan):
        p.add_argument("--debug", action="store_true", help="print the traceback of an unexpected failure")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=default_log_level(), format="batchllm %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return run_command(args)
        if args.command == "plan":
            return plan_command(args)
        if args.command == "bench":
            return bench_command(args)
    except Exception as e:  # a bug or an environment failure: not a failed line, not a bad option
        debug = getattr(args, "debug", False) or logging.getLogger().isEnabledFor(logging.DEBUG)
        if debug:
            traceback.print_exc()
        print(f"batchllm: error: unexpected failure: {type(e).__name__}: {e}"
              + ("" if debug else " (--debug shows the traceback)"), file=sys.stderr)
        return EXIT_UNEXPECTED
    return EXIT_CANNOT_START


def _fail(message: str) -> int:
    print(f"batchllm: error: {message}", file=sys.stderr)
    return EXIT_CANNOT_START


def run_command(args: argparse.Namespace) -> int:
    if args.ray:
        from batchllm.ray.jsonl_job import run_command_on_ray  # the only import of batchllm.ray

        return run_command_on_ray(args)
    if problem := input_problem(args.input):
        return _fail(problem)
    if same_file(args.output, args.input):  # before the lock, which would create the output
        return _fail(f"refusing to write the output onto the input file {str(args.input)!r} "
                     "(even with --overwrite: it would destroy the input); choose another -o")
    try:
        with OutputLock(args.output):
            return _run_locked(args)
    except JobError as e:
        return _fail(str(e))


def _run_locked(args: argparse.Namespace) -> int:
    defaults = dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, stop=args.stop, ignore_eos=args.ignore_eos,
    )
    try:
        SamplingParams(**defaults, seed=args.seed)  # --seed also seeds the engine: the same range applies
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
        llm = LLM(**{**engine_kwargs_from_args(args), "seed": args.seed or 0})  # --seed: lines' and engine's
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
            out.write(record_for(valid[index].line, output, model_name))
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


def plan_command(args: argparse.Namespace) -> int:
    if problem := input_problem(args.input):
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
