"""JSONL batch files: one request per line, one result per line, in two formats.

Plain: {"id": ..., "prompt": "..."} | {"id": ..., "messages": [...]} | {"id": ..., "prompt_token_ids": [...]},
plus optional sampling fields (the names of SamplingParams).
OpenAI Batch: {"custom_id": ..., "method": "POST", "url": ..., "body": {...}} (`openai_batch.py`).
The format is told per line (a "custom_id", "url" or "body" means OpenAI) and the output record follows it. A line
that cannot be used becomes a `LineError` naming the line and the problem; it never stops the others.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchllm.io import openai_batch
from batchllm.io.tool_calls import (
    AutoToolChoice,
    ForcedToolCall,
    finish_reason_of,
    forced_tool_call,
    message_calls,
    tool_constraint,
)
from batchllm.sampling_params import (
    TRUNCATION_SIDE_NOTE,
    TRUNCATION_SIDES,
    VLLM_ONLY_FIELDS,
    SamplingParams,
    among,
    in_field_terms,
    integers_from_json,
    short_repr,
)

PROMPT_FIELDS = ("prompt", "messages", "prompt_token_ids")
SAMPLING_FIELDS = tuple(SamplingParams.field_names())
PLAIN_FIELDS = ("id", *PROMPT_FIELDS, *SAMPLING_FIELDS, "chat_template_kwargs", "tools", "documents", "tool_choice",
                "parallel_tool_calls", "add_special_tokens")
"""The fields a plain line's request is read from; others are ignored, save a mistaken one (`_mistaken_field`)."""
_PLAIN_FIELD_SET = frozenset(PLAIN_FIELDS)  # (built once: every plain line is checked against it)
_NEAR_MISS_TARGETS = (*SAMPLING_FIELDS, "chat_template_kwargs")


PLAIN, OPENAI = "plain", "openai"
UTF8_BOM = b"\xef\xbb\xbf"
"""Windows editors (Notepad, Excel's "CSV UTF-8") start a UTF-8 file with it; it is skipped at the
start of the file, as Python's utf-8-sig codec does, and at the start of any other line: files such editors
saved, joined with `cat`, hold one where each began."""
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""Valid UTF-8 holds no surrogates, so JSON text can only smuggle one in as an escape; a line without
such an escape skips the search for lone ones."""
_NO_OVERRIDES: dict[str, Any] = {}  # shared by every line without sampling fields; never mutated


@dataclass(slots=True)  # a million of these may be alive at once
class BatchLine:
    line_number: int  # 1-based
    request_id: str | int
    """The line's id as its JSON gives it (a plain line's may be an integer; an OpenAI custom_id is a string)."""
    prompt: Any  # a string, a list of token ids, a list of chat messages, or {"prompt_token_ids", "prompt"}
    is_chat: bool
    sampling_overrides: dict[str, Any]
    format: str = PLAIN
    url: str | None = None
    """OpenAI lines: the endpoint, which decides the response body's shape."""
    model: str | None = None
    """OpenAI lines: the body's model name, echoed in the response."""
    chat_template_kwargs: dict[str, Any] | None = None
    """Chat lines: extra keywords of the chat template (vLLM's `chat_template_kwargs`)."""
    ignored_fields: tuple[str, ...] = ()
    """Fields that are no request field, nor a near miss of one (a plain line's: a table's other columns, written
    with it; an OpenAI line's: keys beside custom_id, method, url and body), ignored as vLLM's server and
    run-batch ignore unknown fields."""
    continued_role: str | None = None
    """OpenAI chat lines whose body's own add_generation_prompt is false: the last message's role, which the answer
    continues and takes (vLLM's rule reads that field, not chat_template_kwargs). Kept apart from the messages,
    which ingest drops once tokenized."""
    echo: str | None = None
    """OpenAI completions lines: the body's `echo` (`openai_batch.BodyRequest.echo`)."""
    response_asks: openai_batch.ResponseAsks | None = None
    """OpenAI lines: what the body asks of its response beside the answer (`openai_batch.response_asks`)."""
    add_special_tokens: bool | None = None
    """Whether a text (or rendered chat) is tokenized with the tokenizer's special tokens, as LLM.generate's
    tokenization_kwargs asks (a plain line's field, an OpenAI body's); None where not given
    (`PromptProcessor._adds_special_tokens`)."""
    tool_call: ForcedToolCall | AutoToolChoice | None = None
    """Chat lines whose tool_choice forces a call ("required" or a named function, `io.tool_calls`): the answer,
    constrained by its sampling_overrides' structured_outputs, is read back as tool calls in its record. Lines
    whose tool_choice is "auto" (`AutoToolChoice`): a text answer that the job's tool-call parser reads, where the
    job serves "auto" (`tool_calls.served_tool_choice`: the line fails where it does not)."""
    tool_choice_none: bool = False
    """Chat lines whose tool_choice is "none" (as given: not null, not absent): their tools reach the chat template
    unless the job excludes them (vLLM's --exclude-tools-when-tool-choice-none: `line_template_kwargs`)."""


