"""How long the one-time conversion of a GGUF file takes (what a fresh machine's first `batchllm run` pays for
the embedded default model), with the file's metadata parsed once (`default_model._gguf_read_once`, the default)
against once per reader (transformers' config, weights and tokenizer loads and the rope read each parse it).

    PYTHONPATH=. python3 benchmarks/gguf_convert.py                   # the embedded SmolLM2 GGUF, both ways, twice
    PYTHONPATH=. python3 benchmarks/gguf_convert.py --gguf x.gguf --rounds 1

Each round converts both ways into temporary directories (nothing is cached), alternating which goes first, in this
one process; the first conversion of the process also pays transformers' imports, so compare later rounds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _convert_seconds(gguf: Path, read_once: bool) -> float:
    from batchllm.models import default_model

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        convert = default_model._convert if read_once else default_model._convert_read_once
        convert(gguf, Path(out), gguf.stem)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None, help="the file (default: the embedded SmolLM2 GGUF)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    from batchllm.models.default_model import find_gguf

    gguf = args.gguf or find_gguf()
    rows = []
    for round_index in range(args.rounds):
        order = (True, False) if round_index % 2 == 0 else (False, True)
        for read_once in order:
            seconds = _convert_seconds(gguf, read_once)
            rows.append({"round": round_index, "read_once": read_once, "seconds": round(seconds, 2)})
            print(f"round {round_index}: metadata parsed {'once' if read_once else 'per reader'}: {seconds:.2f} s",
                  flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps({"gguf": str(gguf), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
