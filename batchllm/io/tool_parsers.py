"""vLLM's tool-call parsers, for chat lines whose tool_choice is "auto" (`batchllm run --enable-auto-tool-choice
--tool-call-parser NAME`): a finished answer's text -> the calls the model wrote in its own syntax and the
message's content, as vLLM 0.26's non-streaming chat path reads them (its ToolParser.extract_tool_calls). Only whole
answers are read here (no streaming), so each parser is a function of the text. Imports nothing from the package.

Invariants (vLLM's): a parser never raises, but for the answers vLLM's mistral parser raises on (ToolParserError:
its request fails there, so the line fails here); an answer it cannot read whole (malformed JSON, a missing key, a
name that is not a string, a Python argument that is no literal) is no call at all, its whole text the content.
Each call is (name, arguments), the arguments as vLLM's `json.dumps(value, ensure_ascii=False)` writes them,
whatever JSON value the model gave (mistral's tokenizer-v11 calls: the arguments' text as written).
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import regex


class ParsedAnswer(NamedTuple):
    """What a tool parser read from an answer (vLLM's ExtractedToolCallInformation)."""

    calls: list[tuple[str, str]]
    """(function name, arguments as JSON text), in the answer's order; [] where no call was read."""
    content: str | None
    """The message's content: the whole text where no call was read, else what the parser leaves of it."""
    tools_called: bool | None = None
    """vLLM's tools_called where it differs from "calls were read" (mistral's: a [TOOL_CALLS] answer whose calls
    are all empty, which leaves the content the parser cut); None: `bool(calls)`."""


class ToolParserError(ValueError):
    """An answer vLLM 0.26's parser raises on (mistral's, below): vLLM's request fails (run-batch writes an error
    line), so the line fails here."""


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
    each `{` past the end of the object read before (so `<|python_tag|>` and `;` between objects are skipped, as is
    any other text), is a call {"name": ..., "arguments" (else "parameters"): ...}; the content is None where a call
    was read. A `{` that starts no JSON object, or an object without those keys, makes the whole answer content. As
    in vLLM 0.26, a `{` right at that end is skipped too, so `{..}{..}` is read from the second object's first inner
    `{` on: content, unless that inner object is itself a call."""
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


_PYTHONIC_CALLS = regex.compile(
    r"\[([a-zA-Z]+\w*\(([a-zA-Z]+\w*=.*,\s*)*([a-zA-Z]+\w*=.*\s)?\),\s*)*"
    r"([a-zA-Z]+\w*\(([a-zA-Z]+\w*=.*,\s*)*([a-zA-Z]+\w*=.*\s*)?\)\s*)+\]", regex.DOTALL)
"""vLLM's PythonicToolParser.TOOL_CALL_REGEX: matched at the answer's start (not to its end), it decides whether
the answer is read as a list of calls at all (so `[f(1)]`, no keyword, is text, and so is ` [f()]`)."""
_PYTHONIC_TIMEOUT_S = 1
"""vLLM's VLLM_TOOL_PARSE_REGEX_TIMEOUT_SECONDS default: a match that takes longer (the regex backtracks
exponentially on some answers) reads the answer as text, as vLLM's does, instead of hanging the job."""
_JSON_NAMES = {"null": None, "true": True, "false": False}
"""Bare names vLLM's get_parameter_value reads as JSON literals (models write them for None, True, False)."""


class _NotALiteral(ValueError):
    """A pythonic call that vLLM's handle_single_tool refuses (its UnexpectedAstError)."""


def pythonic(text: str) -> ParsedAnswer:
    """Llama 3.2, Llama 4, ToolACE (vLLM's `pythonic`): an answer that starts as `[f(a=1, b="x"), g()]`
    (`_PYTHONIC_CALLS`) and whose first Python statement is a list of calls is those calls (dotted names kept,
    keyword arguments only: positional ones are dropped, as vLLM's); the content is None. Arguments are literals
    (`_literal`): a call with any other value (`-1`, `x`, `(1, 2)`, `f()`), Python that does not parse, or a value
    json.dumps refuses (bytes, `...`) makes the whole answer content."""
    try:
        if _PYTHONIC_CALLS.match(text, timeout=_PYTHONIC_TIMEOUT_S) is None:
            return ParsedAnswer([], text)
    except TimeoutError:
        return ParsedAnswer([], text)
    try:
        with warnings.catch_warnings():  # (SyntaxWarning for an invalid escape in a string: the value stands)
            warnings.simplefilter("ignore", SyntaxWarning)
            module = ast.parse(text)
        listed = getattr(module.body[0], "value", None)
        if not isinstance(listed, ast.List) or not all(isinstance(e, ast.Call) for e in listed.elts):
            raise _NotALiteral("not a list of calls")
        calls = [_pythonic_call(call) for call in listed.elts]
    except Exception:  # noqa: BLE001 - vLLM's: any failure reads the answer as text
        return ParsedAnswer([], text)
    return ParsedAnswer(calls, None)