def line_template_kwargs(line: BatchLine, defaults: dict[str, Any] | None, exclude_tools_when_none: bool = False
                         ) -> dict[str, Any] | None:
    """A chat line's keywords for its chat template: its own over the job's `defaults`
    (`openai_batch.with_template_defaults`), without its `tools` where its tool_choice is "none" and the job says
    `exclude_tools_when_none` (vLLM's --exclude-tools-when-tool-choice-none: the template never sees them, so the
    prompt is that of the line without tools; its documents stay). Neither the line's dict nor `defaults` is
    changed."""
    kwargs = openai_batch.with_template_defaults(defaults, line.chat_template_kwargs, line.format == OPENAI)
    if exclude_tools_when_none and line.tool_choice_none and kwargs and "tools" in kwargs:
        kwargs = {k: v for k, v in kwargs.items() if k != "tools"} or None
    return kwargs


def without_its_index(text: str, index: int) -> str:
    """A prompt-side error (`PromptProcessor`'s, which names a conversation or prompt by `index`) as said of one
    line or row that is already named: "prompt 7 has ..." -> "the prompt has ..."."""
    for own, said in ((f"conversation {index}: ", ""), (f"prompt {index}: ", ""), (f"prompt {index} ", "the prompt ")):
        if text.startswith(own):
            return said + text[len(own):]
    return text


@dataclass
class LineError:
    line_number: int
    request_id: str | int | None
    message: str
    format: str | None = None
    """PLAIN or OPENAI; None when the line was not even JSON (the file's format is used)."""
    code: str = "invalid_request"
    """An OpenAI error record's code: OpenAI's "context_length_exceeded" for a line the context cannot hold, else
    "invalid_request"."""

    @classmethod
    def for_line(cls, line: BatchLine, problem: object, code: str | None = None) -> LineError:
        """An error found after parsing (sampling values, chat template, tokenisation). The prompt side
        names a conversation or prompt by the index it was given, here the line number: said once. `code`: the
        record's (None: the problem's own `code` where it has one, as `inputs.ContextLengthError` does)."""
        text = without_its_index(str(problem), line.line_number)
        code = code or getattr(problem, "code", None) or cls.code
        return cls(line.line_number, line.request_id, f"line {line.line_number}: {text}", line.format, code)

    def is_openai(self, file_format: str = PLAIN) -> bool:
        """Whether its record is an OpenAI Batch error (which goes to the errors file)."""
        return (self.format or file_format) == OPENAI

    def record(self, file_format: str = PLAIN) -> dict[str, Any]:
        if self.is_openai(file_format):
            return openai_batch.error_record(self.request_id, self.message, self.code)
        return {"id": self.request_id, "error": {"line": self.line_number, "message": self.message}}


