"""Forced tool calls of chat lines: `tool_choice` "required" or a named function, as vLLM 0.26's server makes them
with a tool-call parser set (--tool-call-parser: without one it refuses both, renderers/online_renderer.py's
render_chat; the constraint is built by its ToolParser.adjust_request, whatever the parser). No parser is needed
here: the answer is constrained to JSON and read as such (`cli` takes vLLM's parser flags and says so).

The answer is constrained (structured outputs, xgrammar) to JSON and read back as the message's tool calls:
- named ({"type": "function", "function": {"name": f}}): the JSON schema of f's `parameters` (an object with no
  properties where it has none: BatchLLM's choice, see `tool_schema`); the answer is the call's `arguments`, as
  generated; `finish_reason` is the engine's ("stop").
- "required": a JSON array of at least one {"name": <a tool's name>, "parameters": <that tool's parameters>}
  (one anyOf branch per tool, their `$defs` gathered at the top, as vLLM's `get_json_schema_from_tools`); each
  item is a call, its `arguments` the parameters as JSON text; `finish_reason` "tool_calls" where the engine's
  is "stop".
"auto" (vLLM's default where tools are given) is an `AutoToolChoice`: the answer is generated as text and read by
a parser of the model's own call syntax (`io.tool_parsers`), only where the job gives vLLM's
--enable-auto-tool-choice with --tool-call-parser (`served_tool_choice`; else refused, per line, as vLLM refuses it).
The tools themselves reach the chat template as with "none" (`openai_batch.tools_for_template`).
"""

from __future__ import annotations

import json
import random
import string
import uuid
from typing import Any, NamedTuple

from batchllm.io.tool_parsers import NINE_CHARACTER_IDS, TOOL_PARSERS, tool_parser_named
from batchllm.sampling_params import SamplingParams
from batchllm.structured import grammar_key, unenforced_schema_feature


class ToolChoiceError(ValueError):
    """A tool_choice that cannot be served (named on its line)."""


TOOL_CHOICES = ('"none" (the tools reach the chat template, the answer is text), "required" or a named function '
                '{"type": "function", "function": {"name": ...}} (the answer is a tool call, constrained to the '
                "tool's parameters)")
"""The tool_choice values taken here, as an error names them."""

_NO_PARAMETERS = {"type": "object", "properties": {}}
"""A tool's parameters where it gives none (vLLM's, for "required"): an object."""


class ForcedToolCall(NamedTuple):
    """A chat line's forced tool call: what its answer is read back as (`tool_calls_of`)."""

    name: str | None
    """The named function; None: "required" (an array of calls of any of the tools)."""
    parallel: bool = True
    """False where the body's parallel_tool_calls is false: only the first call is kept, as vLLM's server does."""
    replaced: tuple[str, str] | None = None
    """The grammar key (`structured.grammar_key`) of the line's own structured_outputs, which the call's constraint
    replaced (`tool_constraint`); `io.ingest` still compiles it against the model, as a line's own, so that a
    constraint that fails a line without tools fails it with them too. None where it gave none."""
    parser: str | None = None
    """The job's tool-call parser where it serves "auto" (`served_tool_choice` sets it), which names the calls' id
    style (`tool_call_id`), as vLLM's MistralParser ids forced calls too; None: vLLM's default ids."""


class AutoToolChoice(NamedTuple):
    """A chat line's tool_choice "auto": its answer is text, which a tool-call parser of the model's syntax reads
    (`io.tool_parsers`), where the job serves "auto" (`served_tool_choice` sets `parser`)."""

    parallel: bool = True
    """False where the body's parallel_tool_calls is false: only the first call is kept, as vLLM's server does."""
    has_tools: bool = True
    """Whether the line gives tools ("auto" without them is refused where the job serves "auto", as vLLM's request
    model refuses it; a job that does not serves it refuses it for that first, as before)."""
    null_choice: bool = False
    """An OpenAI body's null tool_choice beside tools: text where the job does not serve "auto"; where it does, vLLM
    0.26's server still runs the parser (its null counts as auto there) but answers with the content the parser
    leaves and drops the calls (its message for a null tool_choice has no tool_calls): so here too."""
    parser: str | None = None
    """The job's --tool-call-parser, set by `served_tool_choice`; None until then."""
    reader: str | None = None
    """The key of the reader that parser reads this tokenizer's answers with (`tool_parsers.reader_for`: vLLM's
    mistral reads by the vocabulary's [ARGS]), where it is not the parser's own; set by the record writers
    (`io.ingest.ResponseShape.tool_call_of`)."""


