"""Forced tool calls of chat lines (`io.tool_calls`): a body's or plain line's tool_choice "required" or a named
function failed its line (only "none" was taken); vLLM 0.26's server serves both (with --tool-call-parser set,
whatever the parser) by constraining the answer to the tools' JSON and reading it back as the message's
tool_calls, which needs no parser here."""

from __future__ import annotations

import copy
import json
import re

import pytest

from batchllm.io.ingest import LineServing
from batchllm.io.jsonl import parse_line, result_record
from batchllm.io.openai_batch import CHAT_URL, COMPLETIONS_URL, BodyError, body_to_request, success_record
from batchllm.io.tool_calls import AutoToolChoice, ForcedToolCall, ToolChoiceError, served_tool_choice, tool_calls_of
from batchllm.request_output import CompletionOutput, RequestOutput
from batchllm.sampling_params import SamplingParams

VERDICT = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
TOOLS = [{"type": "function", "function": {"name": "verdict", "parameters": VERDICT}},
         {"type": "function", "function": {"name": "ping"}}]
NAMED = {"type": "function", "function": {"name": "verdict"}}
CHAT = {"messages": [{"role": "user", "content": "Is water wet?"}], "tools": TOOLS}


def test_a_named_tool_choice_constrains_the_answer_to_the_functions_parameters():
    """The named function's parameters are the schema (over a response_format, as vLLM's server puts it); the tools
    still reach the chat template; a tool without parameters takes an object."""
    asked = body_to_request(CHAT_URL, {**CHAT, "tool_choice": NAMED, "response_format": {"type": "json_object"}})
    assert asked.overrides["structured_outputs"] == {"json": VERDICT}
    assert asked.tool_call == ForcedToolCall("verdict", True)
    assert [t["function"]["name"] for t in asked.template["tools"]] == ["verdict", "ping"]
    ping = body_to_request(CHAT_URL, {**CHAT, "tool_choice": {"function": {"name": "ping"}}})  # (type defaults)
    assert ping.overrides["structured_outputs"] == {"json": {"type": "object", "properties": {}}}
    text = body_to_request(CHAT_URL, {**CHAT, "tool_choice": "none"})
    assert text.tool_call is None and "structured_outputs" not in text.overrides


