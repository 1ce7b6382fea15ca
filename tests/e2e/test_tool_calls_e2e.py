"""Forced tool calls end to end on SmolLM2 (`batchllm run`): OpenAI Batch chat lines with a named tool_choice or
"required", and a plain messages line with a named one, come back as tool calls whose arguments validate against
the tool's parameters; "auto" fails its line alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.slow

VERDICT = {"type": "object", "properties": {"wet": {"type": "boolean"}}, "required": ["wet"],
           "additionalProperties": False}
COLOR = {"type": "object", "properties": {"color": {"type": "string", "enum": ["red", "green", "blue"]}},
         "required": ["color"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "verdict", "description": "Say whether it is wet",
                                           "parameters": VERDICT}},
         {"type": "function", "function": {"name": "paint", "description": "Pick a color", "parameters": COLOR}}]
SCHEMAS = {"verdict": VERDICT, "paint": COLOR}
QUESTION = [{"role": "user", "content": "Is water wet? Call a tool."}]


def openai_line(custom_id: str, tool_choice, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "smollm2", "messages": QUESTION, "tools": TOOLS, "tool_choice": tool_choice,
                     "temperature": 0, "max_tokens": 60, **body}}


def check_calls(calls: list[dict], names: set[str]) -> None:
    """Each call is vLLM's shape, of one of `names`, its arguments JSON valid for that tool's parameters."""
    assert calls
    for call in calls:
        assert set(call) == {"id", "type", "function"} and call["type"] == "function"
        assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", call["id"])
        assert set(call["function"]) == {"name", "arguments"} and call["function"]["name"] in names
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


def test_forced_tool_calls_come_back_as_valid_tool_calls(tmp_path, default_model_dir):
    lines = [openai_line("named", {"type": "function", "function": {"name": "paint"}}),
             openai_line("required", "required", n=2, seed=1, temperature=1.0),
             openai_line("single", "required", parallel_tool_calls=False),
             openai_line("auto", "auto"),
             {"id": "plain", "messages": QUESTION, "tools": TOOLS, "temperature": 0, "max_tokens": 60,
              "tool_choice": {"type": "function", "function": {"name": "verdict"}}}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = subprocess.run([sys.executable, "-m", "batchllm.cli", "run", str(src), "-o", str(out), "--no-progress",
                        "--model", str(default_model_dir)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "4 done, 1 failed" in r.stderr, r.stderr  # (the "auto" line alone)
    records = {rec.get("custom_id", rec.get("id")): rec for rec in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"named", "required", "single", "plain"}

    named = records["named"]["response"]["body"]["choices"][0]
    assert named["finish_reason"] == "stop" and named["message"]["content"] == ""
    check_calls(named["message"]["tool_calls"], {"paint"})
    assert len(named["message"]["tool_calls"]) == 1

    required = records["required"]["response"]["body"]
    assert len(required["choices"]) == 2
    for choice in required["choices"]:
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == ""
        check_calls(choice["message"]["tool_calls"], {"verdict", "paint"})
    single = records["single"]["response"]["body"]["choices"][0]
    assert single["finish_reason"] == "tool_calls" and len(single["message"]["tool_calls"]) == 1
    check_calls(single["message"]["tool_calls"], {"verdict", "paint"})

    plain = records["plain"]
    assert plain["finish_reason"] == "stop" and len(plain["tool_calls"]) == 1
    check_calls(plain["tool_calls"], {"verdict"})
    assert plain["tool_calls"][0]["function"]["arguments"] == plain["text"]

    (error,) = map(json.loads, (tmp_path / "out.errors.jsonl").read_text().splitlines())
    assert error["custom_id"] == "auto" and "needs a tool-call parser" in error["error"]["message"]


def test_auto_lines_are_read_by_the_tool_call_parser_end_to_end(tmp_path, default_model_dir):
    """With vLLM's --enable-auto-tool-choice --tool-call-parser hermes, an "auto" line's text answer is read as the
    message's tool calls (its own structured_outputs, kept as vLLM keeps it beside "auto", makes SmolLM2 write a
    Hermes call deterministically); an answer without a call stays content; a plain line's record adds the calls.
    Before, every such line failed."""
    call = '<tool_call>\n{"name": "paint", "arguments": {"color": "red"}}\n</tool_call>'
    forced_text = {"structured_outputs": {"choice": ["Painting.\n" + call]}}
    lines = [openai_line("call", "auto", **forced_text),
             openai_line("text", "auto", structured_outputs={"choice": ["No tool needed."]}),
             {"id": "plain", "messages": QUESTION, "tools": TOOLS, "temperature": 0, "max_tokens": 60,
              "tool_choice": "auto", **forced_text}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = subprocess.run([sys.executable, "-m", "batchllm.cli", "run", str(src), "-o", str(out), "--no-progress",
                        "--model", str(default_model_dir), "--enable-auto-tool-choice", "--tool-call-parser",
                        "hermes"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    records = {rec.get("custom_id", rec.get("id")): rec for rec in map(json.loads, out.read_text().splitlines())}
    called = records["call"]["response"]["body"]["choices"][0]
    assert called["finish_reason"] == "tool_calls" and called["message"]["content"] == "Painting.\n"
    check_calls(called["message"]["tool_calls"], {"paint"})
    assert called["message"]["tool_calls"][0]["function"]["arguments"] == '{"color": "red"}'
    text = records["text"]["response"]["body"]["choices"][0]
    assert text["finish_reason"] == "stop" and text["message"]["content"] == "No tool needed."
    assert "tool_calls" not in text["message"]
    plain = records["plain"]
    assert plain["finish_reason"] == "tool_calls" and plain["text"] == "Painting.\n" + call
    check_calls(plain["tool_calls"], {"paint"})
