"""The user's path against the benchmark's (issue 14: `batchllm run` with default settings within 5%
of `batchllm bench` on the same prompts).

The workload `batchllm bench` would build (same generator, seed and flags) is written as a JSONL file
of token prompts (greedy, ignore_eos, each request's max_tokens) and run twice, each in a process of
its own, with the same engine flags:
  - `batchllm run -i requests.jsonl -o results.jsonl --stats ...`: what a user runs; its time is the
    run's own `wall_s` (planning, generating, writing every result, and whatever reading and
    validating of the file is left once the engine is built: `run` reads while the engine loads),
    and its whole process's time is reported too (imports, loading, reading: what the user waits);
  - `batchllm bench --configs sharing`: `LLM.generate` on the same token lists, after a warm-up.
Reported: requests/s of each and run / bench. Without --tokenizer both skip the tokenizer (the
shape's config has none); with it the shape takes the tokenizer's vocabulary and `run` detokenizes
every output, as it does for a user's model.

`--chat N` (a model with a tokenizer and chat template, such as the default SmolLM2): the requests are
instead N conversations of `chat_prompts.py`, each asking for --output tokens (greedy, ignore_eos), and
`run` reads them as an OpenAI Batch file (/v1/chat/completions lines: chat template, tokenizing, the
OpenAI response bodies with their text), while `bench --workload file` gets the same conversations as
token prompts (the chat template applied and tokenized by the engine's own `PromptProcessor`, as `run`
does).

`--order` (default bench,run): bench goes first because it warms up, and its compiles fill Triton's
on-disk cache, which the `run` process then reuses; with run,bench on a GPU `run`'s `wall_s` pays
every kernel's cold compile, which no user's second job does.

    python3 benchmarks/user_path.py --model benchmarks/configs/llama-3.1-8b --workload shared \\
        --requests 1024 -- --load-format dummy --dtype bfloat16 --max-model-len 20000       # GPU
    python3 benchmarks/user_path.py --model <tiny model dir> --requests 16 --shared 64 --distinct 8 \\
        --output 4 -- --device cpu                                                           # CPU, small
    python3 benchmarks/user_path.py --chat 6000 --output 64       # the default SmolLM2, chat, OpenAI Batch
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import chat_prompts  # noqa: E402
from structured_cost import model_with_tokenizer  # noqa: E402

from batchllm.bench import Workload, add_bench_parser, fill_workload_sizes, make_workload  # noqa: E402
from batchllm.io.openai_batch import CHAT_URL  # noqa: E402
from batchllm.models.default_model import default_model_dir  # noqa: E402


def workload_args(model: str, flags: list[str], engine_flags: list[str]) -> argparse.Namespace:
    """`flags` parsed by `batchllm bench`'s own parser, so every default is the benchmark's: with the engine
    flags bench gets, the sizes it leaves out are those of the same device (`fill_workload_sizes`)."""
    parser = argparse.ArgumentParser(prog="batchllm")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--model", model, *flags, *engine_flags])
    fill_workload_sizes(args)
    return args


def write_requests(path: Path, prompts: list[list[int]], max_tokens: list[int]) -> None:
    with path.open("w") as f:
        for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
            f.write(json.dumps({"id": f"r{i}", "prompt_token_ids": prompt, "max_tokens": n,
                                "ignore_eos": True, "temperature": 0}) + "\n")


def write_chat_batch(path: Path, conversations: list, max_tokens: int, ignore_eos: bool = True,
                     temperature: float = 0.0, model: str = "m") -> None:
    """An OpenAI Batch file of chat requests, greedy unless a temperature is given; ignore_eos (vLLM's
    extra field) as `bench` runs, or False: each answer ends at the model's EOS, as a user's would."""
    with path.open("w") as f:
        for i, messages in enumerate(conversations):
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                    **({"ignore_eos": True} if ignore_eos else {})}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": CHAT_URL, "body": body}) + "\n")


def chat_workload(model: str, conversations: list, max_tokens: int) -> Workload:
    """The conversations as `run` tokenizes them: the model's chat template, then its tokenizer."""
    from batchllm.inputs import prompt_processor_for

    processor = prompt_processor_for(model)
    prompts = [processor.tokenize_prompt(processor.apply_chat_template(c, i), i).token_ids
               for i, c in enumerate(conversations)]
    return Workload(f"chat-n{len(prompts)}", prompts, [max_tokens] * len(prompts))  # (token_ids: lists)


