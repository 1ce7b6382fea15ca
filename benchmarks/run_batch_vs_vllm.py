"""The user's whole job against vLLM's: one OpenAI Batch file through `batchllm run` and through vLLM's
`run-batch` (`python -m vllm.entrypoints.openai.run_batch`), each in a process of its own, each at its
defaults, on the same GPU.

What a user waits for is the process: start-up (imports, weights, compiles, CUDA graphs), reading the
file, generating, writing every result. Both are timed that way (`process_s`), and generation alone
where each reports it (`run`'s `wall_s` from --stats; vLLM's "Running batch" progress line, whole
seconds). Each side's output is checked: every line answered with status 200 and every request's
completion_tokens equal to its max_tokens (greedy, ignore_eos, vLLM's extra field, which both accept),
so both did the same work.

Workloads (chat requests, /v1/chat/completions):
  - `chat`: N conversations of `chat_prompts.py` (system + user), as `user_path.py --chat`;
  - `document`: D documents of ~S tokens, each the system message of Q questions (a document asked many
    questions), in file order document by document, or shuffled with --shuffle.

    # the default SmolLM2 (real weights), 6,000 chats:
    python3 benchmarks/run_batch_vs_vllm.py --workload chat --requests 6000 --output 64
    # the Llama-3.1-8B shape with SmolLM2's tokenizer, dummy weights:
    python3 benchmarks/run_batch_vs_vllm.py --workload document --model benchmarks/configs/llama-3.1-8b \\
        --tokenizer <SmolLM2 dir> --documents 128 --questions 16 --document-tokens 2000 --output 100 \\
        -- --load-format dummy --dtype bfloat16 --max-model-len 4096
Flags after `--` go to both commands (their spellings agree for --load-format, --dtype, --max-model-len).
vLLM must be importable (PYTHONPATH); `--sides batchllm` runs ours alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import chat_prompts  # noqa: E402
from structured_cost import model_with_tokenizer  # noqa: E402
from user_path import report, write_chat_batch  # noqa: E402

QUESTIONS = ["Summarise the document above in two sentences.", "What is the main claim of the document?",
             "List three facts the document states.", "Who would find the document useful, and why?",
             "What evidence does the document give?", "Name one weakness of the document's argument.",
             "Translate the first sentence of the document into French.", "What happens next, in your view?",
             "Which words in the document are technical terms?", "Write a title for the document.",
             "What question does the document leave open?", "Rewrite the document's key point for a child.",
             "What numbers appear in the document?", "Give the document's tone in one word.",
             "Which part of the document is least clear?", "What would you ask the author?"]
STARTUP_KEYS = ("engine_build_s", "input_read_s", "input_read_wait_s")
"""`run --stats` keys reported beside its generation time: its start-up, which the process time includes."""
SERVED_NAME = "batch-model"
"""The model name in every request body, and vLLM's --served-model-name (vLLM refuses other names)."""


def document_conversations(tokenizer_dir: str, documents: int, questions: int, tokens: int, shuffle: bool,
                           seed: int = 0) -> list[list[dict[str, str]]]:
    """documents x questions conversations: each document (seeded words, about `tokens` tokens) the
    system message of `questions` user questions; document by document, or shuffled."""
    from transformers import AutoTokenizer

    if questions > len(QUESTIONS):
        raise ValueError(f"at most {len(QUESTIONS)} questions per document")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    rng = random.Random(seed)
    syllables = ("ka", "to", "ri", "mel", "san", "dor", "vi", "len", "pa", "qu", "ost", "er", "an", "el", "ti", "mo")
    conversations = []
    for d in range(documents):
        words = [f"Document {d}."]
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(tokens // 4)]
        system = tokenizer.decode(tokenizer(" ".join(words))["input_ids"][:tokens])
        conversations += [[{"role": "system", "content": system}, {"role": "user", "content": q}]
                          for q in QUESTIONS[:questions]]
    if shuffle:
        rng.shuffle(conversations)
    return conversations


def timed(command: list[str], log: Path, env: dict[str, str]) -> float:
    """Run `command` with its output in `log`; its wall time in seconds (raises when it fails)."""
    started = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited {done.returncode}; last lines:\n"
                           + "\n".join(log.read_text().splitlines()[-20:]))
    return elapsed


