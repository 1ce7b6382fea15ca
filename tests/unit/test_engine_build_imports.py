"""Building an engine does not pull in torch's compiler stack (torch._dynamo, sympy): a factory call on the meta
device (the rotary tables, `to_empty`) runs torch's reference implementations, whose first use imports it, which
cost every engine process 2-4 s of its start on the device (`docs/benchmarks.md`, session 45)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BUILD = """
import json, sys
from batchllm import LLM
before = set(sys.modules)
llm = LLM(sys.argv[1], load_format="dummy", skip_tokenizer_init=True, device="cpu", max_model_len=256)
heavy = ("torch._dynamo", "sympy", "torch.fx.experimental.symbolic_shapes")
print(json.dumps({name: name in sys.modules and name not in before for name in heavy}))
"""


def test_building_an_engine_imports_no_compiler_stack():
    done = subprocess.run([sys.executable, "-c", BUILD, str(ROOT / "benchmarks/configs/smollm2-135m")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert not any(imported.values()), f"the build imported {[name for name, new in imported.items() if new]}"
