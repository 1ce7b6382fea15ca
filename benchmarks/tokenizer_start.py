"""Seconds a fresh process takes to load a model's tokenizer (`inputs.load_tokenizer`), with the plain config that
chooses the class (`inputs.tokenizer_choice_config`, the default) against AutoTokenizer loading the model's config
class itself, each in a process of its own, alternating. Every process that loads a tokenizer pays this: `batchllm
run`'s parent and each of its engine processes.

    PYTHONPATH=. .venv/bin/python benchmarks/tokenizer_start.py [MODEL_DIR] [--repeat 3] [--no-bytecode]

MODEL_DIR: a model directory (default: the default model, converted). `--no-bytecode` makes every process compile
the modules it imports from source (an empty `PYTHONPYCACHEPREFIX` and `-B`), as on the device's image, whose
site-packages hold no bytecode (docs/benchmarks.md, session 45). Printed per process: seconds importing
`batchllm.inputs` and transformers' AutoTokenizer (both ways do), seconds in `load_tokenizer` (wall, and this
process's CPU time, which other processes disturb less), and which of the heavy modules the load imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
started, started_cpu = time.perf_counter(), time.process_time()
from pathlib import Path
from transformers import AutoTokenizer
from batchllm import inputs
imported, imported_cpu = time.perf_counter(), time.process_time()
if sys.argv[2] == "autoconfig":
    inputs.tokenizer_choice_config = lambda path: None
before = set(sys.modules)
inputs.load_tokenizer(Path(sys.argv[1]))
loaded, loaded_cpu = time.perf_counter(), time.process_time()
heavy = [m for m in ("sympy", "torch.distributed.tensor", "torch._dynamo") if m in sys.modules and m not in before]
print(json.dumps({"import_s": imported - started, "load_s": loaded - imported, "load_cpu_s": loaded_cpu - imported_cpu,
                  "heavy": heavy}))
"""


def child(model_dir: str, mode: str, no_bytecode: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", CHILD, model_dir, mode]
    with tempfile.TemporaryDirectory() as empty_cache:
        if no_bytecode:
            env["PYTHONPYCACHEPREFIX"] = empty_cache
            command.insert(1, "-B")
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-bytecode", action="store_true")
    args = parser.parse_args()
    if args.model_dir is None:
        from batchllm.models.default_model import default_model_dir

        args.model_dir = str(default_model_dir())
    print(f"{args.model_dir}, bytecode {'off' if args.no_bytecode else 'on'}")
    for run in range(args.repeat):
        for mode in ("plain-config", "autoconfig"):
            r = child(args.model_dir, mode, args.no_bytecode)
            print(f"run {run + 1} {mode:>12}: import {r['import_s']:.2f} s, load_tokenizer {r['load_s']:.2f} s "
                  f"(CPU {r['load_cpu_s']:.2f} s), "
                  f"imported {', '.join(r['heavy']) or 'none of the heavy modules'}")


if __name__ == "__main__":
    main()
