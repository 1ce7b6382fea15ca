"""vLLM 0.26's tool-call parsers (`io.tool_parsers`), which read an "auto" line's answer as its tool calls: each on
the strings vLLM's Hermes2ProToolParser and Llama3JsonToolParser code paths read (one call, several, text before a
call, malformed JSON read as plain content, "arguments" or "parameters"), and its PythonicToolParser,
Llama4PythonicToolParser and MistralToolParser's (a Hugging Face tokenizer's two formats); the expected values of
the last three were checked against vLLM 0.26.0's own classes, run on these strings."""

from __future__ import annotations

import pytest

from batchllm.io.tool_parsers import (
    SKIPS_NO_SPECIAL_TOKENS,
    ParsedAnswer,
    ToolParserError,
    check_tokenizer,
    hermes,
    llama3_json,
    llama4_pythonic,
    mistral,
    mistral_v11,
    pythonic,
    reader_for,
    tool_parser_named,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Dallas", "unit": "fahrenheit"}}'
WEATHER_ARGS = '{"city": "Dallas", "unit": "fahrenheit"}'


@pytest.mark.parametrize("text, expected", [
    (f"<tool_call>\n{WEATHER}\n</tool_call>", ParsedAnswer([("get_weather", WEATHER_ARGS)], None)),
    (f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n"
     '{"name": "get_time", "arguments": {"zone": "Zürich"}}\n</tool_call>',
     ParsedAnswer([("get_weather", WEATHER_ARGS), ("get_time", '{"zone": "Zürich"}')], None)),  # (not \\u-escaped)
    (f"Let me check.\n<tool_call>{WEATHER}</tool_call>", ParsedAnswer([("get_weather", WEATHER_ARGS)],
                                                                      "Let me check.\n")),
    (f"<tool_call>{WEATHER}", ParsedAnswer([("get_weather", WEATHER_ARGS)], None)),  # (unclosed: to the end)
    ('<tool_call>{"name": "f", "arguments": "x"}</tool_call>', ParsedAnswer([("f", '"x"')], None)),
    ('<tool_call>{"name":"f","arguments":{"a":[1,2.5,null]}}</tool_call>',
     ParsedAnswer([("f", '{"a": [1, 2.5, null]}')], None)),  # (re-serialized as vLLM's json.dumps writes it)
])
def test_hermes_reads_tool_call_blocks_and_the_text_before_them(text, expected):
    assert hermes(text) == expected


@pytest.mark.parametrize("text", [
    "It is sunny in Dallas.",  # (no <tool_call>: content as it is)
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # malformed JSON
    f"<tool_call>{WEATHER}</tool_call><tool_call>not json</tool_call>",  # one bad block fails them all
    '<tool_call>{"name": "get_weather"}</tool_call>',  # no arguments
    '<tool_call>{"name": "get_weather", "parameters": {}}</tool_call>',  # ("parameters" is llama3_json's)
    '<tool_call>{"name": 7, "arguments": {}}</tool_call>',  # a name that is no string (vLLM's model refuses it)
    "<tool_call>[1, 2]</tool_call>", "<tool_call></tool_call>", "Thinking...\n<tool_call>",
])
def test_hermes_reads_an_answer_it_cannot_parse_whole_as_plain_content(text):
    assert hermes(text) == ParsedAnswer([], text)


@pytest.mark.parametrize("text, expected", [
    ('{"name": "get_weather", "parameters": {"city": "Dallas"}}', [("get_weather", '{"city": "Dallas"}')]),
    (f"<|python_tag|>{WEATHER}", [("get_weather", WEATHER_ARGS)]),
    (f'{WEATHER}; {{"name": "get_time", "parameters": {{}}}}', [("get_weather", WEATHER_ARGS), ("get_time", "{}")]),
    (f"Sure, calling it now: {WEATHER}", [("get_weather", WEATHER_ARGS)]),  # (text around the calls is dropped)
    ('{"name": "f", "arguments": {"x": {"y": {}}}, "parameters": 1}', [("f", '{"x": {"y": {}}}')]),  # arguments first
])
def test_llama3_json_reads_every_json_object_as_a_call_and_leaves_no_content(text, expected):
    assert llama3_json(text) == ParsedAnswer(expected, None)


@pytest.mark.parametrize("text", [
    "It is sunny.",  # (no "{" and no <|python_tag|>)
    "<|python_tag|>",
    '{"name": "get_weather", "arguments": {"city": ',  # cut short
    '{"city": "Dallas"}',  # no name
    '{"name": "get_weather"}',  # neither arguments nor parameters
    f"Use {{city}} here. {WEATHER}",  # a "{" that starts no JSON object fails every call
    f'{WEATHER}; {{"name": "x"}}',
    '{"name": ["f"], "arguments": {}}',
    # two objects with nothing between: vLLM 0.26 skips every "{" at or before the end of the object read last,
    # so the second object's own "{" (right at that end) is skipped and its inner "{}" has no name: all content
    f'{WEATHER}{{"name": "get_time", "parameters": {{}}}}',
])
def test_llama3_json_reads_an_answer_it_cannot_parse_whole_as_plain_content(text):
    assert llama3_json(text) == ParsedAnswer([], text)


def test_parsers_are_chosen_by_vllms_names_and_their_tokens_checked():
    assert tool_parser_named("hermes") is hermes and tool_parser_named("llama4_json") is llama3_json
    assert tool_parser_named("mistral") is mistral and tool_parser_named("mistral_v11") is mistral_v11
    with pytest.raises(ValueError, match=r"'granite' is not supported .*supported: hermes, llama3_json, llama4_json, "
                       "pythonic, llama4_pythonic, mistral"):
        tool_parser_named("granite")
    check_tokenizer("llama3_json", {"<|python_tag|>": 5})
    check_tokenizer("hermes", {})  # (reads text: needs no token)
    with pytest.raises(ValueError, match=r"the tokenizer has no <\|python_tag\|> token"):
        check_tokenizer("llama3_json", {"<think>": 1})


@pytest.mark.parametrize("text, expected", [
    ('[get_weather(city="Dallas", unit="f")]', [("get_weather", '{"city": "Dallas", "unit": "f"}')]),
    ('[f(a=1), g(b=[1, 2.5, None], c={"k": {"n": null}}, d=true)]',  # (null/true/false names read as JSON's)
     [("f", '{"a": 1}'), ("g", '{"b": [1, 2.5, null], "c": {"k": {"n": null}}, "d": true}')]),
    ("[f()]", [("f", "{}")]),
    ("[g(a=1), f(2)]", [("g", '{"a": 1}'), ("f", "{}")]),  # (positional arguments dropped, once the regex matched)
    ("[f(a=1), a.b(c=2)]", [("f", '{"a": 1}'), ("a.b", '{"c": 2}')]),  # (a dotted name kept)
    ('[f(a={1: "x", None: 2})]', [("f", '{"a": {"1": "x", "null": 2}}')]),  # (json.dumps's keys)
    ('[f(a=1, **{"b": 2})]', [("f", '{"a": 1, "null": {"b": 2}}')]),  # (a ** argument's key is None)
    ("[f(a=1e999)]", [("f", '{"a": Infinity}')]),
    ("[f(a=1)]; [g(b=2)]", [("f", '{"a": 1}')]),  # (the first statement only)
    ("[f(a=1), g(b=2)]  ", [("f", '{"a": 1}'), ("g", '{"b": 2}')]),
])
def test_pythonic_reads_a_list_of_python_calls_with_literal_arguments(text, expected):
    assert pythonic(text) == ParsedAnswer(expected, None)


@pytest.mark.parametrize("text", [
    "Hello", "f(a=1)", " [f(a=1)]", "[]", "[f(a=1)",  # (not a list of calls at the start: vLLM's regex)
    "[f(1)]",  # (no keyword: the regex does not match)
    "[f(a=-1)]", "[f(a=x)]", "[f(a=(1, 2))]", "[f(a=1+2j)]", "[f(a=set())]", "[f(a={x: 1})]",  # not literals
    '[f(a="x"),\n g(b=[f(c=1)])]',  # (a call inside an argument)
    '[f(a=b"x")]', "[f(a=...)]",  # (literals json.dumps refuses)
    "[f(a=1)] trailing", "[f(a=1)]\n\nSome text",  # (Python that does not parse)
    "[f(a=1), 3]", "[f(a=1), a[0](c=2)]",  # (an item that is no call, a call of no name)
])
def test_pythonic_reads_an_answer_it_cannot_parse_whole_as_plain_content(text):
    assert pythonic(text) == ParsedAnswer([], text)


def test_pythonic_reads_an_answer_whose_regex_match_times_out_as_text(monkeypatch):
    """vLLM's regex match has a 1 s timeout (VLLM_TOOL_PARSE_REGEX_TIMEOUT_SECONDS), after which the answer is
    text: the match is given the same timeout, and its TimeoutError reads the answer as content."""
    import batchllm.io.tool_parsers as tool_parsers

    class _Slow:
        def match(self, text, timeout):
            assert timeout == 1
            raise TimeoutError

    monkeypatch.setattr(tool_parsers, "_PYTHONIC_CALLS", _Slow())
    assert pythonic("[f(a=1)]") == ParsedAnswer([], "[f(a=1)]")


@pytest.mark.parametrize("text, expected", [
    ("<|python_start|>[f(a=1)]<|python_end|>", ParsedAnswer([("f", '{"a": 1}')], None)),
    ("<|python_start|>[f(a=1)]", ParsedAnswer([("f", '{"a": 1}')], None)),
    ("[f(a=1)]<|python_end|>", ParsedAnswer([], "[f(a=1)]<|python_end|>")),  # (removed only after a start)
    ("x<|python_start|>[f(a=1)]<|python_end|>", ParsedAnswer([], "x<|python_start|>[f(a=1)]<|python_end|>")),
    ("<|python_start|>hello<|python_end|> there<|python_end|>", ParsedAnswer([], "hello there")),  # (content: cut)
    ("<|python_start|>[f(a=-1)]<|python_end|>", ParsedAnswer([], "[f(a=-1)]")),
    ("<|python_start|><|python_start|>[f(a=1)]", ParsedAnswer([], "<|python_start|>[f(a=1)]")),  # (one start cut)
])
def test_llama4_pythonic_reads_pythonic_calls_inside_llama4s_python_tags(text, expected):
    assert llama4_pythonic(text) == expected


MISTRAL_CALL = '{"name": "get_weather", "arguments": {"city": "Dallas"}}'


@pytest.mark.parametrize("text, expected", [
    (f"[TOOL_CALLS] [{MISTRAL_CALL}]", ParsedAnswer([("get_weather", '{"city": "Dallas"}')], None, True)),
    (f'Sure.[TOOL_CALLS][{MISTRAL_CALL}, {{"name": "g"}}] trailing',  # ("arguments" {} where absent)
     ParsedAnswer([("get_weather", '{"city": "Dallas"}'), ("g", "{}")], "Sure.", True)),
    (f"[TOOL_CALLS] calls: [{MISTRAL_CALL}] ok", ParsedAnswer([("get_weather", '{"city": "Dallas"}')], None, True)),
    ('  [TOOL_CALLS][{"name": "f", "arguments": null}]', ParsedAnswer([("f", "null")], None, True)),
    ("[TOOL_CALLS][]", ParsedAnswer([], None, True)),  # (called, no call: the content is the parser's)
    ('[TOOL_CALLS]""', ParsedAnswer([], None, True)),
    ("no token", ParsedAnswer([], "no token")),
    ("hi [TOOL_CALLS] not json", ParsedAnswer([], "hi [TOOL_CALLS] not json")),  # (neither JSON nor [{...}])
    ("[TOOL_CALLS] [{bad}] ", ParsedAnswer([], "[TOOL_CALLS] [{bad}] ")),
    ("[TOOL_CALLS]", ParsedAnswer([], "[TOOL_CALLS]")),
])
def test_mistral_reads_a_json_list_after_its_token_for_a_tokenizer_without_args(text, expected):
    assert mistral(text) == expected


@pytest.mark.parametrize("text", [
    f"[TOOL_CALLS][{MISTRAL_CALL}][TOOL_CALLS][{MISTRAL_CALL}]",  # (two tokens: vLLM's ValueError)
    "[TOOL_CALLS]" + MISTRAL_CALL,  # (an object, not a list: its keys are iterated, TypeError)
    '[TOOL_CALLS][{"arguments": {}}]', '[TOOL_CALLS] calls: [{"arguments": 1}]',  # (no name: KeyError)
    "[TOOL_CALLS][1]", '[TOOL_CALLS]"abc"', "[TOOL_CALLS]42",  # (TypeError)
    '[TOOL_CALLS][{"name": 7}]',  # (a name that is no string: vLLM's ValidationError)
    "[TOOL_CALLS]null",  # (JSON null is read, and is no list: TypeError)
    "[TOOL_CALLS]" + "[" * 100_000 + "]" * 100_000,  # (nesting past Python's stack: RecursionError, not the job's end)
])
def test_mistral_raises_where_vllms_parser_raises_so_the_line_fails(text):
    with pytest.raises(ToolParserError, match="mistral tool parser"):
        mistral(text)


@pytest.mark.parametrize("text, expected", [
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Dallas"}', ParsedAnswer([("get_weather", '{"city": "Dallas"}')], None,
                                                                     True)),
    ('Hi[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g{}', ParsedAnswer([("f", '{"a": 1}'), ("g", "{}")], "Hi", True)),
    ('[TOOL_CALLS]f[ARGS]{"a": 1', ParsedAnswer([("f", '{"a": 1')], None, True)),  # (as written: not JSON-checked)
    (" \n[TOOL_CALLS]f{}x", ParsedAnswer([("f", "{}x")], None, True)),
    ("text[TOOL_CALLS]noargs", ParsedAnswer([], "text", True)),  # (a part without "{" is dropped)
    (f"[TOOL_CALLS][{MISTRAL_CALL}]", ParsedAnswer([("[", MISTRAL_CALL + "]")], None, True)),  # (v11 reads no list)
    ('[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{"a": 1}', ParsedAnswer([("f[CALL_ID]abc123XYZ", '{"a": 1}')], None,
                                                                     True)),
    ("plain", ParsedAnswer([], "plain")),
])
def test_mistral_reads_name_and_arguments_after_each_token_for_a_tokenizer_with_args(text, expected):
    assert mistral_v11(text) == expected


def test_mistral_picks_its_reader_by_the_vocabulary_and_needs_its_token_and_special_tokens():
    """vLLM's _is_pre_v11_tokeniser for a Hugging Face tokenizer: [ARGS] in the vocabulary reads v11's format; its
    constructor raises without [TOOL_CALLS]; its adjust_request turns skip_special_tokens off (the token would be
    dropped from the text)."""
    assert reader_for("mistral", {"[TOOL_CALLS]": 5}) == "mistral"
    assert reader_for("mistral", {"[TOOL_CALLS]": 5, "[ARGS]": 6}) == "mistral_v11"
    assert reader_for("hermes", {"[ARGS]": 6}) == "hermes" and reader_for(None, {}) is None
    check_tokenizer("mistral", {"[TOOL_CALLS]": 5})
    with pytest.raises(ValueError, match=r"has no \[TOOL_CALLS\] token .* does not write Mistral tool calls"):
        check_tokenizer("mistral", {"<s>": 1})
    check_tokenizer("pythonic", {}) or check_tokenizer("llama4_pythonic", {})
    assert set(SKIPS_NO_SPECIAL_TOKENS) == {"hermes", "mistral"}  # (parser names only: a reader is never served)