AUTO_NEEDS_A_PARSER = (
    '"tool_choice": "auto" (vLLM\'s default where tools are given) needs a tool-call parser (vLLM\'s '
    "--enable-auto-tool-choice with --tool-call-parser) to read the model's own call syntax: give `batchllm run` "
    f"both (parsers: {', '.join(TOOL_PARSERS)}), or give {TOOL_CHOICES}")
"""Why an "auto" line fails in a job that does not serve "auto" (vLLM's server refuses it the same way)."""


def served_tool_choice(tool_call: ForcedToolCall | AutoToolChoice | None, auto_tool_parser: str | None
                       ) -> ForcedToolCall | AutoToolChoice | None:
    """A line's tool call as a job serves it: `auto_tool_parser` is its --tool-call-parser where it gives
    --enable-auto-tool-choice too, else None. No call is served as it is, a forced one with the parser (its ids'
    style); an "auto" one gets the parser, or fails (ToolChoiceError) where the job has none
    (`AUTO_NEEDS_A_PARSER`) or the line has no tools; an OpenAI body's null choice is a text answer (None) where
    the job has no parser. Pure: the same arguments give the same answer, so that the record writer
    (`io.ingest.record_for`, Ray's too) can call it again."""
    if isinstance(tool_call, ForcedToolCall):
        return tool_call._replace(parser=auto_tool_parser)
    if tool_call is None:
        return None
    if auto_tool_parser is None:
        if tool_call.null_choice:
            return None
        raise ToolChoiceError(AUTO_NEEDS_A_PARSER)
    if not tool_call.has_tools:
        raise ToolChoiceError("'tool_choice' \"auto\" needs 'tools' (as vLLM's request model says)")
    return tool_call._replace(parser=auto_tool_parser)


def forced_tool_call(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: Any = None
                     ) -> ForcedToolCall | AutoToolChoice | None:
    """The call a chat line's `tool_choice` asks for: a forced one, "auto" (`AutoToolChoice`, which the job serves
    or refuses: `served_tool_choice`), or None ("none" or null: a text answer, as vLLM's server answers a null
    tool_choice where it has no parser; an OpenAI body's absent tool_choice is "auto" where it has tools: its
    caller says so). `tools`: the line's, as `openai_batch.tools_for_template` checked them (None where none).
    Raises ToolChoiceError naming the problem, as vLLM's request checks: a choice without tools, a shape that is no
    choice, a named function not among the tools."""
    if tool_choice in ("none", None):
        return None
    if tool_choice == "auto":
        return AutoToolChoice(parallel_tool_calls is not False, bool(tools))
    if tool_choice != "required" and not _is_named(tool_choice):
        raise ToolChoiceError(f"'tool_choice' {json.dumps(tool_choice)[:80]} is not a tool choice: give {TOOL_CHOICES}")
    if not tools:
        raise ToolChoiceError(f"'tool_choice' {json.dumps(tool_choice)[:80]} needs 'tools' (as vLLM's request model "
                              "says)")
    parallel = parallel_tool_calls is not False
    if tool_choice == "required":
        return ForcedToolCall(None, parallel)
    name = tool_choice["function"]["name"]
    if name not in (names := [tool["function"]["name"] for tool in tools]):
        raise ToolChoiceError(f"'tool_choice' names the function {json.dumps(name)[:80]}, which is not among the "
                              f"tools ({', '.join(json.dumps(n) for n in names)[:200]})")
    return ForcedToolCall(name, parallel)


def _is_named(tool_choice: Any) -> bool:
    """Whether a tool_choice is vLLM's named one: {"type": "function" (or none), "function": {"name": a non-empty
    string}} (other keys ignored, as its request model ignores them)."""
    return (isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function"
            and isinstance(function := tool_choice.get("function"), dict)
            and isinstance(function.get("name"), str) and bool(function["name"]))


def replaced_constraint(tool_call: ForcedToolCall | AutoToolChoice | None) -> tuple[str, str] | None:
    """The grammar key of the line's own structured_outputs that a forced call's constraint replaced
    (`ForcedToolCall.replaced`); None for any other line (an "auto" line keeps its own constraint)."""
    return tool_call.replaced if isinstance(tool_call, ForcedToolCall) else None


