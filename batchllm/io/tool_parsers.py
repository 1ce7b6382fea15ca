"""vLLM's tool-call parsers, for chat lines whose tool_choice is "auto" (`batchllm run --enable-auto-tool-choice
--tool-call-parser NAME`): a finished answer's text -> the calls the model wrote in its own syntax and the
message's content, as vLLM 0.26's non-streaming chat path reads them (its ToolParser.extract_tool_calls). Only whole
answers are read here (no streaming), so each parser is a function of the text. Imports nothing from the package.

Invariants (vLLM's): a parser never raises; an answer it cannot read whole (malformed JSON, a missing key, a name
that is not a string) is no call at all, its whole text the content. Each call is (name, arguments), the
arguments as vLLM's `json.dumps(value, ensure_ascii=False)` writes them, whatever JSON value the model gave.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, NamedTuple


class ParsedAnswer(NamedTuple):
    """What a tool parser read from an answer (vLLM's ExtractedToolCallInformation)."""

    calls: list[tuple[str, str]]
    """(function name, arguments as JSON text), in the answer's order; [] where no call was read."""
    content: str | None
    """The message's content: the whole text where no call was read, else what the parser leaves of it."""


_HERMES_START = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)", re.DOTALL)
"""vLLM's Hermes2ProToolParser.tool_call_regex: a closed <tool_call> block, or an unclosed one to the end."""


def _arguments(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _call(name: Any, arguments: Any) -> tuple[str, str]:
    """One call; ValueError where the name is not a string (vLLM's FunctionCall model refuses it)."""
    if not isinstance(name, str):
        raise ValueError(f"a tool call's name must be a string, got {type(name).__name__}")
    return name, _arguments(arguments)


def hermes(text: str) -> ParsedAnswer:
    """Hermes 2 Pro, Qwen2.5, Qwen3 (vLLM's `hermes`): each `<tool_call>{"name": ..., "arguments": ...}</tool_call>`
    (the last may be unclosed) is a call; the content is the text before the first `<tool_call>` (None where
    empty). Any block that is not such a JSON object makes the whole answer content, with no call."""
    if _HERMES_START not in text:
        return ParsedAnswer([], text)
    try:
        objects = [json.loads(closed or unclosed) for closed, unclosed in _HERMES_CALL.findall(text)]
        calls = [_call(obj["name"], obj["arguments"]) for obj in objects]
    except Exception:  # noqa: BLE001 - vLLM's: any failure reads the answer as text
        return ParsedAnswer([], text)
    return ParsedAnswer(calls, text[:text.find(_HERMES_START)] or None)


_JSON = json.JSONDecoder()


def llama3_json(text: str) -> ParsedAnswer:
    """Llama 3.1-3.3 and 4 JSON calls (vLLM's `llama3_json`, `llama4_json`): every JSON object in the text, from
    each `{` not inside an object read before (so `<|python_tag|>` and `;` between objects are skipped, as is any
    other text), is a call {"name": ..., "arguments" (else "parameters"): ...}; the content is None where a call was
    read. A `{` that starts no JSON object, or an object without those keys, makes the whole answer content."""
    if "<|python_tag|>" not in text and "{" not in text:
        return ParsedAnswer([], text)
    calls, end = [], -1
    for start in (i for i, char in enumerate(text) if char == "{"):
        if start <= end:
            continue
        try:
            obj, length = _JSON.raw_decode(text[start:])
            end = start + length
            calls.append(_call(obj["name"], obj["arguments"] if "arguments" in obj else obj["parameters"]))
        except Exception:  # noqa: BLE001 - vLLM's: any failure reads the answer as text
            return ParsedAnswer([], text)
    return ParsedAnswer(calls, None) if calls else ParsedAnswer([], text)


TOOL_PARSERS: dict[str, Callable[[str], ParsedAnswer]] = {
    "hermes": hermes, "llama3_json": llama3_json, "llama4_json": llama3_json}
"""vLLM's --tool-call-parser names served here -> answer text -> ParsedAnswer."""

NEEDED_TOKENS = {"llama3_json": "<|python_tag|>", "llama4_json": "<|python_tag|>"}
"""A token a parser needs in the tokenizer's vocabulary, as vLLM's parser refuses to start without it."""

SKIPS_NO_SPECIAL_TOKENS = ("hermes",)
"""Parsers whose adjust_request sets a tool line's skip_special_tokens false (vLLM's hermes: its <tool_call> tags
are special tokens in some models, and would be dropped from the text before the parser reads it)."""


def tool_parser_named(name: str) -> Callable[[str], ParsedAnswer]:
    """The parser of that name; ValueError naming the ones served for another."""
    if name not in TOOL_PARSERS:
        raise ValueError(f"--tool-call-parser {name!r} is not supported with --enable-auto-tool-choice (supported: "
                         f"{', '.join(TOOL_PARSERS)})")
    return TOOL_PARSERS[name]


def check_tokenizer(name: str | None, vocab: dict[str, int]) -> None:
    """ValueError where parser `name` needs a token the tokenizer's `vocab` lacks (`NEEDED_TOKENS`): vLLM 0.26's
    server builds the parser for every chat request, and its constructor raises there, so every chat request fails;
    here the job is refused before anything is written."""
    if (token := NEEDED_TOKENS.get(name or "")) is not None and token not in vocab:
        raise ValueError(f"--tool-call-parser {name}: the tokenizer has no {token} token (as vLLM's parser, it "
                         "needs it); this model does not write Llama 3 JSON tool calls")