def llama4_pythonic(text: str) -> ParsedAnswer:
    """Llama 4 (vLLM's `llama4_pythonic`): `pythonic`, after an answer that starts with `<|python_start|>` loses
    it and every `<|python_end|>`. Where no call is read the message's content is the answer as written, tags
    included (`tool_calls.message_calls`, as vLLM keeps the original text where no tools were called)."""
    if text.startswith("<|python_start|>"):
        text = text[len("<|python_start|>"):].replace("<|python_end|>", "")
    return pythonic(text)


def _pythonic_call(call: ast.Call) -> tuple[str, str]:
    """(name, arguments) of one call: `f` or a dotted `a.b.f` (anything else raises _NotALiteral), its keyword
    arguments as a JSON object (a `**x` argument under the key null, as vLLM's json.dumps writes a None key)."""
    names, func = [], call.func
    while isinstance(func, ast.Attribute):
        names.append(func.attr)
        func = func.value
    if not isinstance(func, ast.Name):
        raise _NotALiteral("a call's name must be a name or a dotted name")
    arguments = {keyword.arg: _literal(keyword.value) for keyword in call.keywords}
    return ".".join([func.id, *reversed(names)]), _arguments(arguments)


def _literal(node: ast.expr) -> Any:
    """vLLM's get_parameter_value: a constant, a list or a dict (constant keys) of literals, or null/true/false
    written as names; anything else raises _NotALiteral."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Dict):
        if not all(isinstance(key, ast.Constant) for key in node.keys):
            raise _NotALiteral("a dict argument's keys must be literals")
        return {key.value: _literal(value) for key, value in zip(node.keys, node.values)}  # type: ignore[union-attr]
    if isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise _NotALiteral(f"a tool call's arguments must be literals, got {type(node).__name__}")


_TOOL_CALLS = "[TOOL_CALLS]"
_JSON_LIST = re.compile(r"\[{.*}\]", re.DOTALL)
"""vLLM's MistralToolParser.tool_call_regex: the pre-v11 fallback, from the first `[{` to the last `}]`."""


_UNREAD = object()


def _mistral_json(written: str) -> Any:
    """The first JSON value of `written` (trailing text ignored), else its first `[{...}]`; `_UNREAD` where neither
    is JSON. RecursionError where the value nests past Python's stack."""
    try:
        return _JSON.raw_decode(written)[0]
    except json.JSONDecodeError:
        try:
            return json.loads(_JSON_LIST.findall(written)[0])
        except (IndexError, json.JSONDecodeError):
            return _UNREAD


def mistral(text: str) -> ParsedAnswer:
    """Mistral with a Hugging Face tokenizer whose vocabulary has no [ARGS] (vLLM's `mistral`, pre-v11: Mistral 7B
    v0.3, Mixtral): `content[TOOL_CALLS] [{"name": ..., "arguments": ...}, ...]`. The first JSON value after the
    token (trailing text ignored), else the first `[{...}]` in it, is the list of calls ("arguments" {} where
    absent); the content is the text before the token (None where blank). No token: all content. Where neither is
    JSON, all content. Raises ToolParserError where vLLM's raises: a second token, a value that is no list of
    objects with a string "name"."""
    if _TOOL_CALLS not in text:
        return ParsedAnswer([], text)
    content, *raw_calls = text.split(_TOOL_CALLS)
    if len(raw_calls) != 1:
        raise ToolParserError(f"the mistral tool parser reads one {_TOOL_CALLS} token, the answer has "
                              f"{len(raw_calls)} (vLLM's raises on it)")
    try:
        objects = _mistral_json(raw_calls[0].strip())
    except RecursionError as e:  # (nesting past Python's stack: vLLM's request fails on it, not the job)
        raise ToolParserError(f"the mistral tool parser cannot read the calls after {_TOOL_CALLS}: they nest too "
                              "deep (vLLM's raises on it)") from e
    if objects is _UNREAD:
        return ParsedAnswer([], text)
    try:
        calls = [_call(obj["name"], obj.get("arguments", {})) for obj in objects]
    except Exception as e:  # (KeyError, TypeError, a name that is no string: vLLM's raises)
        raise ToolParserError(f"the mistral tool parser cannot read the calls after {_TOOL_CALLS} "
                              f"({type(e).__name__}: {e}; vLLM's raises on it)") from e
    return ParsedAnswer(calls, content if content.strip() else None, tools_called=True)