def read_batch_lines(path: Path, digest=None) -> Iterator[BatchLine | LineError]:
    """Stream the file, yielding one BatchLine or LineError per non-blank line. Ids are not checked here: an id goes
    to the first line that is accepted (`ingest.IdClaims`), which only the caller knows. `digest` (a hashlib object):
    updated with every byte read, blank lines included."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if digest is not None:
                digest.update(raw)
            raw = without_bom(raw)
            if not raw.strip():
                continue
            yield parse_line(raw, line_number)


def without_bom(raw: bytes) -> bytes:
    """The line without a byte-order mark opening it (`UTF8_BOM`), on any line: the first, or one where a file
    joined to others began. A BOM anywhere but at a line's start stays, and is the line's JSON error."""
    return raw[len(UTF8_BOM):] if raw.startswith(UTF8_BOM) else raw


def parse_line(raw: bytes, line_number: int) -> BatchLine | LineError:
    """One line's request or its LineError. Never raises: whatever the bytes, the job goes on. Ids are not compared
    across lines here: the first line accepted takes its id (`ingest.IdClaims`), as `run` and `run --ray` read."""
    raw = without_bom(raw)
    try:
        return _parse_line(raw, line_number)
    except Exception as e:  # a case the checks below missed must still cost only this line
        rid, line_format = _id_and_format_of(raw)
        return LineError(line_number, rid, f"line {line_number}: cannot be read ({type(e).__name__}: "
                                           f"{short_repr(str(e))})", line_format)


def duplicate_id(rid: str | int, line_format: str, taken_by: int | None = None) -> str:
    """The problem of a line whose id (an OpenAI line's custom_id) another line has (`taken_by`: that line's number,
    where known)."""
    by = f" (line {taken_by} has it)" if taken_by is not None else ""
    return f"duplicate {'custom_id' if line_format == OPENAI else 'id'} {short_repr(rid)}{by}"


def _id_and_format_of(raw: bytes) -> tuple[str | int | None, str | None]:
    """A line's id (custom_id for an OpenAI line) and format where it is a JSON object, so that an error
    record can still be matched to it; (None, None) where it cannot be told."""
    try:
        rid, openai = _echoed_id(json.loads(raw))
        return rid, OPENAI if openai else PLAIN
    except Exception:  # noqa: BLE001 - nothing more to tell about this line
        return None, None


_ID_VALUE = re.compile(rb'\s*:\s*("(?:[^"\\\x00-\x1f\x80-\xff]|\\.)*"|-?\d{1,18})\s*[,}]')
"""After a key: a JSON string of ASCII or an integer, ended by a comma or the object's end (so that a value the
line's cut left unfinished, "12" of 12345, is not taken)."""


def _top_level_ids(raw: bytes) -> dict[str, bytes]:
    """The values of the line object's own "custom_id" and "id" keys (not those of nested objects: a tool call's
    id) as their JSON text, where bytes that are not JSON still show them whole."""
    found: dict[str, bytes] = {}
    depth, i = 0, 0
    while i < len(raw):
        byte = raw[i]
        if byte == 0x22:  # a string: skip it, and at depth 1 see whether it is one of the two keys
            end = i + 1
            while end < len(raw) and raw[end] != 0x22:
                end += 2 if raw[end] == 0x5C else 1
            key = raw[i + 1:end]
            if depth == 1 and key in (b"custom_id", b"id") and (match := _ID_VALUE.match(raw, end + 1)):
                found.setdefault(key.decode(), match.group(1))
            i = end + 1
            continue
        depth += 1 if byte in b"{[" else -1 if byte in b"}]" else 0
        i += 1
    return found


def _unreadable(raw: bytes, line_number: int, problem: str) -> LineError:
    """The error of a line that is not a JSON object of UTF-8 text, echoing its custom_id (an OpenAI line) or id
    where the bytes still show one whole (`_top_level_ids`): a truncated or mis-encoded line keeps its id."""
    found = _top_level_ids(raw)
    key = "custom_id" if "custom_id" in found else "id"
    try:
        rid = _clean_id(json.loads(found[key])) if key in found else None
    except ValueError:  # a bad escape inside the string ("\uZZ")
        rid = None
    return LineError(line_number, rid, f"line {line_number}: {problem}",
                     OPENAI if key == "custom_id" and rid is not None else None)


def _echoed_id(obj: dict) -> tuple[str | int | None, bool]:
    """(the id an error record of this line object can echo: custom_id for an OpenAI line, else id; whether it
    is an OpenAI line), for lines refused before their id is checked."""
    openai = _is_openai_line(obj)
    return _clean_id(obj.get("custom_id") if openai else obj.get("id")), openai