def tool_constraint(forced: ForcedToolCall, tools: list[dict], structured_outputs: Any
                    ) -> tuple[dict[str, Any], ForcedToolCall]:
    """The line's structured_outputs for its forced call, {"json": `tool_schema`}, and the call with `replaced`
    set. The line's own `structured_outputs` is checked first, as a line's without tools is (`SamplingParams`:
    a ValueError with its words, "SamplingParams.structured_outputs ..."); a valid one beside a named choice is a
    ToolChoiceError where it is json, regex or choice, as vLLM's request model refuses it, and otherwise replaced
    (beside "required" always), as vLLM's tool parser's adjust_request replaces it (a response_format too)."""
    replaced = None
    if structured_outputs is not None:
        own = SamplingParams(structured_outputs=structured_outputs).structured_outputs
        if forced.name is not None and any(getattr(own, kind) is not None for kind in ("json", "regex", "choice")):
            raise ToolChoiceError("give a named 'tool_choice' or a structured_outputs constraint (json, regex or "
                                  "choice), not both (as vLLM refuses them): the call's arguments are constrained "
                                  "to the function's parameters")
        replaced = grammar_key(own)
    return {"json": tool_schema(forced, tools)}, forced._replace(replaced=replaced)


def tool_schema(forced: ForcedToolCall, tools: list[dict]) -> dict[str, Any]:
    """The JSON schema a forced call's answer keeps to (see the module's doc). A tool without parameters (or with
    `{}`) takes an object with no properties: vLLM's for "required"; for a named one BatchLLM's choice, where vLLM
    constrains nothing (no parameters: free text, no JSON arguments) or any JSON value (`{}`), so that a call's
    arguments are always a JSON object, as OpenAI's API defines them.
    The tools are not changed (a parameters' $defs is gathered from a copy). Raises ToolChoiceError where two
    tools define one $defs name differently (vLLM refuses them)."""
    pairs = [(tool["function"]["name"], tool["function"].get("parameters")) for tool in tools]
    if forced.name is not None:  # (the last tool of that name, as vLLM's)
        k = max(k for k, (name, _) in enumerate(pairs) if name == forced.name)
        _check_parameters(k, forced.name, pairs[k][1], joined=False)
        return pairs[k][1] or _NO_PARAMETERS
    branches, defs = [], {}
    for k, (name, parameters) in enumerate(pairs):  # (each tool a branch, in order, as vLLM's)
        _check_parameters(k, name, parameters, joined=True)
        parameters = dict(parameters or _NO_PARAMETERS)
        for def_name, schema in (parameters.pop("$defs", None) or {}).items():
            if defs.setdefault(def_name, schema) != schema:
                raise ToolChoiceError(f"the tools define $defs {json.dumps(def_name)[:80]} twice, differently, "
                                      "which a \"required\" tool_choice cannot take (vLLM's tool parsers refuse "
                                      "them too)")
        branches.append({"properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": branches}}
    if defs:
        schema["$defs"] = defs
    return schema


def _check_parameters(k: int, name: str, parameters: dict | None, joined: bool) -> None:
    """A ToolChoiceError naming tools[k] (and its function) and the path inside its parameters, where they use a
    keyword xgrammar does not enforce (`structured.unenforced_schema_feature`: a line without tools fails on it
    too, where the path would be the joined schema's), or, `joined` into a "required" schema, hold a local $ref
    other than "#/$defs/...": only $defs is gathered at the joined schema's top (as vLLM's
    get_json_schema_from_tools does), so "#/definitions/X", "#" or "#/properties/..." would name nothing there."""
    tool = f"tools[{k}] (function {json.dumps(name)[:80]})"
    if feature := unenforced_schema_feature(parameters or {}):
        raise ToolChoiceError(f"structured output: {tool}'s parameters use {feature}, which xgrammar (the grammar "
                              "backend here) does not enforce, so answers could break it: remove it, or check that "
                              "rule after")
    if joined and (found := _root_ref(parameters or {})):
        ref, path = found
        raise ToolChoiceError(
            f"{tool}'s parameters refer to {json.dumps(ref)[:80]}{f' (in {path})' if path else ''}, which a "
            "\"required\" tool_choice cannot resolve: the tools' parameters are joined into one schema (one anyOf "
            "branch each, as vLLM builds it) and only their \"$defs\" are gathered at its top, so only "
            "\"#/$defs/...\" refs keep their target (vLLM has the same limit): put the definitions under \"$defs\" "
            "and refer to them as \"#/$defs/NAME\"")


def _root_ref(schema: dict) -> tuple[str, str] | None:
    """The first local $ref of `schema` (any depth; data keywords' values not searched) that does not start with
    "#/$defs/", and where it is (a dotted path); None where there is none."""
    stack: list[tuple[str, Any]] = [("", schema)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(node))
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#") and not ref.startswith("#/$defs/"):
            return ref, path
        stack.extend((f"{path}.{key}" if path else str(key), value) for key, value in node.items()
                     if key not in ("default", "enum", "const", "examples"))
    return None


