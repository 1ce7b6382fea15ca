"""`python -m batchllm.entrypoints.openai.run_batch -i IN.jsonl -o OUT.jsonl --model DIR`: vLLM's documented way
to run an OpenAI Batch file (`python -m vllm.entrypoints.openai.run_batch`), here `batchllm run-batch` with the
same arguments."""

import sys

from batchllm.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """`batchllm run-batch` over `argv` (default: this process's arguments after the module's name)."""
    return cli_main(["run-batch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