def _json_object(raw: bytes, line_number: int) -> Any:
    """The JSON value of one line (without its line end: a line cut inside a string is "unterminated", not
    a newline "control character"), or the LineError of a line that is not JSON text."""
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as e:
        return _unreadable(raw, line_number, f"not valid UTF-8 ({e.reason} at byte {e.start + 1} of the line)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:  # (some messages end in "at": "Invalid control character at")
        return _unreadable(raw, line_number, f"malformed JSON: {e.msg.removesuffix(' at')} at column {e.pos + 1}")
    except RecursionError:
        return _unreadable(raw, line_number, "malformed JSON: nested too deeply")
    except ValueError as e:  # an integer literal past Python's digit limit
        return _unreadable(raw, line_number, f"malformed JSON: {str(e).split(';')[0]}")


def _parse_line(raw: bytes, line_number: int) -> BatchLine | LineError:
    fmt = None  # (the file's format, until the line shows its own)

    def error(message: str, rid: str | int | None = None) -> LineError:
        return LineError(line_number, rid, f"line {line_number}: {message}", fmt)

    obj = _json_object(raw, line_number)
    if isinstance(obj, LineError):  # (its echoed id is not taken: outputs resumed from before would answer twice)
        return obj
    if not isinstance(obj, dict):
        return error("a line must be a JSON object")
    openai = _is_openai_line(obj)
    if not openai and any(k in obj for k in PROMPT_FIELDS):  # a plain line by its prompt: its error stays in the
        fmt = PLAIN  # output (one without a prompt field, say an OpenAI line missing its custom_id, takes the file's)
    if _SURROGATE_ESCAPE.search(raw) and (where := _lone_surrogate(obj)):
        rid, _ = _echoed_id(obj)
        return LineError(line_number, rid, f"line {line_number}: {where} holds a lone surrogate "
                                           "(an unpaired \\ud800-\\udfff escape), which is not valid Unicode",
                         OPENAI if openai else fmt)
    if openai:
        return _parse_openai_line(obj, line_number)
    rid = obj.get("id")
    if rid is None:
        return error("missing 'id'")
    if type(rid) is float and rid.is_integer():  # pandas writes an integer id column with gaps so: 1000.0
        rid = int(rid)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return error(f"'id' must be a string or an integer, got {short_repr(rid)}")
    unknown = sorted(obj.keys() - _PLAIN_FIELD_SET - {"truncation_side"})
    try:
        kind, prompt, template, add_special = _plain_request(obj, unknown)
        overrides, forced = _plain_tool_call(obj, _overrides(obj))
    except ValueError as e:  # (BodyError and ToolChoiceError are ones; the line's fields are named as it gives them)
        return error(in_field_terms(e), rid)
    ignored = tuple(name for name in unknown  # (their values asking for none, or for what runs here: taken)
                    if name not in _DECODING_MODES and name not in VLLM_ONLY_FIELDS and name not in _OTHER_INPUTS)
    return BatchLine(line_number, rid, prompt, kind == "messages", overrides, chat_template_kwargs=template,
                     ignored_fields=ignored, add_special_tokens=add_special, tool_call=forced,
                     tool_choice_none=kind == "messages" and obj.get("tool_choice") == "none")


def _plain_request(obj: dict, unknown: list[str]) -> tuple[str, Any, dict | None, bool | None]:
    """A plain line's prompt field (`prompt_kind`), its prompt (text, messages, token ids, or token ids with their
    text as LLM.generate takes them), its chat template's keywords and its add_special_tokens, checked; raises
    ValueError naming the first problem, in the order a line is read: prompt fields, truncation_side, mistaken
    fields (of `unknown`, its fields that are not a plain line's), add_special_tokens, the prompt's value, the
    template's keywords."""
    kind = prompt_kind(obj, [k for k in PROMPT_FIELDS if obj.get(k) is not None])  # (null: not given, as in rows)
    if obj.get("truncation_side") not in TRUNCATION_SIDES:  # (vLLM's; a table's column of this name is unlikely)
        raise ValueError(f"truncation_side {short_repr(obj['truncation_side'])} is not supported: "
                         f"{TRUNCATION_SIDE_NOTE}")
    if mistaken := [f"{name!r} ({hint})" for name in unknown
                    if (hint := _mistaken_field(name) or _misplaced_constraint(name, obj[name])
                        or _other_decoding(name, obj[name]) or _vllm_only(name, obj[name])
                        or other_input(name, obj[name]))]:
        raise ValueError(f"unsupported field(s): {', '.join(mistaken)}")
    add_special = add_special_tokens_of(obj)
    prompt = obj[kind]
    if kind == "prompt" and not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    if kind == "messages" and (not isinstance(prompt, list) or not prompt):
        from batchllm.inputs import messages_problem  # (LLM.chat's words; inputs is heavy to import)

        raise ValueError(messages_problem(prompt))
    if kind == "prompt_token_ids" and (not isinstance(prompt, list) or not prompt):
        raise ValueError("'prompt_token_ids' must be a non-empty list of integers")
    if obj.get("prompt") is not None and kind == "prompt_token_ids":
        prompt = {"prompt_token_ids": prompt, "prompt": obj["prompt"]}  # (as LLM.generate takes it)
    template = _plain_template_kwargs(obj)
    if template is not None and kind != "messages":
        raise ValueError("'chat_template_kwargs', 'tools' and 'documents' need 'messages'")
    return kind, prompt, template, add_special


def prompt_kind(obj: dict, given: list[str]) -> str:
    """The field of PROMPT_FIELDS that a request's prompt is read from, of `given` (those it has, not null: a plain
    line's fields, a Ray row's columns; a table written with gaps holds nulls where a row has no value): exactly
    one, or "prompt_token_ids" with its "prompt" text beside it, as vLLM's TokensPrompt (and LLM.generate) take it:
    the ids are the prompt, the text is not tokenized. Raises ValueError naming the problem otherwise (the one rule
    for lines and rows)."""
    if given == ["prompt", "prompt_token_ids"]:  # (PROMPT_FIELDS' order)
        if not isinstance(obj["prompt"], str):
            raise ValueError("'prompt' beside 'prompt_token_ids' must be a string (the ids' text)")
        return "prompt_token_ids"
    if len(given) != 1:
        openai = (" (an OpenAI Batch line names its request by 'custom_id', not 'id')"
                  if not given and isinstance(obj.get("body"), dict) else "")
        raise ValueError(f"needs exactly one of {', '.join(PROMPT_FIELDS)} (or 'prompt_token_ids' with its 'prompt' "
                         f"text){openai}")
    return given[0]


def add_special_tokens_of(obj: dict) -> bool | None:
    """A request's "add_special_tokens" (a plain line's field, a Ray row's column): true or false tokenizes its
    text or rendered chat with or without the tokenizer's special tokens, as LLM.generate's tokenization_kwargs
    does; None where not given (`PromptProcessor._adds_special_tokens` decides). Raises ValueError for another
    value (vLLM's field is a bool)."""
    value = obj.get("add_special_tokens")
    if not isinstance(value, (bool, type(None))):
        raise ValueError(f"'add_special_tokens' must be true or false, got {short_repr(value)}")
    return value


def _plain_template_kwargs(obj: dict) -> dict | None:
    """A plain line's keywords for its chat template: its chat_template_kwargs, under its `tools` and `documents`
    (given to the template as LLM.chat's are, as vLLM gives a body's), whatever its tool_choice
    (`_plain_tool_call` reads it). `tools: []` is refused, as in an OpenAI body (`openai_batch.no_empty_tools`)."""
    template = openai_batch.template_kwargs(obj.get("chat_template_kwargs"))
    openai_batch.no_empty_tools(obj)
    for name in ("documents", "tools"):
        if obj.get(name) not in (None, []):
            template = {name: openai_batch.list_of_objects(obj[name], name), **(template or {})}
    return template


def _plain_tool_call(obj: dict, overrides: dict[str, Any]
                     ) -> tuple[dict[str, Any], ForcedToolCall | AutoToolChoice | None]:
    """A plain messages line's sampling overrides and tool call (`io.tool_calls`): its `tool_choice` "required" or a
    named function constrains the answer (structured_outputs, as an OpenAI body's) and reads it back as tool calls
    (`parallel_tool_calls` false: the first only, as an OpenAI body's); "auto" is a text answer the job's tool-call
    parser reads, as an OpenAI body's (`AutoToolChoice`); without a tool_choice, or "none" or null, the tools only
    reach the template and the answer is text (as LLM.chat's tools). Raises ValueError naming the problem (a
    function not among the tools, a parallel_tool_calls not true or false, ...)."""
    parallel = obj.get("parallel_tool_calls")
    if not isinstance(parallel, (bool, type(None))):  # (an OpenAI body's is checked as a field of its own)
        raise ValueError(f"'parallel_tool_calls' must be true or false, got {short_repr(parallel)}")
    if obj.get("tool_choice") in (None, "none"):
        return overrides, None
    tools = openai_batch.tools_for_template(obj["tools"]) if obj.get("tools") is not None else None
    forced = forced_tool_call(tools, obj["tool_choice"], parallel)  # (not None: raises for one that forces nothing)
    if isinstance(forced, AutoToolChoice):
        return overrides, forced
    constraint, forced = tool_constraint(forced, tools, obj.get("structured_outputs"))
    return {**overrides, "structured_outputs": constraint}, forced


def _is_openai_line(obj: dict) -> bool:
    """An OpenAI Batch line: it has a custom_id, or a body (an object) and no plain line's id. A plain line
    may carry a table's `url` or `body` column, which it ignores."""
    return "custom_id" in obj or (isinstance(obj.get("body"), dict) and "id" not in obj)


_OTHER_NAMES = {"max_new_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "top_logprobs": "logprobs",
                "response_format": "structured_outputs", "stop_sequences": "stop",
                "add_generation_prompt": "chat_template_kwargs", "continue_final_message": "chat_template_kwargs",
                "guided_decoding": "structured_outputs"}
"""Other APIs' names (transformers', OpenAI bodies') of a plain line's fields: such a field is an error, not
one of a table's other columns."""


_BEAM_SEARCH = "beam search is LLM.beam_search's, not a line's: a line samples (greedy with \"temperature\": 0)"
_DECODING_MODES = {"use_beam_search": ((False, None), _BEAM_SEARCH), "num_beams": ((1, None), _BEAM_SEARCH),
                   "beam_width": ((1, None), _BEAM_SEARCH), "length_penalty": ((1, None), _BEAM_SEARCH),
                   "early_stopping": ((False, None), _BEAM_SEARCH),
                   "do_sample": ((True, None), 'transformers\' name: a line samples unless "temperature": 0 (greedy)'),
                   "best_of": ((1, None), 'vLLM 0.26 takes none: "n" samples of a line')}
"""Fields that ask for another way of decoding (beam search, transformers' greedy switch, best_of) with the values
that ask for none (as an OpenAI body's `_ONLY_DEFAULT`): another value would be ignored and the line sampled
instead, so it is an error (`_other_decoding`)."""


_TEXT_ONLY = "the models here take text and token ids only"
_OTHER_INPUTS = {"multi_modal_data": _TEXT_ONLY, "mm_processor_kwargs": _TEXT_ONLY, "prompt_embeds": _TEXT_ONLY,
                 "lora_request": "no LoRA adapters here: merge the adapter into the model's weights"}
"""vLLM's prompt fields beside the text (TextPrompt / TokensPrompt's, and LLM.generate's lora_request) that ask for
inputs the engine has not: given (not null, not empty), the line or row would run without them as a success, so it
is an error (`other_input`), as LLM.generate refuses them."""


def other_input(name: str, value: Any) -> str | None:
    """Why a line's or row's field asks for an input the engine has not (`_OTHER_INPUTS`), or None: not such a
    field, or null or empty (asking for nothing)."""
    if name not in _OTHER_INPUTS or value is None or (isinstance(value, (dict, list)) and not value):
        return None
    return f"vLLM's, not supported here ({_OTHER_INPUTS[name]})"


_CONSTRAINTS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
                "json_object": "json_object", "json_schema": "json", "ebnf": "grammar"}
