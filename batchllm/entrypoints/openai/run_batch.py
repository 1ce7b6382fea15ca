"""`python -m batchllm.entrypoints.openai.run_batch -i IN.jsonl -o OUT.jsonl --model DIR`: vLLM's documented way
to run an OpenAI Batch file (`python -m vllm.entrypoints.openai.run_batch`), here `batchllm run-batch` with the
same arguments (and, as the `batchllm` command, an early Ctrl-C answered in one line: `batchllm.__main__.launch`)."""

import sys

from batchllm.__main__ import launch


def main(argv: list[str] | None = None) -> int:
    """`batchllm run-batch` over `argv` (default: this process's arguments after the module's name)."""
    return launch(["run-batch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
