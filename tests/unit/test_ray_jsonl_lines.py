"""`run --ray` reads lines as `run` does: an id goes to the first line accepted (`io.ingest.IdClaims`), not to a
line refused for its own fields, and a duplicate's error names the line that has the id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("ray.data")


def ray_rows(src: Path, **kwargs) -> list[dict]:
    """The rows `run --ray`'s read task makes of `src` (one task per file), in blocks of 2 rows."""
    from batchllm.ray.jsonl_job import _JsonlLines

    with open(src, "rb") as f:
        datasource = _JsonlLines([str(src)], rows_per_block=2, **kwargs)
        return [row for table in datasource._read_stream(f, str(src)) for row in table.to_pylist()]


def test_an_id_goes_to_the_first_line_accepted_under_ray_as_without_it(tmp_path):
    """An OpenAI line refused for its temperature (7) took its custom_id in the read task, so the valid line after it
    failed as its duplicate and the id got no answer; the duplicates' errors named no line."""
    from batchllm.io.jsonl import LineError
    from batchllm.ray.jsonl_job import _CliPreprocess, _CliRecords, _parse

    def openai(cid, **body):
        return {"custom_id": cid, "url": "/v1/completions", "body": {"prompt": "Hi", "max_tokens": 2, **body}}

    lines = [openai("d", temperature=7), openai("d"), {"id": "x", "prompt": "Hi"}, {"id": "y", "prompt": "Hi"},
             {"id": "x", "prompt": "again"}, openai("d"), {"id": "y", "prompt": "Hi", "top_p": 0}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = ray_rows(src)
    preprocess = _CliPreprocess({"max_tokens": 4}, 0)
    errors = {}
    for row in rows:
        try:
            failed = preprocess(row).get("error")
        except ValueError as e:  # (the tokenize stage records it as the row's error)
            failed = str(e)
        if failed is not None:
            errors[row["line"]] = json.loads(_CliRecords(None, "plain")(row, None, failed)["record"])
    assert sorted(errors) == [1, 5, 6, 7]
    assert "temperature" in errors[1]["error"]["message"]
    assert errors[5]["error"] == {"line": 5, "message": "line 5: duplicate id 'x' (line 3 has it)"}
    assert errors[6]["error"]["message"] == "line 6: duplicate custom_id 'd' (line 2 has it)"
    assert "top_p" in errors[7]["error"]["message"]  # (refused for its own value: y stays line 4's)
    assert not isinstance(_parse(rows[1]), LineError)


def test_the_read_task_checks_a_lines_values_under_the_jobs_defaults(tmp_path):
    """min_tokens 10 is refused under the job's --max-tokens 4 (valid under SamplingParams' own 16): that line takes
    no id, so the next line with it has it."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "m", "prompt": "Hi", "min_tokens": 10}\n{"id": "m", "prompt": "Hi"}\n')
    assert [row["duplicate"] for row in ray_rows(src, defaults={"max_tokens": 4})] == [None, None]
    assert [row["duplicate"] for row in ray_rows(src)] == [None, 1]


def test_a_records_lone_surrogate_is_escaped_under_ray_as_without_it():
    """A hermes call whose arguments hold the JSON escape "\\ud800" reads back to a lone surrogate, which Arrow cannot
    encode: `run --ray` failed the whole job (exit 3, no records) where `run` writes the line with the surrogate
    escaped. The Ray record is now `run`'s line, byte for byte, and Arrow takes it."""
    import pyarrow as pa

    from batchllm.io.ingest import LineServing, ResponseShape
    from batchllm.io.job import encode_record
    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, _CliRecords
    from batchllm.request_output import CompletionOutput, RequestOutput

    tools = [{"type": "function", "function": {"name": "echo"}}]
    line = {"id": 1, "messages": [{"role": "user", "content": "Hi"}], "tools": tools, "tool_choice": "auto"}
    row = {RAW: json.dumps(line).encode(), LINE: 1, DUPLICATE: None}
    answer = '<tool_call>{"name": "echo", "arguments": {"s": "\\ud800"}}</tool_call>'
    output = RequestOutput("1", "p", [1, 2], None, [CompletionOutput(0, answer, [5], -1.0, None, finish_reason="stop")])
    names = ResponseShape("m", serving=LineServing(auto_tool_parser="hermes"))
    text = _CliRecords(names, "plain")(row, output, None)["record"]
    pa.array([text])  # (raised UnicodeEncodeError: "surrogates not allowed")
    record = json.loads(text)
    assert [c["function"] for c in record["tool_calls"]] == [{"name": "echo", "arguments": '{"s": "\ud800"}'}]
    assert "\\ud800" in text and (text + "\n").encode("utf-8") == encode_record(record)