"""StructuredOutputsParams' fields (and SGLang's sampling_params names, json_schema and ebnf) given at a plain line's
top level, where they constrain nothing: a field of its "structured_outputs", by name (`_misplaced_constraint`)."""


_SCHEMA_KEYWORDS = frozenset({"type", "properties", "$schema", "$ref", "$defs", "anyOf", "oneOf", "allOf", "enum",
                              "const", "items", "required", "pattern"})
"""Keywords that make an object a JSON schema (a record of data holds none of them, as a rule)."""


def _looks_like_schema(value: Any) -> bool:
    """Whether a value is a JSON schema, or a JSON string of one: an object holding a schema keyword."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return isinstance(value, dict) and not _SCHEMA_KEYWORDS.isdisjoint(value)


def _misplaced_constraint(name: str, value: Any) -> str | None:
    """Why a plain line's unknown field is a structured-output constraint given at the top level (the line would run
    unconstrained as a success), or None. Only a value shaped as the constraint counts (a schema: an object with a
    schema keyword, or a JSON string of one; a grammar: a string with a rule, `::=`; a regex: a string; choice: a
    list of strings; json_object: true), so a table's column that only shares the name (a "choice" label "B", a
    "grammar" label "ungrammatical", a "json" record) stays an ignored column."""
    if name not in _CONSTRAINTS:
        return None
    if name in ("json", "json_schema"):
        shaped = _looks_like_schema(value)
    elif name == "choice":
        shaped = isinstance(value, list) and bool(value) and all(isinstance(c, str) for c in value)
    elif name == "json_object":
        shaped = value is True
    elif name in ("grammar", "ebnf"):
        shaped = isinstance(value, str) and "::=" in value
    else:
        shaped = isinstance(value, str)
    if not shaped:
        return None
    return f'a structured-output constraint belongs in "structured_outputs": {{"{_CONSTRAINTS[name]}": ...}}'


def _other_decoding(name: str, value: Any) -> str | None:
    """Why a plain line's field asks for a way of decoding a line does not run (`_DECODING_MODES`: beam search,
    transformers' do_sample false, best_of > 1), or None: not such a field, or its value asks for none."""
    if name not in _DECODING_MODES:
        return None
    defaults, hint = _DECODING_MODES[name]
    asks_for_none = any(value is None if d is None else isinstance(value, bool) == isinstance(d, bool) and value == d
                        for d in defaults)  # (true is no 1 here, nor 1 true: JSON tells them apart)
    return None if asks_for_none else hint