def test_required_constrains_the_answer_to_an_array_of_calls_of_any_tool_as_vllm_builds_it():
    """vLLM's get_json_schema_from_tools: an array of at least one {"name", "parameters"}, one anyOf branch per
    tool, each parameters' $defs gathered at the top (the tools themselves unchanged)."""
    defs = {"Answer": {"type": "string", "enum": ["yes", "no"]}}
    tools = [*TOOLS, {"type": "function", "function": {"name": "say", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/Answer"}}, "$defs": defs}}}]
    given = copy.deepcopy(tools)
    asked = body_to_request(CHAT_URL, {**CHAT, "tools": tools, "tool_choice": "required",
                                       "structured_outputs": {"regex": "x"}, "parallel_tool_calls": False})
    assert tools == given

    def branch(name, parameters):
        return {"properties": {"name": {"type": "string", "enum": [name]}, "parameters": parameters},
                "required": ["name", "parameters"]}

    assert asked.overrides["structured_outputs"] == {"json": {
        "type": "array", "minItems": 1,
        "items": {"type": "object", "anyOf": [branch("verdict", VERDICT),
                                              branch("ping", {"type": "object", "properties": {}}),
                                              branch("say", {"type": "object",
                                                             "properties": {"a": {"$ref": "#/$defs/Answer"}}})]},
        "$defs": defs}}
    assert asked.tool_call == ForcedToolCall(None, False, ("regex", "x"))  # (its own, replaced: ingest compiles it)
    clash = [tools[2], {"type": "function", "function": {"name": "other", "parameters": {"$defs": {"Answer": {}}}}}]
    with pytest.raises(BodyError, match=r'define \$defs "Answer" twice'):
        body_to_request(CHAT_URL, {**CHAT, "tools": clash, "tool_choice": "required"})


@pytest.mark.parametrize("body, message", [
    ({"tool_choice": {"type": "function", "function": {"name": "weather"}}},
     'names the function "weather", which is not among the tools ("verdict", "ping")'),
    ({"tool_choice": "maybe"}, '\'tool_choice\' "maybe" is not a tool choice: give "none"'),
    ({"tool_choice": {"type": "web_search", "function": {"name": "verdict"}}}, "is not a tool choice"),
    ({"tool_choice": {"type": "function", "function": {"name": ""}}}, "is not a tool choice"),
    ({"tool_choice": {"type": "function", "name": "verdict"}}, "is not a tool choice"),  # (Responses API's shape)
    ({"tool_choice": "required", "tools": None}, "'tool_choice' \"required\" needs 'tools' (as vLLM's request model "
                                                 "says)"),
    ({"tool_choice": NAMED, "structured_outputs": {"json": {"type": "object"}}},
     "give a named 'tool_choice' or a structured_outputs constraint (json, regex or choice), not both"),
])
def test_a_tool_choice_that_cannot_be_served_fails_its_line_naming_it(body, message):
    with pytest.raises(BodyError, match=re.escape(message)):
        body_to_request(CHAT_URL, {**CHAT, **body})


@pytest.mark.parametrize("body", [{"tool_choice": "auto"}, {}])  # ({}: tools without a tool_choice: vLLM's "auto")
def test_auto_fails_its_line_where_the_job_has_no_tool_call_parser(body):
    """"auto" is read as such (`AutoToolChoice`) and refused when the job serves the line without a parser, as
    vLLM's server refuses it without --enable-auto-tool-choice and --tool-call-parser."""
    asked = body_to_request(CHAT_URL, {**CHAT, **body})
    assert asked.tool_call == AutoToolChoice() and "structured_outputs" not in asked.overrides
    with pytest.raises(ToolChoiceError, match=re.escape(
            '"tool_choice": "auto" (vLLM\'s default where tools are given) needs a tool-call parser (vLLM\'s '
            "--enable-auto-tool-choice with --tool-call-parser) to read the model's own call syntax")):
        served_tool_choice(asked.tool_call, None)


def test_a_null_tool_choice_answers_text_where_an_absent_one_is_auto():
    """vLLM's request model defaults only a missing tool_choice to "auto" (where tools are given); a null one stays
    null, which its server answers as text with the tools in the template. A null one failed here as "auto"."""
    asked = body_to_request(CHAT_URL, {**CHAT, "tool_choice": None})
    assert served_tool_choice(asked.tool_call, None) is None and "structured_outputs" not in asked.overrides
    assert [t["function"]["name"] for t in asked.template["tools"]] == ["verdict", "ping"]
    with pytest.raises(ToolChoiceError, match="needs a tool-call parser"):
        served_tool_choice(body_to_request(CHAT_URL, CHAT).tool_call, None)
    plain = parse_line(json.dumps({"id": 1, **CHAT, "tool_choice": None}).encode(), 1)
    assert plain.tool_call is None and plain.chat_template_kwargs == {"tools": TOOLS}


@pytest.mark.parametrize("choice", [{}, {"tool_choice": "none"}, {"tool_choice": None}, {"tool_choice": "required"},
                                    {"tool_choice": NAMED}])
def test_empty_tools_fail_their_line_as_vllm_refuses_them(choice):
    """vLLM 0.26's request model refuses `"tools": []` whatever the tool_choice; such a line was taken (as no
    tools, or failing on its choice), an OpenAI line's and a plain line's alike."""
    vllms = "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely."
    with pytest.raises(BodyError, match=re.escape(vllms)):
        body_to_request(CHAT_URL, {**CHAT, "tools": [], **choice})
    plain = parse_line(json.dumps({"id": 1, **CHAT, "tools": [], **choice}).encode(), 1)
    assert plain.message == f"line 1: {vllms}", plain


INVALID_CONSTRAINTS = [
    ({"json": VERDICT, "regex": "a"}, "structured_outputs needs exactly one of json, regex, choice, grammar, "
                                      "json_object, structural_tag, got json, regex"),
    ("x", "structured_outputs must be an object with one of json, regex, choice, grammar, json_object, "
          "structural_tag"),
    ({"foo": 1}, "structured_outputs: unsupported field(s) foo"),
    ({"structural_tag": 5}, "structured_outputs.structural_tag must be a structural tag's JSON text"),
    ({"json": "{bad"}, "structured_outputs.json is not valid JSON"),
]


@pytest.mark.parametrize("choice", ["required", NAMED])
@pytest.mark.parametrize("structured, message", INVALID_CONSTRAINTS)
def test_a_forced_lines_own_structured_outputs_is_checked_as_without_tools(choice, structured, message):
    """A forced choice replaced the line's own structured_outputs before anything checked it, so invalid ones
    passed silently; now they fail the line with the words a line without tools gets (a plain line's say
    its own field's name, as there), and a valid one beside "required" is replaced."""
    with pytest.raises(BodyError) as forced:
        body_to_request(CHAT_URL, {**CHAT, "tool_choice": choice, "structured_outputs": structured})
    with pytest.raises(ValueError) as alone:  # (what checks a line without tools, ingest's sampling_params_for)
        SamplingParams(structured_outputs=structured)
    assert message in str(forced.value) and str(forced.value) == str(alone.value).replace("SamplingParams.", "")
    plain = parse_line(json.dumps({"id": 1, **CHAT, "tool_choice": choice, "structured_outputs": structured}).encode(),
                       1)
    assert plain.message.startswith(f"line 1: {message}"), plain
    kept = body_to_request(CHAT_URL, {**CHAT, "tool_choice": "required",
                                      "structured_outputs": {"grammar": "root ::= x"}})
    assert kept.overrides["structured_outputs"]["json"]["type"] == "array"
    assert kept.tool_call.replaced == ("grammar", "root ::= x")


def test_a_tools_schema_problem_names_the_tool_and_the_path_inside_its_parameters():
    """An unenforced keyword in a tool's parameters was reported at the joined schema's path
    ("items.anyOf[0].properties.parameters.properties.n") without naming the tool; a "#/definitions/..." ref under
    "required" failed to compile without saying why."""
    odd = {"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}
    tools = [*TOOLS, {"type": "function", "function": {"name": "count", "parameters": odd}}]
    for choice in ("required", {"type": "function", "function": {"name": "count"}}):
        with pytest.raises(BodyError) as error:
            body_to_request(CHAT_URL, {**CHAT, "tools": tools, "tool_choice": choice})
        assert str(error.value).startswith(
            "structured output: tools[2] (function \"count\")'s parameters use 'multipleOf' (in properties.n), "
            "which xgrammar (the grammar backend here) does not enforce"), error.value
    old_refs = {"type": "object", "properties": {"n": {"$ref": "#/definitions/N"}},
                "definitions": {"N": {"type": "integer"}}}
    tools = [*TOOLS, {"type": "function", "function": {"name": "count", "parameters": old_refs}}]
    with pytest.raises(BodyError, match=re.escape(
            'tools[2] (function "count")\'s parameters refer to "#/definitions/N" (in properties.n), which a '
            '"required" tool_choice cannot resolve')):
        body_to_request(CHAT_URL, {**CHAT, "tools": tools, "tool_choice": "required"})
    named = body_to_request(CHAT_URL, {**CHAT, "tools": tools, "tool_choice": {"function": {"name": "count"}}})
    assert named.overrides["structured_outputs"] == {"json": old_refs}  # (the whole schema: its refs resolve)


def test_a_plain_lines_parallel_tool_calls_false_keeps_the_first_call_as_an_openai_bodys():
    """A plain messages line's parallel_tool_calls was an ignored field (every call kept); it is taken as an
    OpenAI body's is."""
    line = parse_line(json.dumps({"id": 1, **CHAT, "tool_choice": "required", "parallel_tool_calls": False}).encode(),
                      1)
    assert line.tool_call == ForcedToolCall(None, False) and "parallel_tool_calls" not in line.ignored_fields
    text = '[{"name": "verdict", "parameters": {"ok": true}}, {"name": "ping", "parameters": {}}]'
    record = result_record(1, output((text, "stop")), 3, line.tool_call)
    assert [c["function"]["name"] for c in record["tool_calls"]] == ["verdict"]
    none = parse_line(json.dumps({"id": 2, **CHAT, "parallel_tool_calls": True}).encode(), 2)
    assert none.tool_call is None and none.ignored_fields == ()
    bad = parse_line(json.dumps({"id": 3, **CHAT, "tool_choice": NAMED, "parallel_tool_calls": "no"}).encode(), 3)
    assert bad.message == "line 3: 'parallel_tool_calls' must be true or false, got 'no'", bad


def test_a_completions_body_takes_no_forced_tool_choice():
    with pytest.raises(BodyError, match=r"'tool_choice' = \"required\" is not supported \(only \"none\"\)"):
        body_to_request(COMPLETIONS_URL, {"prompt": "x", "tool_choice": "required"})


def output(*texts_and_reasons) -> RequestOutput:
    return RequestOutput("r", "p", [1, 2, 3], None, [
        CompletionOutput(i, text, [5] * (i + 1), -1.0, None, finish_reason=reason)
        for i, (text, reason) in enumerate(texts_and_reasons)])


def test_a_named_calls_record_is_vllms_message_with_the_generated_arguments():
    """content "", one call of the named function whose arguments are the text as generated, a
    "chatcmpl-tool-" id, tool_calls between function_call and reasoning; finish_reason the engine's."""
    body = success_record("c", CHAT_URL, "m", output(('{"ok": true}', "stop"), ("  ", "length")), 3,
                          tool_call=ForcedToolCall("verdict"))["response"]["body"]
    first, blank = body["choices"]
    message = first["message"]
    assert list(message) == ["role", "content", "refusal", "annotations", "audio", "function_call", "tool_calls",
                             "reasoning"]
    assert message["content"] == "" and first["finish_reason"] == "stop"
    (call,) = message["tool_calls"]
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", call["id"])
    assert call == {"id": call["id"], "type": "function", "function": {"name": "verdict", "arguments": '{"ok": true}'}}
    assert "tool_calls" not in blank["message"] and blank["message"]["content"] == ""  # (vLLM's: no call)
    assert blank["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_required_calls_are_the_parsed_items_in_order_and_finish_as_tool_calls():
    """Each item a call (its parameters as JSON text, as vLLM's json.dumps writes them), finish_reason "tool_calls"
    where the engine stopped; an answer cut short (not an array of calls) has none; parallel_tool_calls false keeps
    the first."""
    text = '[{"name": "verdict", "parameters": {"ok": false}}, {"name": "ping", "parameters": {"é": 1}}]'
    body = success_record("c", CHAT_URL, "m", output((text, "stop"), ('[{"name": "ver', "length"),
                                                     ('[{"name": "verdict", "parameters": {"ok": false', "stop")), 3,
                          tool_call=ForcedToolCall(None))["response"]["body"]
    done, cut, stopped = body["choices"]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in done["message"]["tool_calls"]] == [
        ("verdict", '{"ok": false}'), ("ping", '{"é": 1}')]
    assert len({c["id"] for c in done["message"]["tool_calls"]}) == 2
    assert done["finish_reason"] == "tool_calls" and done["message"]["content"] == ""
    assert "tool_calls" not in cut["message"] and cut["finish_reason"] == "length"
    # a stop string that cuts the array: "tool_calls" promised calls the message did not have; the text was dropped
    assert "tool_calls" not in stopped["message"] and stopped["finish_reason"] == "stop"
    assert (cut["message"]["content"], stopped["message"]["content"]) == (
        '[{"name": "ver', '[{"name": "verdict", "parameters": {"ok": false')
    assert [c["function"]["name"] for c in tool_calls_of(text, ForcedToolCall(None, False))] == ["verdict"]
    assert tool_calls_of('[{"name": 1, "parameters": {}}]', ForcedToolCall(None)) == []


def test_a_plain_messages_line_with_a_forced_tool_choice_gets_its_calls_in_its_record():
    """A plain line's tool_choice "required" or named failed it; now it is constrained as an OpenAI body's and
    its record adds the tool_calls (the text stays); without a tool_choice its tools only reach the template."""
    line = parse_line(json.dumps({"id": 1, **CHAT, "tool_choice": NAMED, "temperature": 0}).encode(), 1)
    assert line.tool_call == ForcedToolCall("verdict")
    assert line.sampling_overrides == {"temperature": 0, "structured_outputs": {"json": VERDICT}}
    assert line.chat_template_kwargs == {"tools": TOOLS}
    record = result_record(1, output(('[{"name": "ping", "parameters": {}}]', "stop")), 3, ForcedToolCall(None))
    assert record["finish_reason"] == "tool_calls" and record["text"].startswith("[")
    assert [c["function"] for c in record["tool_calls"]] == [{"name": "ping", "arguments": "{}"}]
    text = parse_line(json.dumps({"id": 2, **CHAT}).encode(), 2)
    assert text.tool_call is None and "structured_outputs" not in text.sampling_overrides
    auto = parse_line(json.dumps({"id": 3, **CHAT, "tool_choice": "auto"}).encode(), 3)
    with pytest.raises(ToolChoiceError, match="needs a tool-call parser"):
        served_tool_choice(auto.tool_call, None)
    missing = parse_line(json.dumps({"id": 4, **CHAT, "tool_choice": {"function": {"name": "x"}}}).encode(), 4)
    assert 'names the function "x", which is not among the tools' in missing.message


def test_exclude_tools_when_tool_choice_none_renders_none_lines_without_their_tools(monkeypatch, tmp_path):
    """--exclude-tools-when-tool-choice-none (vLLM's option) was refused; with it, a chat line whose tool_choice is
    "none" (a plain line's or an OpenAI body's) renders without its tools, as the line without them, in `run`'s
    ingest and in `run --ray`'s preprocess alike; a null or absent tool_choice, a forced one and a job without the
    option keep them."""
    from batchllm.inputs import prompt_processor_for
    from batchllm.io.ingest import prepare_lines
    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, _CliPreprocess

    prompts = prompt_processor_for(None)
    monkeypatch.setattr(prompts.tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                                            "{% if tools %}|{{ tools | length }} tools{% endif %}")
    body = {**CHAT, "tool_choice": "none"}
    lines = [{"id": "none", **CHAT, "tool_choice": "none"}, {"id": "null", **CHAT, "tool_choice": None},
             {"id": "absent", **CHAT}, {"id": "forced", **CHAT, "tool_choice": "required", "max_tokens": 4},
             {"custom_id": "oa", "url": CHAT_URL, "body": body}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    def texts(**kwargs) -> dict:
        result = prepare_lines(path, prompts, {"max_tokens": 4}, None, serving=LineServing(**kwargs))
        assert not result.errors, result.errors
        return {v.line.request_id: prompts.tokenizer.decode(v.prompt.array.tolist()) for v in result.valid}

    kept = {"none": "Is water wet?|2 tools", "null": "Is water wet?|2 tools", "absent": "Is water wet?|2 tools",
            "forced": "Is water wet?|2 tools", "oa": "Is water wet?|2 tools"}
    assert texts() == kept
    assert texts(exclude_tools_when_none=True) == {**kept, "none": "Is water wet?", "oa": "Is water wet?"}
    preprocess = _CliPreprocess({"max_tokens": 4}, None, LineServing({"tone": "dry"}, exclude_tools_when_none=True))
    rows = [preprocess({RAW: json.dumps(line).encode(), LINE: i, DUPLICATE: None}) for i, line in enumerate(lines)]
    assert [row["chat_template_kwargs"] for row in rows] == [
        {"tone": "dry"}, {"tone": "dry", "tools": TOOLS}, {"tone": "dry", "tools": TOOLS},
        {"tone": "dry", "tools": TOOLS}, {"tone": "dry"}]


HERMES_CALL = '<tool_call>\n{"name": "verdict", "arguments": {"ok": true}}\n</tool_call>'
AUTO_HERMES = AutoToolChoice(parser="hermes")


def message_and_finish(choice: dict) -> tuple[dict, str]:
    return choice["message"], choice["finish_reason"]


def test_an_auto_answer_is_read_by_the_jobs_parser_into_vllms_message():
    """"auto" failed every line; served with --enable-auto-tool-choice --tool-call-parser hermes, the text answer is
    read as vLLM 0.26's server reads it: the calls (chatcmpl-tool- ids), the text before them as the content (None
    where blank), finish_reason "tool_calls" wherever calls were read (a length-cut answer too); an answer without
    calls, or one the parser cannot read whole, is all content with the engine's finish_reason."""
    body = success_record("c", CHAT_URL, "m", output(
        ("Let me check.\n" + HERMES_CALL, "stop"), ("\n\n" + HERMES_CALL, "length"), ("It is wet.", "stop"),
        ('<tool_call>{"name": "verdict", "arguments": {', "length")), 3, tool_call=AUTO_HERMES)["response"]["body"]
    called, blank, text, cut = (message_and_finish(c) for c in body["choices"])
    assert list(called[0]) == ["role", "content", "refusal", "annotations", "audio", "function_call", "tool_calls",
                               "reasoning"]
    assert called[0]["content"] == "Let me check.\n" and called[1] == "tool_calls"
    (call,) = called[0]["tool_calls"]
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", call["id"])
    assert call == {"id": call["id"], "type": "function", "function": {"name": "verdict", "arguments": '{"ok": true}'}}
    assert blank[0]["content"] is None and len(blank[0]["tool_calls"]) == 1 and blank[1] == "tool_calls"
    assert text == ({"role": "assistant", "content": "It is wet.", "refusal": None, "annotations": None, "audio": None,
                     "function_call": None, "reasoning": None}, "stop")
    assert "tool_calls" not in cut[0] and cut[0]["content"].startswith("<tool_call>") and cut[1] == "length"


def test_auto_keeps_the_first_call_without_parallel_calls_and_a_null_choice_drops_them():
    """parallel_tool_calls false keeps the first call (vLLM's maybe_filter_parallel_tool_calls); an OpenAI body's
    null tool_choice beside tools is text where the job has no parser, and where it has one vLLM's server runs the
    parser (null counts as auto) but writes only the content it leaves: no calls, the engine's finish_reason."""
    two = HERMES_CALL + "\n" + HERMES_CALL.replace("verdict", "ping")
    first = success_record("c", CHAT_URL, "m", output((two, "stop")), 3,
                           tool_call=AutoToolChoice(False, parser="hermes"))["response"]["body"]["choices"][0]
    assert [c["function"]["name"] for c in first["message"]["tool_calls"]] == ["verdict"]
    null = body_to_request(CHAT_URL, {**CHAT, "tool_choice": None}).tool_call
    assert null == AutoToolChoice(null_choice=True) and served_tool_choice(null, None) is None
    served = served_tool_choice(null, "hermes")
    choice = success_record("c", CHAT_URL, "m", output(("Sure.\n" + two, "stop")), 3,
                            tool_call=served)["response"]["body"]["choices"][0]
    assert message_and_finish(choice)[1] == "stop" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == "Sure.\n"


def test_the_tool_parser_reads_the_content_after_the_reasoning_is_split_off():
    """vLLM splits the reasoning first (--reasoning-parser), then runs the tool parser on the content: Qwen3's
    thinking goes to `reasoning` and its <tool_call> after it to the calls (also where a <tool_call> ends the
    thinking without </think>)."""
    from batchllm.io.reasoning import reasoning_parser_named

    qwen3 = reasoning_parser_named("qwen3")
    body = success_record("c", CHAT_URL, "m", output(
        ("<think>\nIs it wet?\n</think>\n\n" + HERMES_CALL, "stop"), ("I should ask." + HERMES_CALL, "stop")), 3,
        reasoning_split=lambda text: qwen3(text, None), tool_call=AUTO_HERMES)["response"]["body"]
    (closed, finish), (opened, _) = (message_and_finish(c) for c in body["choices"])
    assert (closed["reasoning"], closed["content"], finish) == ("\nIs it wet?\n", None, "tool_calls")
    assert (opened["reasoning"], opened["content"]) == ("I should ask.", None)
    assert [c["function"]["name"] for m in (closed, opened) for c in m["tool_calls"]] == ["verdict", "verdict"]


def test_a_plain_auto_lines_record_adds_the_parsed_calls_beside_its_whole_text():
    line = parse_line(json.dumps({"id": 1, **CHAT, "tool_choice": "auto", "parallel_tool_calls": False}).encode(),
                      1)
    assert line.tool_call == AutoToolChoice(False) and "structured_outputs" not in line.sampling_overrides
    served = served_tool_choice(line.tool_call, "llama3_json")
    text = '<|python_tag|>{"name": "ping", "parameters": {}}; {"name": "verdict", "parameters": {"ok": 1}}'
    record = result_record(1, output((text, "stop")), 3, served)
    assert record["text"] == text and record["finish_reason"] == "tool_calls"
    assert [c["function"] for c in record["tool_calls"]] == [{"name": "ping", "arguments": "{}"}]
    plain = result_record(1, output(("No call.", "stop")), 3, served)
    assert plain["tool_calls"] == [] and plain["finish_reason"] == "stop" and plain["text"] == "No call."


def test_a_plain_auto_lines_calls_are_read_after_the_reasoning_split_and_its_text_stays_whole():
    """Under --reasoning-parser a plain "auto" line's parser read the whole answer, thinking included (a call the
    model only thought about was a call; a tag in the thinking spoilt the real call), where an OpenAI line's reads
    the content after the split, as vLLM does; now both read the content. The record's `text` stays whole."""
    from batchllm.io.ingest import ResponseShape, record_for

    line = parse_line(json.dumps({"id": 1, **CHAT, "tool_choice": "auto"}).encode(), 1)
    names = ResponseShape("m", serving=LineServing(reasoning_parser="deepseek_r1", auto_tool_parser="hermes"))
    thought = "<think>I could write " + HERMES_CALL + " but no.</think>It is wet."
    tagged = "<think>I'll use <tool_call> tags.</think>\n" + HERMES_CALL
    record = record_for(line, output((thought, "stop"), (tagged, "stop")), names)
    assert (record["text"], record["tool_calls"], record["finish_reason"]) == (thought, [], "stop")
    (second,) = record["outputs"][1]["tool_calls"]
    assert second["function"]["name"] == "verdict" and record["outputs"][1]["finish_reason"] == "tool_calls"
    assert record["outputs"][1]["text"] == tagged
    body = {"custom_id": "c", "url": CHAT_URL, "body": {**CHAT, "tool_choice": "auto"}}
    openai = record_for(parse_line(json.dumps(body).encode(), 2), output((thought, "stop"), (tagged, "stop")),
                        names)["response"]["body"]["choices"]
    assert ["tool_calls" in c["message"] for c in openai] == [False, True]  # (the OpenAI line's, as before)


def test_a_job_serves_auto_lines_with_its_parser_in_run_and_in_ray(tmp_path):
    """With the job's parser (`LineServing.auto_tool_parser`, Ray's preprocess alike) an "auto" line is
    taken, unconstrained, and under hermes every line whose tools are called or parsed gets skip_special_tokens
    false (vLLM's hermes adjust_request); without it the line fails as before, and an "auto" line without tools
    fails as vLLM's request model fails it."""
    from batchllm.inputs import prompt_processor_for
    from batchllm.io.ingest import ResponseShape, prepare_lines
    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, _CliPreprocess

    lines = [{"id": "auto", **CHAT, "tool_choice": "auto"}, {"id": "none", **CHAT, "tool_choice": "none"},
             {"id": "forced", **CHAT, "tool_choice": "required"},
             {"id": "bare", "messages": CHAT["messages"], "tool_choice": "auto"},
             {"custom_id": "absent", "url": CHAT_URL, "body": CHAT}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    prompts = prompt_processor_for(None)
    served = prepare_lines(path, prompts, {"max_tokens": 4}, None, serving=LineServing(auto_tool_parser="hermes"))
    skips = {v.line.request_id: v.params.skip_special_tokens for v in served.valid}
    assert skips == {"auto": False, "none": True, "forced": False, "absent": False}
    assert [e.message for e in served.errors] == ["line 4: 'tool_choice' \"auto\" needs 'tools' (as vLLM's request "
                                                  "model says)"]
    names = ResponseShape("m", serving=LineServing(auto_tool_parser="hermes"))
    assert {v.line.request_id: names.tool_call_of(v.line).parser
            for v in served.valid if isinstance(v.line.tool_call, AutoToolChoice)} == {"auto": "hermes",
                                                                                       "absent": "hermes"}
    refused = prepare_lines(path, prompts, {"max_tokens": 4}, None)
    assert sorted(e.request_id for e in refused.errors) == ["absent", "auto", "bare"]
    assert all("needs a tool-call parser" in e.message for e in refused.errors)
    rows = [{RAW: json.dumps(line).encode(), LINE: i + 1, DUPLICATE: None} for i, line in enumerate(lines)]
    ray_rows = [_CliPreprocess({"max_tokens": 4}, None, LineServing(auto_tool_parser="hermes"))(row) for row in rows]
    assert [row.get("error") or row["sampling_params"]["skip_special_tokens"] for row in ray_rows] == [
        False, True, False, "line 4: 'tool_choice' \"auto\" needs 'tools' (as vLLM's request model says)", False]
    assert "needs a tool-call parser" in _CliPreprocess({"max_tokens": 4}, None)(rows[0])["error"]


def test_qwen3s_reasoning_parser_shows_special_tokens_in_every_chat_line_in_run_and_in_ray(tmp_path, monkeypatch):
    """vLLM 0.26's qwen3 reasoning parser (a parser engine adapter) sets skip_special_tokens false on every chat
    request its server gets, whatever the tools or the line's own value; deepseek_r1 and completions are left as
    they are. Chat lines kept skip_special_tokens true here; now `run` (`prepare_lines`) and `run --ray`
    (`_CliPreprocess`, built by `run_jsonl_on_ray` with the job's parser) serve them as vLLM does."""
    import ray.data

    from batchllm.inputs import prompt_processor_for
    from batchllm.io.ingest import ResponseShape, prepare_lines
    from batchllm.ray import jsonl_job
    from batchllm.ray.config import ProcessorConfig
    from batchllm.ray.jsonl_job import DUPLICATE, LINE, RAW, _CliPreprocess

    messages = CHAT["messages"]
    lines = [{"id": "plain", "messages": messages, "skip_special_tokens": True}, {"id": "prompt", "prompt": "Hi"},
             {"custom_id": "chat", "url": CHAT_URL, "body": {"messages": messages}},
             {"custom_id": "completion", "url": COMPLETIONS_URL, "body": {"prompt": "Hi"}}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    rows = [{RAW: json.dumps(line).encode(), LINE: i + 1, DUPLICATE: None} for i, line in enumerate(lines)]
    shown = {"plain": False, "prompt": True, "chat": False, "completion": True}
    for parser, expected in (("qwen3", shown), ("deepseek_r1", dict.fromkeys(shown, True)),
                             (None, dict.fromkeys(shown, True))):
        serving = LineServing(reasoning_parser=parser)
        served = prepare_lines(path, prompt_processor_for(None), {"max_tokens": 4}, None, serving=serving)
        skips = {v.line.request_id: v.params.skip_special_tokens for v in served.valid}
        assert skips == expected, parser
        ray_skips = [_CliPreprocess({"max_tokens": 4}, None, serving)(row)["sampling_params"]["skip_special_tokens"]
                     for row in rows]
        assert ray_skips == list(skips.values()), parser

    built = {}

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        built["preprocess"] = args[1]
        raise Stop

    context = ray.data.DataContext.get_current()
    before = context.checkpoint_config
    monkeypatch.setattr(jsonl_job, "Processor", capture)
    with pytest.raises(Stop):
        jsonl_job.run_jsonl_on_ray(path, tmp_path / "out", ProcessorConfig(), {"max_tokens": 4}, None,
                                   ResponseShape("m", serving=LineServing(reasoning_parser="qwen3")), "plain")
    assert built["preprocess"](rows[0])["sampling_params"]["skip_special_tokens"] is False
    assert context.checkpoint_config is before  # (a job that fails while it is set up restores the driver's)


def test_a_plain_n2_records_first_call_has_one_id_at_the_top_and_in_outputs():
    """The top level is outputs[0]'s fields; each was read from the answer on its own, so the same call got two
    different "chatcmpl-tool-" ids. Now the top level reuses outputs[0]'s: one call, one id."""
    served = served_tool_choice(AutoToolChoice(), "hermes")
    record = result_record(1, output((HERMES_CALL, "stop"), ("No call.", "stop")), 3, served)
    first = record["outputs"][0]
    assert {key: record[key] for key in first} == first
    assert record["tool_calls"][0]["id"] == first["tool_calls"][0]["id"]
    assert record["outputs"][1]["tool_calls"] == [] and record["outputs"][1]["finish_reason"] == "stop"


def test_mistral_jobs_give_their_calls_mistrals_nine_character_ids_and_a_called_answer_its_cut_content():
    """vLLM's MistralToolCall ids (9 letters and digits) for an "auto" line's calls, and MistralParser backfills
    forced calls' ids the same way; an answer whose [TOOL_CALLS] parts hold no call is no call, but its content is
    what the parser cut (vLLM's tools_called), with the engine's finish_reason. Other parsers keep chatcmpl-tool-."""
    auto = served_tool_choice(body_to_request(CHAT_URL, {**CHAT, "tool_choice": "auto"}).tool_call, "mistral")._replace(
        reader="mistral_v11")  # (as the record writers read a v11 tokenizer's answers: `for_tokenizer`)
    choices = success_record("c", CHAT_URL, "m", output(
        ('Sure.[TOOL_CALLS]verdict[ARGS]{"ok": true}', "stop"), ("Hm.[TOOL_CALLS]nothing", "stop")), 3,
        tool_call=auto)["response"]["body"]["choices"]
    (call,) = choices[0]["message"]["tool_calls"]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", call["id"]) and choices[0]["message"]["content"] == "Sure."
    assert call["function"] == {"name": "verdict", "arguments": '{"ok": true}'} and choices[0]["finish_reason"] == (
        "tool_calls")
    assert "tool_calls" not in choices[1]["message"] and choices[1]["message"]["content"] == "Hm."
    assert choices[1]["finish_reason"] == "stop"
    forced = served_tool_choice(ForcedToolCall("verdict"), "mistral")
    assert re.fullmatch(r"[A-Za-z0-9]{9}", tool_calls_of('{"ok": true}', forced)[0]["id"])
    hermes_forced = served_tool_choice(ForcedToolCall("verdict"), "hermes")
    assert re.fullmatch(r"chatcmpl-tool-[0-9a-f]{16}", tool_calls_of('{"ok": true}', hermes_forced)[0]["id"])


def test_a_jobs_mistral_reader_follows_the_tokenizer_and_an_answer_its_parser_raises_on_fails_the_line():
    """The record writers read a mistral job's answers as the tokenizer's version needs (`for_tokenizer`: [ARGS]
    in the vocabulary, v11); an answer vLLM's mistral parser raises on (two [TOOL_CALLS] before v11) raises
    ToolParserError out of the record, which `run` and Ray turn into the line's error record."""
    from batchllm.io.ingest import ResponseShape
    from batchllm.io.tool_parsers import ToolParserError

    class Tokenizer:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    shape = ResponseShape("m", serving=LineServing(auto_tool_parser="mistral"))
    v11 = shape.for_tokenizer(Tokenizer({"[TOOL_CALLS]": 1, "[ARGS]": 2}))
    assert v11.tool_reader == "mistral_v11" and v11.serving == shape.serving  # (the job's parser stays its name)
    assert shape.for_tokenizer(Tokenizer({"[TOOL_CALLS]": 1})) == shape and shape.for_tokenizer(None) == shape
    line = parse_line(json.dumps({"id": 1, **CHAT, "tool_choice": "auto"}).encode(), 1)
    served = v11.tool_call_of(line)
    assert (served.parser, served.reader) == ("mistral", "mistral_v11") and shape.tool_call_of(line).reader is None
    record = result_record(1, output(('[TOOL_CALLS]verdict[ARGS]{"ok": true}', "stop")), 3, served)
    assert [call["function"]["name"] for call in record["tool_calls"]] == ["verdict"]
    assert re.fullmatch(r"[A-Za-z0-9]{9}", record["tool_calls"][0]["id"])  # (the ids of the job's parser: mistral)
    with pytest.raises(ToolParserError):
        result_record(1, output(("[TOOL_CALLS][][TOOL_CALLS][]", "stop")), 3, shape.tool_call_of(line))


def test_plan_reads_auto_lines_as_run_serves_them(tmp_path, capsys):
    """`plan` takes run's tool-calling flags and --reasoning-parser and reads the lines as `run` serves them
    (`cli.line_serving`): an "auto" line is planned where `run` would answer it and fails where `run` would fail it;
    a parser the tokenizer cannot serve is refused at start, as `run` refuses it."""
    from batchllm.cli import main

    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "auto", **CHAT, "tool_choice": "auto"}) + "\n"
                    + json.dumps({"id": "text", "prompt": "Hi"}) + "\n")

    def plan(*flags) -> tuple[int, dict, str]:
        code = main(["plan", str(path), "--json", *flags])
        out, err = capsys.readouterr()
        return code, json.loads(out) if code in (0, 1) else {}, err

    code, refused, _ = plan()  # (1: a line failed, as run's status says)
    assert code == 1 and (refused["num_requests"], refused["num_lines_failed"]) == (1, 1)
    code, served, _ = plan("--enable-auto-tool-choice", "--tool-call-parser", "hermes")
    assert code == 0 and (served["num_requests"], served["num_lines_failed"]) == (2, 0)
    code, _, err = plan("--enable-auto-tool-choice", "--tool-call-parser", "llama3_json")  # (no <|python_tag|>)
    assert code == 2 and "the tokenizer has no <|python_tag|> token" in err
    code, _, err = plan("--reasoning-parser", "deepseek_r1")  # (nor <think>)
    assert code == 2 and "the tokenizer has no <think> or </think> token" in err
    code, served, _ = plan("--reasoning-parser", "qwen3")  # (vLLM's qwen3 splits the text: it needs no token)
    assert code == 1 and (served["num_requests"], served["num_lines_failed"]) == (1, 1)