def mistral_v11(text: str) -> ParsedAnswer:
    """Mistral with a Hugging Face tokenizer whose vocabulary has [ARGS] (vLLM's `mistral`, v11 and later:
    Mistral Small 3.2, Magistral, Devstral): `content[TOOL_CALLS]name[ARGS]{args}[TOOL_CALLS]...`. Each part after a
    token that holds a `{` is a call: the name before its first `{` (every [ARGS] dropped), the arguments the rest of
    the part as written (not read as JSON: vLLM keeps a malformed call as a call); parts without `{` are dropped.
    The content is the text before the first token (None where blank), calls or not. Never raises."""
    if _TOOL_CALLS not in text:
        return ParsedAnswer([], text)
    content, *raw_calls = text.split(_TOOL_CALLS)
    calls = [(raw[:raw.find("{")].replace("[ARGS]", ""), raw[raw.find("{"):]) for raw in raw_calls if "{" in raw]
    return ParsedAnswer(calls, content if content.strip() else None, tools_called=True)


TOOL_PARSERS: dict[str, Callable[[str], ParsedAnswer]] = {
    "hermes": hermes, "llama3_json": llama3_json, "llama4_json": llama3_json, "pythonic": pythonic,
    "llama4_pythonic": llama4_pythonic, "mistral": mistral}
"""vLLM's --tool-call-parser names served here -> answer text -> ParsedAnswer (mistral: as read for a tokenizer
without [ARGS]; `reader_for` picks the reader a tokenizer needs)."""

_READERS = {**TOOL_PARSERS, "mistral_v11": mistral_v11}
"""Every reader by key: the served names', and those `reader_for` picks by the tokenizer (not names one can give)."""

NEEDED_TOKENS = {"llama3_json": ("<|python_tag|>", "Llama 3 JSON"), "llama4_json": ("<|python_tag|>", "Llama 3 JSON"),
                 "mistral": (_TOOL_CALLS, "Mistral")}
"""A token a parser needs in the tokenizer's vocabulary, as vLLM's parser refuses to start without it, and the
syntax a model without it does not write: (token, syntax)."""

SKIPS_NO_SPECIAL_TOKENS = ("hermes", "mistral")
"""Parsers whose adjust_request sets a tool line's skip_special_tokens false (vLLM's hermes, and mistral's for a
Hugging Face tokenizer: their <tool_call> and [TOOL_CALLS] tags are special tokens, and would be dropped from the
text before the parser reads it)."""

NINE_CHARACTER_IDS = ("mistral",)
"""Parsers whose job's tool calls (its "auto" ones, and its forced ones too: vLLM's MistralParser gives those the
same) have Mistral's ids, 9 random letters and digits (MistralToolCall.generate_random_id), not "chatcmpl-tool-"."""


def reader_for(name: str | None, vocab: dict[str, int]) -> str | None:
    """The key of the reader (`tool_parser_named`) that parser `name` reads a tokenizer's answers with: vLLM's
    mistral reads v11's `[TOOL_CALLS]name[ARGS]{...}` where the vocabulary has [ARGS] (its _is_pre_v11_tokeniser
    for a Hugging Face tokenizer) -> "mistral_v11"; any other name (None too) is its own reader."""
    if name == "mistral" and "[ARGS]" in vocab:
        return "mistral_v11"
    return name


def tool_parser_named(name: str) -> Callable[[str], ParsedAnswer]:
    """The reader of that parser name or reader key (`reader_for`); ValueError naming the served parsers for
    another."""
    if name not in _READERS:
        raise ValueError(f"--tool-call-parser {name!r} is not supported with --enable-auto-tool-choice (supported: "
                         f"{', '.join(TOOL_PARSERS)})")
    return _READERS[name]


def check_tokenizer(name: str | None, vocab: dict[str, int]) -> None:
    """ValueError where parser `name` needs a token the tokenizer's `vocab` lacks (`NEEDED_TOKENS`): vLLM 0.26's
    server builds the parser for every chat request, and its constructor raises there, so every chat request fails;
    here the job is refused before anything is written."""
    token, syntax = NEEDED_TOKENS.get(name or "", (None, None))
    if token is not None and token not in vocab:
        raise ValueError(f"--tool-call-parser {name}: the tokenizer has no {token} token (as vLLM's parser, it "
                         f"needs it); this model does not write {syntax} tool calls")