def _vllm_only(name: str, value: Any) -> str | None:
    """Why a plain line's field is one of vLLM's SamplingParams fields with no counterpart here (`VLLM_ONLY_FIELDS`)
    at a value asking for what does not run (thinking_token_budget 64: the line would pass as a success without it,
    where SamplingParams and an OpenAI body refuse it), or None."""
    if name not in VLLM_ONLY_FIELDS:
        return None
    accepted, instead = VLLM_ONLY_FIELDS[name]
    return None if among(value, accepted) else f"vLLM's, not supported here ({instead})"


@functools.lru_cache(maxsize=1 << 12)
def _mistaken_field(name: str) -> str | None:
    """Why a plain line's unknown field looks like a mistake (another API's name of a field, or a near miss
    of a sampling field's name, as `temprature`), or None: a table's other column, ignored. Names of five
    characters or more only, and a close match (`uid`, `n_tokens` or `prompt_tokens` are left alone)."""
    if name in _OTHER_NAMES:
        return f"a plain line's is {_OTHER_NAMES[name]!r}"
    if name == "chat_template":
        return "a plain line takes none: give --chat-template"
    if name in ("guided_json", "guided_choice", "guided_regex", "guided_grammar"):  # (the line ran unconstrained)
        return f'vLLM\'s name before 0.12: give "structured_outputs": {{"{name[7:]}": ...}}'
    close = difflib.get_close_matches(name, _NEAR_MISS_TARGETS, n=1, cutoff=0.9) if len(name) >= 5 else []
    return f"did you mean {close[0]!r}?" if close else None


