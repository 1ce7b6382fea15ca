"""Plain JSONL batch files: one request per line, one result per line.

Input line: {"id": ..., "prompt": "..."} | {"id": ..., "messages": [...]} | {"id": ..., "prompt_token_ids": [...]},
plus optional sampling fields (the names of SamplingParams). A line that cannot be used becomes a
`LineError` naming the line and the problem; it never stops the other lines.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchllm.sampling_params import SamplingParams

PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")
SAMPLING_FIELDS = tuple(SamplingParams.field_names())


@dataclass
class BatchLine:
    line_number: int  # 1-based
    request_id: str
    prompt: Any  # a string, a list of token ids, or a list of chat messages
    is_chat: bool
    sampling_overrides: dict[str, Any]


@dataclass
class LineError:
    line_number: int
    request_id: str | None
    message: str

    def record(self) -> dict[str, Any]:
        return {"id": self.request_id, "error": {"line": self.line_number, "message": self.message}}


def read_batch_lines(path: Path) -> Iterator[BatchLine | LineError]:
    """Stream the file, yielding one BatchLine or LineError per non-blank line."""
    seen: set[str] = set()
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            yield parse_line(raw, line_number, seen)


def parse_line(raw: bytes, line_number: int, seen_ids: set[str]) -> BatchLine | LineError:
    def error(message: str, rid: str | None = None) -> LineError:
        return LineError(line_number, rid, f"line {line_number}: {message}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return error(f"not valid UTF-8 ({e.reason} at byte {e.start})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return error(f"malformed JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        return error("a line must be a JSON object")
    rid = obj.get("id")
    if rid is None:
        return error("missing 'id'")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return error("'id' must be a string or an integer")
    rid = str(rid)
    if rid in seen_ids:
        return error(f"duplicate id {rid!r}", rid)
    seen_ids.add(rid)
    given = [k for k in PROMPT_FIELDS if k in obj]
    if len(given) != 1:
        return error(f"needs exactly one of {', '.join(PROMPT_FIELDS)}", rid)
    unknown = sorted(set(obj) - {"id", *PROMPT_FIELDS, *SAMPLING_FIELDS})
    if unknown:
        return error(f"unsupported field(s): {', '.join(unknown)}", rid)
    kind = given[0]
    prompt = obj[kind]
    if kind == "prompt" and not isinstance(prompt, str):
        return error("'prompt' must be a string", rid)
    if kind == "prompt" and not prompt:
        return error("'prompt' is empty", rid)
    if kind == "messages" and (not isinstance(prompt, list) or not prompt):
        return error("'messages' must be a non-empty list", rid)
    if kind == "prompt_token_ids" and (not isinstance(prompt, list) or not prompt):
        return error("'prompt_token_ids' must be a non-empty list of integers", rid)
    overrides = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
    return BatchLine(line_number, rid, prompt, kind == "messages", overrides)


def result_record(request_id: str, output, prompt_tokens: int) -> dict[str, Any]:
    first = output.outputs[0]
    record: dict[str, Any] = {
        "id": request_id,
        "text": first.text,
        "token_ids": first.token_ids,
        "finish_reason": first.finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": output.num_output_tokens,
    }
    if first.logprobs is not None:
        record["logprobs"] = [
            {"token_id": tid, "logprob": lp_map[tid].logprob,
             "top": [{"token_id": t, "logprob": lp.logprob, "rank": lp.rank} for t, lp in lp_map.items()]}
            for tid, lp_map in zip(first.token_ids, first.logprobs)
        ]
    if len(output.outputs) > 1:
        record["outputs"] = [
            {"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason} for o in output.outputs
        ]
    return record