def message_calls(content: str | None, tool_call: ForcedToolCall | AutoToolChoice) -> tuple[list[dict], str | None]:
    """A chat answer's (tool calls, content), as vLLM 0.26's server writes them in its message (`content`: the
    answer's text, after its reasoning where that is split off; None where there is none). A forced call: its calls
    (`tool_calls_of`) and content "", or, where none was read from a text (an answer cut short), no call and that
    text as content. "auto" (served: `served_tool_choice`): the parser's calls and the content it leaves (None where
    blank), or no call and the content as it was; an OpenAI body's null choice keeps the content the parser leaves
    but not the calls (vLLM's). Only the first call where parallel calls are off."""
    if isinstance(tool_call, ForcedToolCall):
        calls = tool_calls_of(content or "", tool_call)
        return calls, content if not calls and content and content.strip() else ""
    parsed = tool_parser_named(tool_call.reader or tool_call.parser)(content or "")
    if not (parsed.calls or parsed.tools_called):
        return [], content
    content = None if parsed.content and not parsed.content.strip() else parsed.content
    if tool_call.null_choice:
        return [], content
    return _calls(parsed.calls[:1] if not tool_call.parallel else parsed.calls, tool_call.parser), content


def _calls(pairs: list[tuple[str, str]], parser: str | None = None) -> list[dict[str, Any]]:
    """(name, arguments) pairs as the message's tool calls, each with a new id (`tool_call_id`, in the style of the
    job's `parser`)."""
    return [{"id": tool_call_id(parser), "type": "function",
             "function": {"name": name, "arguments": arguments}} for name, arguments in pairs]


def tool_calls_of(text: str, forced: ForcedToolCall) -> list[dict[str, Any]]:
    """A forced answer's tool calls, as vLLM's server reads them back: named, the text as the call's arguments
    (none where the text is blank); "required", each item of the JSON array (none where the text is not such an
    array: cut short by max_tokens), its parameters as JSON text. Each call {"id": `tool_call_id`, "type":
    "function", "function": {"name", "arguments"}}; only the first where parallel calls are off."""
    if forced.name is not None:
        calls = [(forced.name, text)] if text.strip() else []
    else:
        calls = [(name, json.dumps(parameters, ensure_ascii=False)) for name, parameters in _required_calls(text)]
    if not forced.parallel:
        calls = calls[:1]
    return _calls(calls, forced.parser)


def tool_call_id(parser: str | None = None) -> str:
    """A new tool call's id as vLLM 0.26 makes it under the job's tool-call `parser`: Mistral's 9 random letters and
    digits for mistral (`tool_parsers.NINE_CHARACTER_IDS`), else make_tool_call_id's default: "chatcmpl-tool-" and
    random_uuid, the low 64 bits of a UUID4 as 16 hex digits."""
    if parser in NINE_CHARACTER_IDS:
        return "".join(random.choices(string.ascii_letters + string.digits, k=9))
    return f"chatcmpl-tool-{uuid.uuid4().int & (1 << 64) - 1:016x}"


def _required_calls(text: str) -> list[tuple[str, Any]]:
    """A "required" answer's (name, parameters) pairs: a JSON array of objects with a string name and an object (or
    null, or no) parameters, as vLLM's list of FunctionDefinition takes it; [] for anything else."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list) or not all(
            isinstance(item, dict) and isinstance(item.get("name"), str)
            and isinstance(item.get("parameters"), (dict, type(None))) for item in items):
        return []
    return [(item["name"], item.get("parameters")) for item in items]


def finish_reason_of(finish_reason: str | None, tool_call: ForcedToolCall | AutoToolChoice | None,
                     called: bool = False) -> str | None:
    """A tool line's finish_reason, as vLLM's server gives it: "tool_calls" for a "required" answer the engine
    stopped ("stop") with calls read (`called`: a stop string can cut the array short, and "tool_calls" promises
    the message's tool_calls), and for an "auto" answer where the parser read calls (whatever ended it), else the
    engine's (a named call stays "stop", as OpenAI's; a null choice's calls are dropped: not called)."""
    if isinstance(tool_call, ForcedToolCall) and tool_call.name is None and finish_reason == "stop" and called:
        return "tool_calls"
    if isinstance(tool_call, AutoToolChoice) and called:
        return "tool_calls"
    return finish_reason