def _overrides(obj: dict) -> dict[str, Any]:
    """A plain line's sampling fields. null is "not given", as in OpenAI bodies and Ray rows (the command
    line's default applies), max_tokens included: pandas writes a missing value as null, and a gap in a
    max_tokens column ran its lines to the context past --max-tokens (a line asks for the context with a
    max_tokens as large as it: a plain line stops there)."""
    return integers_from_json({k: obj[k] for k in SAMPLING_FIELDS if obj.get(k) is not None}) or _NO_OVERRIDES


def _parse_openai_line(obj: dict, line_number: int) -> BatchLine | LineError:
    def error(message: str, rid: str | int | None = None) -> LineError:
        return LineError(line_number, rid, f"line {line_number}: {message}", OPENAI)

    rid = obj.get("custom_id")
    if rid is None:
        return error("missing 'custom_id'")
    if not isinstance(rid, str) or not rid:
        return error("'custom_id' must be a non-empty string", _clean_id(rid))  # echoed where it can be
    unknown = tuple(sorted(set(obj) - {"custom_id", "method", "url", "body"}))  # ignored and named, as in vLLM
    # (vLLM does not read it: "post" is taken; a missing method, which vLLM and OpenAI refuse, is a POST here)
    if str(obj.get("method", "POST")).upper() != "POST":
        return error(f"unsupported method {short_repr(obj.get('method'))} (only POST)", rid)
    try:
        asked = openai_batch.body_to_request(obj.get("url"), obj.get("body"))
    except openai_batch.BodyError as e:
        return error(str(e), rid)
    model = obj["body"].get("model")
    return BatchLine(line_number, rid, asked.prompt, asked.is_chat, integers_from_json(asked.overrides), OPENAI,
                     asked.url, model if isinstance(model, str) else None, asked.template, unknown,
                     continued_role=_continued_role(asked.template, asked.prompt), echo=asked.echo,
                     response_asks=asked.asks, tool_call=asked.tool_call,
                     tool_choice_none=asked.is_chat and obj["body"].get("tool_choice") == "none",
                     add_special_tokens=asked.add_special_tokens)


def _continued_role(template: dict | None, messages: Any) -> str | None:
    """The last message's role where a chat body asks for no generation prompt (`BatchLine.continued_role`);
    template: the body's template keywords, as read (`openai_batch`: "false" is false)."""
    if (template or {}).get("add_generation_prompt") is not False or not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    return last["role"] if isinstance(last, dict) and isinstance(last.get("role"), str) else None


