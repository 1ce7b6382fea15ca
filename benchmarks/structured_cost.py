"""Throughput cost of structured output (issue 15): the same batch with all, half and none of its
requests kept to a JSON schema, on one engine, one after another.

The model is a shape (config.json, dummy weights) given the tokenizer of --tokenizer (a real
vocabulary is what the grammar is compiled against; the config's vocab_size is set to it). A
random-weight model ends a JSON answer at random places, so a constrained request's output length
is whatever the grammar and the weights make of it: the all-constrained run goes first, and every
later run gives each request exactly the length it had there (unconstrained requests with
ignore_eos), so all runs compute the same tokens and only the masks differ.

  python3 benchmarks/structured_cost.py --model benchmarks/configs/llama-3.1-8b \
      --tokenizer ~/.cache/batchllm/SmolLM2-135M-Instruct --json-out structured.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from batchllm import LLM, SamplingParams
from batchllm.bench import shared_prefix_workload

SCHEMA = {"type": "object", "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                                           "reason": {"type": "string"}, "score": {"type": "integer"}},
          "required": ["label", "reason", "score"]}


def model_with_tokenizer(shape_dir: str, tokenizer_dir: str, out: Path) -> Path:
    """A copy of the shape's config.json with the tokenizer's vocabulary and its BOS/EOS ids (the shape's
    own lie outside that vocabulary), and the tokenizer's files."""
    from transformers import AutoTokenizer

    config = json.loads((Path(shape_dir) / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    config.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def run(llm: LLM, prompts: list, params: list) -> dict:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"wall_s": wall, "requests_per_s": len(outs) / wall, "output_tokens": tokens,
            "output_tokens_per_s": tokens / wall, "lengths": [len(o.outputs[0].token_ids) for o in outs],
            "texts": [o.outputs[0].text for o in outs]}


def params_for(n: int, every: int, lengths: list[int] | None, max_tokens: int) -> list[SamplingParams]:
    """Request i is constrained when every > 0 and i % every == 0; unconstrained requests make
    exactly lengths[i] tokens (the constrained run's)."""
    out = []
    for i in range(n):
        if every and i % every == 0:
            out.append(SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs={"json": SCHEMA}))
        else:
            out.append(SamplingParams(temperature=0, max_tokens=lengths[i] if lengths else max_tokens,
                                      ignore_eos=True))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="shape directory (config.json; dummy weights)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (tokenizer.json ...)")
    p.add_argument("--requests", type=int, default=1024)
    p.add_argument("--shared", type=int, default=2000)
    p.add_argument("--distinct", type=int, default=200)
    p.add_argument("--degree", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = model_with_tokenizer(args.model, args.tokenizer, Path(tmp) / "model")
        llm = LLM(str(model), load_format="dummy", dtype="bfloat16", max_model_len=4096)
        vocab = min(llm.model_spec.vocab_size, 30000)
        work = shared_prefix_workload(args.shared, args.distinct, args.degree, args.requests, args.max_tokens, vocab,
                                      shuffle=True)
        prompts = [{"prompt_token_ids": t} for t in work.prompts]
        n = len(prompts)
        warm = min(64, n)
        run(llm, prompts[:warm], params_for(warm, 1, None, args.max_tokens))  # warm-up: compile, graphs, grammar
        result = {"all": run(llm, prompts, params_for(n, 1, None, args.max_tokens))}
        lengths = result["all"]["lengths"]
        result["none"] = run(llm, prompts, params_for(n, 0, lengths, args.max_tokens))
        result["half"] = run(llm, prompts, params_for(n, 2, lengths, args.max_tokens))
        valid = sum(_valid(t) for t in result["all"]["texts"] if t)
        llm.shutdown()
    base = result["none"]["output_tokens_per_s"]
    for name in ("none", "half", "all"):
        r = result[name]
        print(f"{name:5s} constrained: {r['requests_per_s']:8.2f} req/s {r['output_tokens_per_s']:9.1f} out tok/s "
              f"({r['output_tokens']} tokens, {r['output_tokens_per_s'] / base:.3f} of none)", flush=True)
    print(f"constrained outputs that parse and validate: {valid} / {n} (mean length "
          f"{sum(lengths) / n:.1f} tokens; a random-weight model stops only at max_tokens or the schema's end)")
    if args.json_out:
        slim = {k: {kk: vv for kk, vv in v.items() if kk not in ("lengths", "texts")} for k, v in result.items()}
        Path(args.json_out).write_text(json.dumps({"args": vars(args), "valid": valid, **slim}, indent=2))


def _valid(text: str) -> bool:
    try:
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except Exception:  # noqa: BLE001 - truncated at max_tokens, or jsonschema absent on the device
        return False


if __name__ == "__main__":
    main()
