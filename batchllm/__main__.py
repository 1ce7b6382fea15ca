"""`python -m batchllm ...` and the `batchllm` command (`launch`)."""

import signal
import sys


def launch(argv: list[str] | None = None) -> int:
    """The `batchllm` command over `argv` (default: the process's arguments): `cli.main`, and Ctrl-C before it
    takes over (while Python loads the command, a quarter second, or reads its options) answered as after: one
    line and status 130, not a traceback."""
    try:
        from batchllm.cli import main

        return main(argv)
    except KeyboardInterrupt:
        print("batchllm: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(launch())
