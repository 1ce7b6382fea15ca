"""Issue 21: no line's content can stop a batch job; the job's own failures are told apart from a line's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
DEEP = 100_000


def cli(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "batchllm.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def openai(custom_id, **body):
    body.setdefault("messages", [{"role": "user", "content": "Say hello."}])
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": CHAT,
                       "body": {"model": "m", "max_tokens": 3, "temperature": 0, **body}})


# (input line, the fragment its error message must hold); None: a good line
LINES = [
    ('{"id": "good-1", "prompt": "The capital of France is", "max_tokens": 3}', None),
    ('{"id": "sur-prompt", "prompt": "a\\ud800b"}', "'prompt' holds a lone surrogate"),
    ('{"id": "sur-chat", "messages": [{"role": "user", "content": "\\udfff"}]}', "'messages'[0]['content']"),
    (openai("sur-openai", messages=[{"role": "user", "content": "x\\ud834"}]).replace("\\\\", "\\"),
     "'body'['messages'][0]['content'] holds a lone surrogate"),
    ('{"id": "x\\ud800", "prompt": "hi"}', "'id' holds a lone surrogate"),
    ('{"id": "sur-field", "prompt": "hi", "\\ud800": 1}', "a field name in the line holds a lone surrogate"),
    ('{"id": "seed-big", "prompt": "hi", "seed": 18446744073709551616}', "seed must be in"),
    (f'{{"id": "seed-neg", "prompt": "hi", "seed": -{2**70}}}', "seed must be in"),
    ('{"id": "digits", "prompt": "hi", "max_tokens": %s}' % ("7" * 5000), "malformed JSON: Exceeds the limit"),
    ("[" * DEEP + "]" * DEEP, "nested too deeply"),
    ('{"id": "deep", "prompt": "hi", "stop": %s}' % ("[" * DEEP + "]" * DEEP), "nested too deeply"),
    (f'{{"id": "n-huge", "prompt": "hi", "n": {2**70}}}', "n must be in [1, 16384]"),
    ('{"id": "nan", "prompt": "hi", "temperature": NaN}', "temperature must be a finite number"),
    (openai("nan-openai", temperature=float("nan")), ": temperature must be a finite number"),  # its body's name
    ('{"id": "inf", "prompt": "hi", "top_p": -Infinity}', "top_p must be a finite number"),
    # a stop id no token has is taken, as vLLM 0.26 takes it (it never stops anything, nor does min_tokens ban it)
    (f'{{"id": "stop-id", "prompt": "hi", "stop_token_ids": [{2**70}, -1], "min_tokens": 2, "max_tokens": 3}}', None),
    ('{"id": "stop-float", "prompt": "hi", "stop_token_ids": [2.5]}', "stop_token_ids must be a list of integers"),
    (f'{{"id": "top-k", "prompt": "hi", "top_k": {2**70}}}', "top_k must be"),
    ('{"id": "good-2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}', None),
    (openai("good-3"), None),
    # integers written as floats (pandas writes an integer column with gaps so) are read as vLLM's pydantic does
    ('{"id": "floats", "prompt": "hi", "max_tokens": 3.0, "n": 1.0, "seed": 5.0}', None),
    (openai("floats-openai", max_tokens=3.0, seed=5.0, logprobs=True, top_logprobs=2.0), None),  # (2.0 crashed
    # the whole job at its record: the record read the line's own 2.0)
    ('{"id": "half", "prompt": "hi", "max_tokens": 4.5}', "max_tokens must be a positive integer"),
    (openai("n-openai", n=1.5), ": n must be an integer, got 1.5"),
]
GOOD = {"good-1", "good-2", "good-3", "floats", "floats-openai", "stop-id"}


def _records(out):
    """The output's records, then those of its errors file (failed OpenAI Batch lines go there)."""
    errors = out.with_name(out.name.replace(".jsonl", ".errors.jsonl"))
    return out.read_bytes().splitlines() + (errors.read_bytes().splitlines() if errors.exists() else [])


def _outcomes(out):
    """(id, error message or None) per record; OpenAI error messages carry the line number."""
    result = {}
    for raw in _records(out):
        rec = json.loads(raw)
        rid = rec.get("custom_id", rec.get("id"))
        error = rec.get("error")
        key = int(error["message"].split(":")[0].split()[1]) if error else rid
        result[key] = error["message"] if error else None
    return result


def test_every_bad_line_is_its_own_error_and_the_rest_complete(tmp_path, default_model_dir):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(line for line, _ in LINES) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ("run", src, "-o", out, "--temperature", "0", "--no-progress")
    r = cli(*args)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    outcomes = _outcomes(out)
    assert len(_records(out)) == len(LINES), "one record per line"
    for number, (_, fragment) in enumerate(LINES, start=1):
        if fragment is None:
            continue
        assert fragment in outcomes[number], (number, outcomes[number])
    assert {k for k, v in outcomes.items() if v is None} == GOOD
    n_bad = sum(f is not None for _, f in LINES)
    assert f"{len(GOOD)} done, {n_bad} failed" in r.stderr

    first = _records(out)
    again = cli(*args)
    assert again.returncode == 1 and "Traceback" not in again.stderr and "already complete" in again.stderr
    assert _records(out) == first, "a rerun finds everything done and rewrites nothing"