def cli(*args: str) -> float:
    """Run a `batchllm` command in a process of its own; its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "batchllm.cli", *args], check=True)
    return time.perf_counter() - started


ORDERS = ("bench,run", "run,bench")


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(this script's options, `batchllm bench`'s workload flags, engine flags: those after `--`)."""
    engine_flags = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model or shape directory (default: the embedded SmolLM2)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for a shape without one")
    p.add_argument("--order", choices=ORDERS, default=ORDERS[0],
                   help="which command runs first (bench first: it warms the kernel caches run then finds)")
    p.add_argument("--chat", type=int, default=None, metavar="N",
                   help="N chat requests, run as an OpenAI Batch file (the model needs a chat template)")
    p.add_argument("--json-out", default=None)
    args, flags = p.parse_known_args(ours)
    return args, flags, engine_flags


def write_workload(args: argparse.Namespace, flags: list[str], engine_flags: list[str], model: str, tmp: Path
                   ) -> tuple[Workload, Path, list[str]]:
    """Write the requests `run` reads (and, for --chat, the token prompts `bench` reads) into `tmp`:
    (the workload as token prompts, the file `run` reads, `bench`'s workload flags beyond `flags`)."""
    requests = tmp / "requests.jsonl"
    if not args.chat:
        vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        work = make_workload(workload_args(model, flags, engine_flags), vocab)
        write_requests(requests, work.prompts, work.max_tokens)
        return work, requests, []
    output = workload_args(model, flags, engine_flags).output
    conversations = chat_prompts(args.chat)
    work = chat_workload(model, conversations, output)
    write_chat_batch(requests, conversations, output)
    write_requests(tmp / "tokens.jsonl", work.prompts, work.max_tokens)
    return work, requests, ["--workload", "file", "--prompts-file", str(tmp / "tokens.jsonl")]


def main(argv: list[str] | None = None) -> dict:
    args, flags, engine_flags = parse(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = str(model_with_tokenizer(args.model, args.tokenizer, tmp / "model")) if args.tokenizer else args.model
        model = model or str(default_model_dir())
        work, requests, bench_workload = write_workload(args, flags, engine_flags, model, tmp)
        tokenizer = [] if args.tokenizer or args.chat else ["--skip-tokenizer-init"]
        commands = {
            "run": ["run", "-i", str(requests), "-o", str(tmp / "results.jsonl"), "--model", model,
                    "--stats", str(tmp / "run.json"), "--no-progress", *tokenizer, *engine_flags],
            "bench": ["bench", "--model", model, *flags, *bench_workload, "--configs", "sharing",
                      "--json-out", str(tmp / "bench.json"), *engine_flags],
        }
        process_s = {name: cli(*commands[name]) for name in args.order.split(",")}
        run = json.loads((tmp / "run.json").read_text())
        bench = json.loads((tmp / "bench.json").read_text())["results"][0]
    run_rate = run["num_lines_done"] / run["wall_s"]
    summary = {"workload": work.name, "requests": len(work.prompts), "chat": bool(args.chat),
               "detokenized": bool(args.tokenizer or args.chat), "order": args.order,
               "run_wall_s": run["wall_s"], "run_requests_per_s": run_rate, "run_process_s": process_s["run"],
               "bench_wall_s": bench["wall_s"], "bench_requests_per_s": bench["requests_per_s"],
               "run_over_bench": run_rate / bench["requests_per_s"], "engine_flags": engine_flags,
               # `run` chooses its engine processes (two per GPU for a small model, unless told), bench one
               "run_engines": run.get("num_engines", 1), "bench_engines": bench.get("num_engines", 1)}
    return report(summary, args.json_out)


def report(summary: dict, json_out: str | None) -> dict:
    """Print the summary as JSON, and write it to `json_out` where given; the summary."""
    print(json.dumps(summary, indent=2))
    if json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
