"""vLLM 0.26's tool-call parsers (`io.tool_parsers`), which read an "auto" line's answer as its tool calls: each on
the strings vLLM's Hermes2ProToolParser and Llama3JsonToolParser code paths read (one call, several, text before a
call, malformed JSON read as plain content, "arguments" or "parameters")."""

from __future__ import annotations

import pytest

from batchllm.io.tool_parsers import ParsedAnswer, check_tokenizer, hermes, llama3_json, tool_parser_named

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
])
def test_llama3_json_reads_an_answer_it_cannot_parse_whole_as_plain_content(text):
    assert llama3_json(text) == ParsedAnswer([], text)


def test_parsers_are_chosen_by_vllms_names_and_their_tokens_checked():
    assert tool_parser_named("hermes") is hermes and tool_parser_named("llama4_json") is llama3_json
    with pytest.raises(ValueError, match=r"'mistral' is not supported .*supported: hermes, llama3_json, llama4_json"):
        tool_parser_named("mistral")
    check_tokenizer("llama3_json", {"<|python_tag|>": 5})
    check_tokenizer("hermes", {})  # (reads text: needs no token)
    with pytest.raises(ValueError, match=r"the tokenizer has no <\|python_tag\|> token"):
        check_tokenizer("llama3_json", {"<think>": 1})