def _lone_surrogate(obj: Any) -> str | None:
    """Where the first string (key or value) holding a lone surrogate is, as a path like
    `'messages'[0]['content']`, or None. Iterative: the nesting may be as deep as json allows."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not encodable_as_utf8(key):
                    return f"a field name in {path or 'the line'}"
                stack.append((f"{path}[{short_repr(key)}]" if path else short_repr(key), item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and not encodable_as_utf8(value):
            return path
    return None


def encodable_as_utf8(text: str) -> bool:
    """Whether `text` is valid Unicode to write as UTF-8 (no lone surrogate: a bad JSON escape, or the bytes of a
    non-UTF-8 command-line word)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean_id(rid: Any) -> str | int | None:
    """An id that can be echoed in an error record, or None."""
    if isinstance(rid, int) and not isinstance(rid, bool):
        return rid
    return rid if isinstance(rid, str) and encodable_as_utf8(rid) else None


ReasoningSplit = Callable[[str], tuple[str | None, str | None]]
"""A chat answer's text -> (reasoning, content): the job's --reasoning-parser, as
`ingest.ResponseShape.reasoning_split` gives it."""


def result_record(request_id: str | int, output, prompt_tokens: int,
                  tool_call: ForcedToolCall | AutoToolChoice | None = None,
                  reasoning_split: ReasoningSplit | None = None) -> dict[str, Any]:
    """A plain line's result: its first completion's fields at the top level, as before n > 1 existed,
    with every completion (its logprobs included) under "outputs" when there are several; `tool_call`: a forced
    call's or served "auto" line's, whose calls are read from the content `reasoning_split` leaves (None: the whole
    text) (`_completion_record`). Invariant: the top level's completion fields are outputs[0]'s, the same values
    (each completion is read once, so a tool call has one id wherever it is written)."""
    completions = [_completion_record(o, tool_call, reasoning_split) for o in output.outputs]
    record: dict[str, Any] = {"id": request_id, **completions[0],
                              "prompt_tokens": prompt_tokens, "completion_tokens": output.num_output_tokens}
    if output.num_cached_tokens is not None:  # (prompt tokens read from a shared prefix, not computed)
        record["cached_tokens"] = output.num_cached_tokens
    if output.prompt_logprobs is not None:  # null for the first prompt token, as in vLLM
        record["prompt_logprobs"] = [None if lp_map is None else _logprob_record(int(tid), lp_map)
                                     for tid, lp_map in zip(output.prompt_token_ids, output.prompt_logprobs)]
    if len(completions) > 1:
        record["outputs"] = completions
    return record


def _completion_record(completion, tool_call: ForcedToolCall | AutoToolChoice | None = None,
                       reasoning_split: ReasoningSplit | None = None) -> dict[str, Any]:
    """text, token_ids, finish_reason, stop_reason (vLLM's: the stop string or token id that ended it, else
    null) and, where asked for, logprobs. A tool line's completion adds its `tool_calls` (`tool_calls.message_calls`;
    [] where none), read from the content after `reasoning_split` takes the thinking off, as vLLM's server reads an
    OpenAI chat answer (thinking never holds a call), and takes the finish_reason vLLM's chat answer gives it; its
    `text` stays the whole answer, thinking included."""
    calls = []
    if tool_call is not None:
        content = completion.text if reasoning_split is None else reasoning_split(completion.text)[1]
        calls = message_calls(content, tool_call)[0]
    record = {"text": completion.text, "token_ids": completion.token_ids,
              "finish_reason": finish_reason_of(completion.finish_reason, tool_call, bool(calls)),
              "stop_reason": completion.stop_reason}
    if tool_call is not None:
        record["tool_calls"] = calls
    if completion.logprobs is not None:
        record["logprobs"] = [_logprob_record(tid, lp_map)
                              for tid, lp_map in zip(completion.token_ids, completion.logprobs)]
    return record


def _logprob_record(token_id: int, lp_map: dict) -> dict[str, Any]:
    """One position's logprobs: the token's, and every entry (top k and the token) with its rank, by rank."""
    ranked = sorted(lp_map.items(), key=lambda item: item[1].rank)
    return {"token_id": token_id, "logprob": lp_map[token_id].logprob,
            "top": [{"token_id": t, "logprob": lp.logprob, "rank": lp.rank} for t, lp in ranked]}