def check_output(path: Path, requests: int, max_tokens: int) -> tuple[dict, dict]:
    """Every request answered (status 200) with max_tokens completion tokens; (the answers by custom_id,
    the sums of usage's prompt_tokens and prompt_tokens_details.cached_tokens, None where not reported)."""
    texts, bad = {}, []
    totals = {"prompt_tokens": 0, "cached_tokens": 0}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        response = record.get("response") or {}
        body = response.get("body") or {}
        usage = body.get("usage") or {}
        if response.get("status_code") != 200 or usage.get("completion_tokens") != max_tokens:
            bad.append(record.get("custom_id"))
        else:
            texts[record["custom_id"]] = body["choices"][0]["message"]["content"]
            totals["prompt_tokens"] += usage["prompt_tokens"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            totals["cached_tokens"] = None if cached is None or totals["cached_tokens"] is None else (
                totals["cached_tokens"] + cached)
    if bad or len(texts) != requests:
        raise RuntimeError(f"{path}: {len(texts)} of {requests} answered in full; first bad: {bad[:3]}")
    return texts, totals


def vllm_generation_s(log: Path) -> float | None:
    """The elapsed time on vLLM's last "Running batch" progress line (whole seconds), or None."""
    found = re.findall(r"Running batch: .*?\[(?:(\d+):)?(\d+):(\d+)<", log.read_text())
    if not found:
        return None
    h, m, s = found[-1]
    return int(h or 0) * 3600 + int(m) * 60 + int(s)


def commands(model: str, requests: Path, tmp: Path, flags: list[str]) -> dict[str, list[str]]:
    return {
        "batchllm": [sys.executable, "-m", "batchllm.cli", "run", str(requests), "-o", str(tmp / "batchllm.jsonl"),
                     "--model", model, "--stats", str(tmp / "batchllm_stats.json"), "--no-progress", *flags],
        "vllm": [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(requests),
                 "-o", str(tmp / "vllm.jsonl"), "--model", model, "--served-model-name", SERVED_NAME, *flags],
    }


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this script's options, the flags after `--` for both commands)."""
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("chat", "document"), default="chat")
    p.add_argument("--model", default=None, help="model or shape directory (default: the embedded SmolLM2)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for a shape without one")
    p.add_argument("--requests", type=int, default=6000, help="chat: the number of conversations")
    p.add_argument("--documents", type=int, default=128)
    p.add_argument("--questions", type=int, default=16)
    p.add_argument("--document-tokens", type=int, default=2000)
    p.add_argument("--shuffle", action="store_true", help="document: the requests in a seeded random order")
    p.add_argument("--output", type=int, default=64, help="max_tokens of every request (ignore_eos)")
    p.add_argument("--sides", default="batchllm,vllm", help="which commands run, in this order")
    p.add_argument("--log-dir", default=None, help="keep each side's log here")
    p.add_argument("--json-out", default=None)
    return p.parse_args(argv[:split]), argv[split + 1:]


def main(argv: list[str] | None = None) -> dict:
    args, flags = parse(sys.argv[1:] if argv is None else argv)
    from batchllm.models.default_model import default_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(default_model_dir())
        if args.tokenizer:
            model = str(model_with_tokenizer(model, args.tokenizer, tmp / "model"))
        if args.workload == "chat":
            conversations = chat_prompts(args.requests)
        else:
            conversations = document_conversations(model, args.documents, args.questions, args.document_tokens,
                                                   args.shuffle)
        requests = tmp / "requests.jsonl"
        write_chat_batch(requests, conversations, args.output, model=SERVED_NAME)
        logs = Path(args.log_dir or tmp)
        logs.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
        summary = {"workload": args.workload, "requests": len(conversations), "output": args.output,
                   "shuffle": args.shuffle, "flags": flags}
        texts = {}
        for side in args.sides.split(","):
            summary[f"{side}_process_s"] = timed(commands(model, requests, tmp, flags)[side], logs / f"{side}.log", env)
            texts[side], totals = check_output(tmp / f"{side}.jsonl", len(conversations), args.output)
            summary.update({f"{side}_{key}": value for key, value in totals.items()})
            summary[f"{side}_requests_per_s"] = len(conversations) / summary[f"{side}_process_s"]
        if "batchllm" in texts:  # generation, and where the rest of the process went (STARTUP_KEYS)
            stats = json.loads((tmp / "batchllm_stats.json").read_text())
            summary["batchllm_generation_s"] = stats["wall_s"]
            # the responses' prompt tokens less their cached tokens: the prefill computed (each shared prefix
            # is charged to one request), against the engine's own count
            summary["batchllm_prefill_tokens_computed"] = stats.get("prefill_tokens_computed")
            summary.update({f"batchllm_{key}": stats.get(key) for key in STARTUP_KEYS})
        if "vllm" in texts:
            summary["vllm_generation_s"] = vllm_generation_s(logs / "vllm.log")
        if len(texts) == 2:
            summary["process_ratio"] = summary["vllm_process_s"] / summary["batchllm_process_s"]
            summary["same_answer"] = sum(texts["batchllm"][k] == texts["vllm"][k] for k in texts["vllm"]) / len(
                conversations)
    return report(summary, args.json_out)


if __name__ == "__main__":
    main()
