"""Ingest (io/ingest.py): whatever a line holds, it becomes a request or its own named error (issue 21)."""

from __future__ import annotations

import json
import math
import re
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchllm.io.ingest import LineServing, prepare_lines, sampling_params_for
from batchllm.io.job import ResumeState, encode_record
from batchllm.io.jsonl import BatchLine, LineError, parse_line, read_batch_lines, without_bom
from batchllm.sampling_params import SamplingParams


@lru_cache(maxsize=1)
def processor():
    from batchllm.inputs import prompt_processor_for

    return prompt_processor_for(None)


def ingest(data: bytes, defaults=None, seed=None):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(data)
        return prepare_lines(path, processor(), defaults or {"max_tokens": 4}, seed, ResumeState(), chunk=3)


SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])
TEXT = st.one_of(st.text(max_size=12), st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), SURROGATES,
                                                  st.text(max_size=4)))
NUMBERS = st.one_of(st.integers(), st.integers(min_value=-(2**80), max_value=2**80), st.floats(allow_nan=True),
                    st.sampled_from([2**64, 2**64 - 1, -(2**63) - 1, 2**70, 10**300, 0, -1, 1, True, False]))
JSON = st.recursive(st.one_of(st.none(), NUMBERS, TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
                    max_leaves=8)
KEYS = st.sampled_from(["id", "prompt", "messages", "prompt_token_ids", "custom_id", "url", "body", "method",
                        *SamplingParams.field_names()])
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", 3]),
                                           "content": st.one_of(TEXT, JSON)}), max_size=3)
BODY = st.fixed_dictionaries({"messages": MESSAGES}, optional={
    "max_tokens": NUMBERS, "temperature": NUMBERS, "n": NUMBERS, "seed": NUMBERS, "top_p": NUMBERS,
    "stop": JSON, "logprobs": st.one_of(st.booleans(), NUMBERS), "top_logprobs": NUMBERS, "model": JSON})
PLAIN_LINE = st.one_of(
    st.dictionaries(KEYS, JSON, max_size=6),
    st.fixed_dictionaries({"id": st.one_of(TEXT, st.integers()), "prompt": TEXT},
                          optional={k: st.one_of(NUMBERS, JSON) for k in SamplingParams.field_names()}),
    st.fixed_dictionaries({"id": TEXT, "messages": MESSAGES}),
    st.fixed_dictionaries({"id": TEXT, "prompt_token_ids": st.lists(NUMBERS, max_size=5)}),
    st.fixed_dictionaries({"custom_id": TEXT, "method": st.just("POST"),
                           "url": st.sampled_from(["/v1/chat/completions", "/v1/completions", "x"]), "body": BODY}),
)


def deep(depth: int, inside: bool) -> bytes:
    nest = b"[" * depth + b"]" * depth
    return b'{"id": "d", "prompt": "x", "stop": ' + nest + b"}" if inside else nest


LINE = st.one_of(
    PLAIN_LINE.map(lambda obj: json.dumps(obj).encode()),  # ensure_ascii: surrogates reach files as escapes
    st.binary(max_size=40),
    st.builds(deep, st.sampled_from([10, 500, 990, 5000, 100_000]), st.booleans()),
    st.builds(lambda n, k: b'{"id": "n", "prompt": "x", "%s": %s}' % (k.encode(), b"9" * n),
              st.integers(4000, 6000), st.sampled_from(["n", "seed", "max_tokens", "top_k"])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(LINE, min_size=1, max_size=4), st.one_of(st.none(), st.integers(-5, 5)))
def test_no_line_escapes_the_per_line_path(lines, seed):
    data = b"\n".join(lines) + b"\n"
    result = ingest(data, seed=seed)  # never raises
    # one record per non-blank line; a byte order mark opening the file is not a line's content
    lines_owed = sum(1 for raw in data.split(b"\n") if without_bom(raw).strip())
    assert len(result.valid) + len(result.errors) == lines_owed
    for error in result.errors:
        assert error.message.startswith(f"line {error.line_number}: ")
        json.loads(encode_record(error.record(result.file_format)))  # every error can be written
    for valid in result.valid:
        assert valid.params.n <= 1024 and math.isfinite(valid.params.temperature)
        encode_record({"id": valid.line.request_id}).decode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_parse_line_never_raises_on_bytes(raw):
    assert isinstance(parse_line(raw, 1), (BatchLine, LineError))


def test_an_unreadable_line_echoes_the_id_its_bytes_still_show():
    """A truncated or mis-encoded line was answered with custom_id null though its id was readable; a truncated
    line's column was counted from the line after it."""
    truncated = parse_line(b'{"custom_id": "trunc", "method": "POST", ', 4)
    assert (truncated.request_id, truncated.format) == ("trunc", "openai")
    assert truncated.message == "line 4: malformed JSON: Expecting property name enclosed in double quotes at column 42"
    raw = b'{"custom_id": "bad", "body": {"prompt": "caf\xe9"}}'
    latin1 = parse_line(raw, 5)
    assert latin1.request_id == "bad" and "not valid UTF-8" in latin1.message
    position = raw.index(bytes([0xE9])) + 1
    assert f"at byte {position} of the line" in latin1.message, "counted from 1, as JSON's columns"
    plain = parse_line(b'{"id": 17, "prompt": "x" ', 6)
    assert (plain.request_id, plain.format) == (17, None), "a plain line's id; the file's format decides"
    for raw in (b"garbage", b'{"custom_id": "\xe9t\xe9", ', b'{"prompt": "no id" ',
                b'{"id": 12', b'{"id": 1.5, "x": ',  # cut inside the id (12345), or no integer: not taken
                b'{"id": "\\uZZ", "x": \xff}',  # an escape JSON refuses
                b'{"messages": [{"tool_calls": [{"id": "call_1"}]}], '):  # a nested object's id is not the line's
        assert parse_line(raw, 7).request_id is None, raw
    nested_first = b'{"messages": [{"tool_calls": [{"id": "call_1"}]}], "id": "q1", "x": \xff}'
    assert parse_line(nested_first, 8).request_id == "q1"


def test_a_byte_order_mark_opening_any_line_is_skipped():
    """Notepad and Excel save UTF-8 with a BOM; the first request used to fail as malformed JSON, and so did the
    first line of each further file joined with `cat` (a BOM opening a line in the middle), plain and OpenAI."""
    from batchllm.io.ingest import count_input_lines

    bom = b"\xef\xbb\xbf"
    openai = b'{"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "Hi", "max_tokens": 2}}\n'
    data = bom + b'{"id": "a", "prompt": "Hi"}\r\n' + bom + b'{"id": "b", "prompt": "Hi"}\r\n' + bom + openai
    result = ingest(data)
    assert [v.line.request_id for v in result.valid] == ["a", "b", "c"] and not result.errors
    inside = ingest(b'{"id": "a", "prompt": "Hi"}' + bom + b"\n")  # (not at a line's start: still an error)
    assert len(inside.errors) == 1 and inside.errors[0].message.startswith("line 1: malformed JSON")
    with tempfile.TemporaryDirectory() as tmp:
        (path := Path(tmp) / "in.jsonl").write_bytes(bom + b"\n" + data + bom + b"\n")
        assert count_input_lines(path) == 3  # a BOM alone on a line is a blank line
        assert sum(1 for _ in read_batch_lines(path)) == 3


def test_the_sampling_cache_tells_values_of_different_types_apart():
    cache: dict = {}
    line = BatchLine(1, "a", "x", False, {"n": 1})
    assert sampling_params_for(line, {}, None, cache).n == 1
    for raw in (b'{"id": "d", "prompt": "x", "n": 1.0}',
                b'{"custom_id": "e", "url": "/v1/completions", "body": {"prompt": "x", "n": 1.0}}'):
        whole = parse_line(raw, 4).sampling_overrides["n"]
        assert whole == 1 and type(whole) is int, "an integer written as a float is read as one (pydantic's way)"
    for odd in ({"n": True}, {"n": 1.5}, {"ignore_eos": 1}, {"stop": [[["x"]]]}, {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            sampling_params_for(BatchLine(2, "b", "x", False, odd), {}, None, cache)
    deep_stop = json.loads("[" * 900 + "]" * 900)  # too deep to render as a key; refused by name
    with pytest.raises(ValueError, match="stop"):
        sampling_params_for(BatchLine(3, "c", "x", False, {"stop": deep_stop}), {}, None, cache)


def test_a_prompt_the_tokenizer_refuses_fails_alone():
    prompts = processor()
    results = prompts.tokenize_many(["hello", "bad \ud800", "world"], [1, 2, 3])
    assert isinstance(results[1], ValueError) and "prompt 2" in str(results[1])
    assert results[0].token_ids and results[2].token_ids


def test_openai_content_parts_of_text_are_joined_and_other_parts_named():
    def line(content):
        obj = {"custom_id": "c", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": content}]}}
        return parse_line(json.dumps(obj).encode(), 1)

    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    ok = line(parts)  # (kept as given: a template that loops over content gets the parts, the others the text)
    assert isinstance(ok, BatchLine) and ok.prompt == [{"role": "user", "content": parts}]
    prompts = processor()
    assert prompts.apply_chat_template(ok.prompt) == prompts.apply_chat_template(
        [{"role": "user", "content": "Hello\nworld"}])
    image = line([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "u"}}])
    assert isinstance(image, LineError) and "messages[0].content[1] has type 'image_url'" in image.message
    assert "content[0].text must be a string" in line([{"type": "text", "text": 3}]).message
    empty = line([{"type": "text", "text": "a"}, {"type": "text", "text": ""}, "", {"type": "text", "text": "b"}])
    assert prompts.apply_chat_template(empty.prompt) == prompts.apply_chat_template(
        [{"role": "user", "content": "a\nb"}]), "empty parts are left out, as vLLM leaves them (was a\\n\\n\\nb)"
    assert "must be a string, a list of text parts or null" in line(7).message
    for empty in (None, []):  # an assistant turn that only called tools: empty text, as in vLLM (was refused)
        assert prompts.apply_chat_template(line(empty).prompt) == prompts.apply_chat_template(
            [{"role": "user", "content": ""}])
    chat = ingest((json.dumps({"custom_id": "c", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}}) + "\n").encode())
    assert len(chat.valid) == 1 and not chat.errors
    # the parts vLLM reads as text (a Responses API export, a history's refusal): each failed its line
    textual = [{"type": "input_text", "text": "Hello"}, "world", {"type": "output_text", "text": "a"},
               {"type": "refusal", "refusal": "b"}, {"type": "thinking", "thinking": "c"},
               {"type": "text", "text": None}, {"type": "refusal", "refusal": None}]
    taken = line(textual)
    assert isinstance(taken, BatchLine), taken
    assert prompts.apply_chat_template(taken.prompt) == prompts.apply_chat_template(
        [{"role": "user", "content": "Hello\nworld\na\nb\nc"}])
    assert prompts.apply_chat_template(line([{"type": "thinking", "text": "x"}, "y"]).prompt) == (
        prompts.apply_chat_template([{"role": "user", "content": "y"}])), "a part without its text is skipped"
    assert "content[0].text must be a string" in line([{"type": "text", "text": 3}]).message


def test_plain_lines_and_llm_chat_take_text_parts_as_openai_lines_do():
    """Plain lines and LLM.chat used to fail in the chat template ('can only concatenate str (not "list")')."""
    prompts = processor()
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    joined = [{"role": "user", "content": "Hello\nworld"}]
    assert prompts.apply_chat_template(parts) == prompts.apply_chat_template(joined)
    with pytest.raises(ValueError, match=r"conversation 4: messages\[0\]\.content must be a string"):
        prompts.apply_chat_template([{"role": "user", "content": 5}], 4)
    result = ingest((json.dumps({"id": "p", "messages": parts}) + "\n"
                     + json.dumps({"id": "q", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
                     + "\n").encode())
    assert [v.line.request_id for v in result.valid] == ["p"]
    assert result.valid[0].prompt.token_ids.tolist() == prompts.tokenize_prompt(
        prompts.apply_chat_template(joined)).token_ids
    assert len(result.errors) == 1 and "messages[0].content[0] has type 'image_url'" in result.errors[0].message


def test_logprobs_above_max_logprobs_fail_their_line_as_in_vllm():
    """`"logprobs": 100000` used to run, writing the whole vocabulary (6.6 MB) per generated token."""
    from batchllm.inputs import PromptProcessor

    base = processor()
    capped = PromptProcessor(base.tokenizer, base.vocab_size, base.max_model_len, max_logprobs=20)
    lines = [{"id": "a", "prompt": "x", "logprobs": 20, "prompt_logprobs": 20},
             {"id": "b", "prompt": "x", "logprobs": 100000},
             {"id": "c", "prompt": "x", "prompt_logprobs": 21},
             {"custom_id": "d", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}}]
    with tempfile.TemporaryDirectory() as tmp:
        (path := Path(tmp) / "in.jsonl").write_text("".join(json.dumps(o) + "\n" for o in lines))
        result = prepare_lines(path, capped, {"max_tokens": 4}, None)
        assert len(prepare_lines(path, base, {"max_tokens": 4}, None).valid) == 4  # -1: no cap
    assert [v.line.request_id for v in result.valid] == ["a"]
    assert [e.message for e in result.errors] == [  # (an OpenAI chat line's own field: top_logprobs)
        f"line {n}: {name} = {k} is more than max_logprobs (20); raise it with --max-logprobs / "
        "LLM(max_logprobs=...) (-1: no cap)" for n, name, k in [(2, "logprobs", 100000),
                                                              (3, "prompt_logprobs", 21),
                                                              (4, "top_logprobs", 21)]]


def test_openai_response_format_and_penalties_become_sampling_params_and_a_bad_schema_fails_alone():
    pytest.importorskip("xgrammar")

    def line(cid, **body):
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                           "body": {"messages": [{"role": "user", "content": "Hi"}], **body}})

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    data = "\n".join([
        line("schema", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}),
        line("object", response_format={"type": "json_object"}, presence_penalty=0.5, frequency_penalty=-0.5,
             logit_bias={"42": 10}),
        line("bad-schema", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}),
        line("clamped-bias", logit_bias={"42": 101}),  # (clamped to 100, as vLLM's server clamps it)
        line("bad-format", response_format={"type": "yaml"}),
        line("no-schema", response_format={"type": "json_schema", "json_schema": {"name": "x"}}),  # was: any JSON
        json.dumps({"id": "plain", "prompt": "x", "structured_outputs": {"choice": ["a", "b"]}, "bad_words": ["no"]}),
        json.dumps({"id": "plain-bad", "prompt": "x", "structured_outputs": {"regex": "(a"}}),
        # both: response_format over the body's structured_outputs, as vLLM merges them (it failed the line)
        line("merged", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
             structured_outputs={"json": {"type": "string"}, "disable_any_whitespace": True}),
        line("two-kinds", response_format={"type": "json_object"}, structured_outputs={"regex": "a+"}),
    ]).encode() + b"\n"
    got = ingest(data)
    params = {v.line.request_id: v.params for v in got.valid}
    assert sorted(params) == ["clamped-bias", "merged", "object", "plain", "schema"]
    assert params["clamped-bias"].logit_bias == {42: 100.0}
    assert params["schema"].structured_outputs.json == schema
    assert params["merged"].structured_outputs.json == schema
    assert params["merged"].structured_outputs.disable_any_whitespace is True
    assert params["object"].structured_outputs.json_object is True
    assert (params["object"].presence_penalty, params["object"].frequency_penalty) == (0.5, -0.5)
    assert params["object"].logit_bias == {42: 10.0}
    assert params["plain"].structured_outputs.choice == ["a", "b"] and params["plain"].bad_words_token_ids
    errors = {e.request_id: e.message for e in got.errors}
    assert "JSON schema cannot be compiled: Unsupported type" in errors["bad-schema"]
    assert "response_format type 'yaml'" in errors["bad-format"]
    assert "response_format.json_schema must be an object with a 'schema' object" in errors["no-schema"]
    assert "regex cannot be compiled" in errors["plain-bad"]
    assert "structured_outputs needs exactly one of json, regex, choice, grammar, json_object, structural_tag, got " \
        "regex, json_object" in errors["two-kinds"], errors["two-kinds"]


def test_a_forced_tool_call_lines_own_constraint_is_compiled_as_without_tools():
    """A forced tool_choice's line replaced its own structured_outputs unchecked: a regex that does not compile (a
    line without tools fails on it) passed silently; now it fails the line with the same words."""
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]

    def line(cid, **body):
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                           "body": {"messages": [{"role": "user", "content": "Hi"}], **body}})

    data = "\n".join([line("forced", tools=tools, tool_choice="required", structured_outputs={"regex": "("}),
                      line("alone", structured_outputs={"regex": "("}),
                      line("good", tools=tools, tool_choice="required", structured_outputs={"regex": "a+"}),
                      json.dumps({"id": "plain", "messages": [{"role": "user", "content": "Hi"}], "tools": tools,
                                  "tool_choice": "required", "structured_outputs": {"grammar": "root ::= ("}})]
                     ).encode() + b"\n"
    got = ingest(data)
    errors = {e.request_id: e.message.split(": ", 1)[1] for e in got.errors}
    assert errors["forced"] == errors["alone"] and "regex cannot be compiled" in errors["forced"]
    assert "grammar cannot be compiled" in errors["plain"]
    (good,) = got.valid
    assert good.line.request_id == "good" and good.params.structured_outputs.json["type"] == "array"


@pytest.mark.parametrize("ids, message", [
    ([1, -1, 2], "prompt 7: token id -1 is outside the vocabulary [0, 100)"),
    ([1, 100, -5], "prompt 7: token id 100 is outside the vocabulary [0, 100)"),
    ([3, 2**70, -1], f"prompt 7: token id {2**70} is outside the vocabulary [0, 100)"),
    ([3, -(2**64)], f"prompt 7: token id {-(2**64)} is outside the vocabulary [0, 100)"),
    ([1, True], "prompt 7: prompt_token_ids must be a list of integers"),
    ([1, 2.0], "prompt 7: prompt_token_ids must be a list of integers"),
    ([1, "2"], "prompt 7: prompt_token_ids must be a list of integers"),
    ("12", "prompt 7: prompt_token_ids must be a list of integers"),
    (np.array([1.0, 2.0]), "prompt 7: prompt_token_ids must be a list of integers"),
    (np.array([[1, 2]]), "prompt 7: prompt_token_ids must be a list of integers"),
    ([np.int64(1), np.bool_(True)], "prompt 7: prompt_token_ids must be a list of integers"),
    (np.array([1, 100]), "prompt 7: token id 100 is outside the vocabulary [0, 100)"),
    # a conversation given to generate / beam_search (which take prompts) says so, and where conversations go
    ([{"role": "user", "content": "Hi"}], "prompt 7: prompt_token_ids must be a list of integers; this is a "
     "conversation: LLM.chat takes conversations, generate and beam_search prompts (render one with the "
     "tokenizer's apply_chat_template)"),
    ([], "prompt 7 is empty"),
    (list(range(10)), "prompt 7 has 10 tokens; the context (max_model_len) is 10, which leaves no room to generate"),
])
def test_bad_token_ids_are_named(ids, message):
    from batchllm.inputs import PromptProcessor

    with pytest.raises(ValueError) as error:
        PromptProcessor(None, 100, 10).validate_ids(ids, 7, None)
    assert str(error.value) == message


def test_numpy_token_ids_are_token_ids():
    """A tokenizer's return_tensors="np" gives numpy arrays and integers: refused as "not a list of integers"."""
    from batchllm.inputs import PromptProcessor

    prompts = PromptProcessor(None, 100, 10)
    for ids in (np.array([3, 4, 5]), np.array([3, 4, 5], dtype=np.uint16), [np.int64(3), 4, np.int32(5)]):
        prompt = prompts.validate_ids(ids, 0, None)
        assert prompt.token_ids == [3, 4, 5] and all(type(t) is int for t in prompt.token_ids)
    assert prompts.tokenize_prompt({"prompt_token_ids": np.array([7, 8])}).token_ids == [7, 8]


def test_a_dict_prompt_with_images_is_refused_not_run_without_them():
    """vLLM's multi_modal_data was dropped silently: the model answered a question about an image it never saw."""
    from batchllm.inputs import PromptProcessor

    prompts = PromptProcessor(None, 100, 10)
    with pytest.raises(ValueError, match="prompt 3: multi_modal_data is not supported"):
        prompts.tokenize_prompt({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": "x"}}, 3)
    assert prompts.tokenize_prompt({"prompt_token_ids": [1, 2], "multi_modal_data": None}).token_ids == [1, 2]
    for empty in ({"multi_modal_data": {}}, {"mm_processor_kwargs": {}}):  # asking for nothing, as vLLM takes them
        assert prompts.tokenize_prompt({"prompt_token_ids": [1, 2], **empty}).token_ids == [1, 2]
    with pytest.raises(ValueError, match="prompt 0: prompt_embeds is not supported"):  # (not numpy's "ambiguous")
        prompts.tokenize_prompt({"prompt_embeds": np.zeros((2, 4))})
    from batchllm.io.openai_batch import BodyError, body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    assert body_to_request("/v1/chat/completions", {**chat, "mm_processor_kwargs": {}, "media_io_kwargs": {}})
    with pytest.raises(BodyError, match="mm_processor_kwargs"):
        body_to_request("/v1/chat/completions", {**chat, "mm_processor_kwargs": {"num_crops": 4}})
    # vLLM reads prompt_embeds before a text or ids beside them: running the text would answer another prompt
    for prompt in ({"prompt": "hi", "prompt_embeds": [[0.5, 0.25]]}, {"prompt_embeds": [[0.5, 0.25]]}):
        with pytest.raises(ValueError, match="prompt 0: prompt_embeds is not supported"):
            prompts.tokenize_prompt(prompt)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 99), min_size=1, max_size=9), st.booleans())
def test_validated_ids_keep_one_array_equal_to_the_list(ids, as_tuple):
    from batchllm.inputs import PromptProcessor

    prompt = PromptProcessor(None, 100, 10).validate_ids(tuple(ids) if as_tuple else ids, 0, None)
    assert type(prompt.token_ids) is list and prompt.token_ids == ids and prompt.token_ids is not ids
    assert prompt.array.dtype == np.int32 and prompt.array.tolist() == ids


def test_work_in_the_background_returns_its_value_or_raises_its_error_in_the_caller():
    from batchllm.cli import _InBackground

    work = _InBackground(sorted, [3, 1, 2], reverse=True)
    assert work.result() == [3, 2, 1] and work.seconds >= 0
    failing = _InBackground(int, "not a number")
    with pytest.raises(ValueError, match="not a number"):
        failing.result()
    assert not failing._thread.is_alive()


def test_a_null_sampling_field_of_a_plain_line_takes_the_default():
    """`"temperature": null` failed a plain line ("must be a number, got None") while an OpenAI body and a
    Ray row read null as "not given"; all three now take the command line's default. `"max_tokens": null`
    does too: it was vLLM's max_tokens=None, so a gap in a pandas column (written as null) ran its line to the
    context, past --max-tokens."""
    data = b'{"id": "a", "prompt": "Hi", "temperature": null, "max_tokens": null, "stop": null}\n'
    result = ingest(data, defaults={"max_tokens": 4, "temperature": 0.5, "stop": ["x"]})
    assert not result.errors, result.errors
    params = result.valid[0].params
    assert (params.temperature, params.max_tokens, params.stop) == (0.5, 4, ["x"])


def test_chat_template_kwargs_reach_the_template_in_both_formats(monkeypatch):
    """vLLM's `chat_template_kwargs` (Qwen3's {"enable_thinking": false}) was refused as an unsupported
    field; it now reaches the template for plain and OpenAI chat lines, and is an error elsewhere."""
    tokenizer = processor().tokenizer
    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}")
    monkeypatch.setattr(tokenizer, "chat_template", template)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": {"enable_thinking": False}}
    lines = [{"id": "plain", **chat}, {"id": "plain-default", "messages": chat["messages"]},
             {"custom_id": "oa", "url": "/v1/chat/completions", "body": chat},
             {"id": "no-chat", "prompt": "Hi", "chat_template_kwargs": {"enable_thinking": False}},
             {"id": "not-object", "messages": chat["messages"], "chat_template_kwargs": ["enable_thinking"]},
             {"custom_id": "oa-text", "url": "/v1/completions", "body": {"prompt": "Hi", "chat_template_kwargs": {}}}]
    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    texts = {v.line.request_id: tokenizer.decode(v.prompt.array.tolist()) for v in result.valid}
    assert texts == {"plain": "Hi/no_think", "plain-default": "Hi", "oa": "Hi/no_think"}
    problems = sorted(e.message for e in result.errors)
    assert problems == ["line 4: 'chat_template_kwargs', 'tools' and 'documents' need 'messages'",
                        "line 5: 'chat_template_kwargs' must be an object (e.g. {\"enable_thinking\": false})",
                        "line 6: body field(s) not supported: chat_template_kwargs"], problems


def test_a_batch_lines_reasoning_content_reaches_the_template_as_vllms_request_model_renames_it(monkeypatch):
    """An assistant turn's reasoning_content (DeepSeek's, Qwen's and older vLLM's name) in a Batch line was dropped,
    so a Qwen3-style template rendered the turn without its <think>; vLLM 0.26's chat request model renames it to
    reasoning (a reasoning of the message's own wins). A plain line keeps vLLM's LLM.chat: reasoning only."""
    tokenizer = processor().tokenizer
    template = ("{% for m in messages %}{% if m.reasoning %}<think>{{ m.reasoning }}|{{ m.reasoning_content }}"
                "</think>{% endif %}{{ m['content'] }};{% endfor %}")
    monkeypatch.setattr(tokenizer, "chat_template", template)

    def chat(**assistant):
        return [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A", **assistant},
                {"role": "user", "content": "again"}]

    lines = [{"custom_id": "old-name", "url": "/v1/chat/completions",
              "body": {"messages": chat(reasoning_content="R")}},
             {"custom_id": "both", "url": "/v1/chat/completions",
              "body": {"messages": chat(reasoning="own", reasoning_content="R")}},
             {"custom_id": "null-new", "url": "/v1/chat/completions",
              "body": {"messages": chat(reasoning=None, reasoning_content="R")}},
             {"id": "plain", "messages": chat(reasoning_content="R")}]
    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    texts = {v.line.request_id: tokenizer.decode(v.prompt.array.tolist()) for v in result.valid}
    assert texts == {"old-name": "Hi;<think>R|R</think>A;again;", "both": "Hi;<think>own|own</think>A;again;",
                     "null-new": "Hi;<think>R|R</think>A;again;", "plain": "Hi;A;again;"}, texts


def test_an_openai_line_asking_logprobs_without_a_tokenizer_fails_alone():
    """Under --skip-tokenizer-init an OpenAI line's logprobs named every token "" (its alternatives merged into one
    entry), reported as a success; vLLM's server fails such a request ("Unable to get tokenizer"). The line fails
    naming why; the others run. A line naming its tokens by id (its return_tokens_as_token_ids, or the job's
    --return-tokens-as-token-ids where the line says nothing) needs no tokenizer, as in vLLM, and runs."""
    import copy

    untokenized = copy.copy(processor())
    untokenized.tokenizer = None
    lines = [{"custom_id": "logprobs", "url": "/v1/completions",
              "body": {"prompt": [1, 504, 3458], "max_tokens": 3, "logprobs": 2}},
             {"custom_id": "plain", "url": "/v1/completions", "body": {"prompt": [1, 504, 3458], "max_tokens": 3}},
             {"custom_id": "by-id", "url": "/v1/completions",
              "body": {"prompt": [1, 504, 3458], "max_tokens": 3, "logprobs": 2, "return_tokens_as_token_ids": True}},
             {"custom_id": "by-text", "url": "/v1/completions",
              "body": {"prompt": [1, 504, 3458], "max_tokens": 3, "logprobs": 2, "return_tokens_as_token_ids": False}}]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        result = prepare_lines(path, untokenized, {"max_tokens": 4}, None, ResumeState(), chunk=3)
        by_job = prepare_lines(path, untokenized, {"max_tokens": 4}, None, ResumeState(), chunk=3,
                               serving=LineServing(tokens_as_ids=True))
    assert [v.line.request_id for v in result.valid] == ["plain", "by-id"]
    needs = ("logprobs need the tokenizer, which --skip-tokenizer-init leaves out (as vLLM's server: an OpenAI "
             "response names each token by its text, unless return_tokens_as_token_ids is true)")
    assert [e.message for e in result.errors] == [f"line 1: {needs}", f"line 4: {needs}"]
    assert [v.line.request_id for v in by_job.valid] == ["logprobs", "plain", "by-id"]
    assert [e.message for e in by_job.errors] == [f"line 4: {needs}"]


def test_the_generation_prompt_and_the_final_message_are_the_lines_to_choose(monkeypatch):
    """As vLLM: chat_template_kwargs go over add_generation_prompt ({"add_generation_prompt": false} failed
    with "got multiple values for keyword argument"), and an OpenAI chat body may set vLLM's
    add_generation_prompt and continue_final_message; both true is an error naming them."""
    tokenizer = processor().tokenizer
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}<gen>{% endif %}"
    monkeypatch.setattr(tokenizer, "chat_template", template)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The"}]
    lines = [{"id": "kwargs", "messages": messages, "chat_template_kwargs": {"add_generation_prompt": False}},
             {"custom_id": "body", "url": "/v1/chat/completions",
              "body": {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}},
             {"custom_id": "both", "url": "/v1/chat/completions",
              "body": {"messages": messages, "continue_final_message": True}},
             {"custom_id": "not-bool", "url": "/v1/chat/completions",
              "body": {"messages": messages, "add_generation_prompt": "maybe"}}]
    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    texts = {v.line.request_id: tokenizer.decode(v.prompt.array.tolist()) for v in result.valid}
    assert texts == {"kwargs": "[Hi][The]", "body": "[Hi][The"}, "continued: the final message left open"
    problems = sorted(e.message for e in result.errors)
    assert problems == ["line 3: add_generation_prompt and continue_final_message cannot both be true "
                        "(continue_final_message needs add_generation_prompt false)",
                        "line 4: 'add_generation_prompt' must be true or false, got \"maybe\""], problems


def test_openai_lines_are_answered_in_their_own_terms():
    """A chat line's top_logprobs above the cap was reported as "SamplingParams.logprobs = 21", a line
    without url as "unsupported url None", and parallel_tool_calls true (OpenAI's default) was refused."""
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    top = {**chat, "logprobs": True, "top_logprobs": 21}
    lines = [{"custom_id": "top", "url": "/v1/chat/completions", "body": top},
             {"custom_id": "cmpl", "url": "/v1/completions", "body": {"prompt": "Hi", "logprobs": 21}},
             {"custom_id": "no-url", "body": chat},
             {"custom_id": "parallel", "url": "/v1/chat/completions", "body": {**chat, "parallel_tool_calls": True}},
             {"custom_id": "half", "url": "/v1/chat/completions", "body": {**chat, "logprobs": True,
                                                                           "top_logprobs": 1.5}}]
    from batchllm.inputs import prompt_processor_for

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        result = prepare_lines(path, prompt_processor_for(None, max_logprobs=20), {"max_tokens": 4}, None)
    assert [v.line.request_id for v in result.valid] == ["parallel"]
    messages = sorted(e.message for e in result.errors)
    assert messages[0].startswith("line 1: top_logprobs = 21 is more than max_logprobs (20)"), messages
    assert messages[1].startswith("line 2: logprobs = 21 is more than max_logprobs (20)"), messages
    assert messages[2] == "line 3: the line lacks 'url' (/v1/chat/completions or /v1/completions)", messages
    assert messages[3].startswith("line 5: top_logprobs must be a non-negative integer"), messages


VLLM_BODY_EXTRAS = {"top_k": 5, "min_p": 0.1, "min_tokens": 2, "ignore_eos": True, "stop_token_ids": [7, 9],
                    "include_stop_str_in_output": True, "skip_special_tokens": False,
                    "spaces_between_special_tokens": False, "frequency_penalty": 0.5, "presence_penalty": 0.25,
                    "repetition_penalty": 1.1, "allowed_token_ids": [1, 2, 3, 40], "truncate_prompt_tokens": 100,
                    "prompt_logprobs": 2, "stop": ["END"], "seed": 3, "n": 2, "temperature": 0.7, "top_p": 0.9}
"""vLLM's server's sampling fields of an OpenAI body, each at a value other than its default."""


@pytest.mark.parametrize("url, prompt", [("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                                         ("/v1/completions", {"prompt": "Hi"})])
def test_every_vllm_sampling_field_of_an_openai_body_reaches_the_lines_sampling_params(url, prompt):
    """Each field is taken with its value (one left out of the mapping failed every line carrying it as "not
    supported", and no test sent it); bad_words go through as words."""
    body = {**prompt, **VLLM_BODY_EXTRAS, "bad_words": ["xyz"], "max_tokens": 5}
    result = ingest(json.dumps({"custom_id": "all", "url": url, "body": body}).encode() + b"\n")
    assert not result.errors, result.errors
    params = result.valid[0].params
    for name, value in VLLM_BODY_EXTRAS.items():
        assert getattr(params, name) == value, (name, getattr(params, name))
    assert params.bad_words == ["xyz"] and params.max_tokens == 5


def test_an_openai_line_that_exactly_fills_the_context_runs():
    """prompt + max_tokens equal to the context fits (vLLM's server takes it); one more token is
    context_length_exceeded."""
    from batchllm.io.ingest import context_overflow

    context = processor().max_model_len
    body = {"prompt": [5, 6, 7, 8]}
    lines = [{"custom_id": name, "url": "/v1/completions", "body": {**body, "max_tokens": context - 4 + extra}}
             for name, extra in (("fits", 0), ("over", 1))]
    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert [v.line.request_id for v in result.valid] == ["fits"]
    assert [e.message for e in result.errors] == [
        f"line 2: {context_overflow(4, context - 3, context)}"], result.errors
    assert "context_length_exceeded" == result.errors[0].code


def test_an_openai_lines_truncation_past_what_the_context_leaves_is_named_as_vllm_names_it():
    """truncate_prompt_tokens above max_model_len - max_tokens: a long prompt was refused as too long ("66 were
    asked for (62 in the prompt ..."), naming the prompt the user had truncated, a short one ran; vLLM's server
    refuses both, naming the truncation. A plain line stops at the context instead, as LLM.generate."""
    context = processor().max_model_len
    body = {"prompt": "word " * 300, "truncate_prompt_tokens": context - 2}
    lines = [{"custom_id": "long", "url": "/v1/completions", "body": {**body, "max_tokens": 4}},
             {"custom_id": "short", "url": "/v1/completions", "body": {**body, "prompt": "Hi", "max_tokens": 4}},
             {"custom_id": "fits", "url": "/v1/completions", "body": {**body, "max_tokens": 2}},
             {"id": "plain", "prompt": "Hi", "truncate_prompt_tokens": context - 2, "max_tokens": 4},
             {"custom_id": "default", "url": "/v1/completions", "body": {**body, "prompt": "Hi"}},  # (16: vLLM's)
             {"custom_id": "too-many", "url": "/v1/completions", "body": {**body, "max_tokens": context + 1}},
             {"custom_id": "chat", "url": "/v1/chat/completions",  # (vLLM checks a chat without max_tokens beside 0)
              "body": {"messages": [{"role": "user", "content": "Hi"}], "truncate_prompt_tokens": context - 2}}]
    from batchllm.io.ingest import ENDPOINT_DEFAULTS, OPENAI_MAX_TOKENS

    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines),
                    defaults={"max_tokens": 4, OPENAI_MAX_TOKENS: ENDPOINT_DEFAULTS})
    assert [v.line.request_id for v in result.valid] == ["fits", "plain", "chat"]
    said = (f"truncate_prompt_tokens={context - 2} cannot be greater than max_model_len - max_tokens = {{}}: "
            "ask a smaller truncation size (or -1: what the context leaves)")
    messages = [e.message for e in result.errors]
    assert messages[:3] == [f"line 1: {said.format(context - 4)}", f"line 2: {said.format(context - 4)}",
                            f"line 5: {said.format(context - 16)}"]
    assert "were asked for" in messages[3], "(a max_tokens past the context is named, not the truncation)"


def test_vllm_server_fields_of_an_openai_body_are_taken():
    """Files exported for OpenAI or vLLM's server carry these; each failed its line ("not supported").
    reasoning_effort goes to the chat template as the keyword of its name (gpt-oss's template reads it)."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    body = {**chat, "reasoning_effort": "low", "request_id": "r-1", "spaces_between_special_tokens": False,
            "length_penalty": 1.0}
    assert body_to_request("/v1/chat/completions", body).template == {"reasoning_effort": "low",
                                                                      "enable_thinking": True}
    assert body_to_request("/v1/chat/completions", {**body, "chat_template_kwargs": {
        "reasoning_effort": "high"}}).template == {"reasoning_effort": "low", "enable_thinking": True}, (
        "the body's field wins, as vLLM's server merges them")
    # as vLLM's server: OpenAI's "none" turns Qwen3's thinking off, unless chat_template_kwargs says otherwise
    none = {**chat, "reasoning_effort": "none"}
    assert body_to_request("/v1/chat/completions", none).template == {"reasoning_effort": "none",
                                                                      "enable_thinking": False}
    assert body_to_request("/v1/chat/completions", {**none, "chat_template_kwargs": {"enable_thinking": True}}
                           ).template == {"reasoning_effort": "none", "enable_thinking": True}
    assert body_to_request("/v1/chat/completions", chat).template is None
    for bad, message in (({"reasoning_effort": 3}, "'reasoning_effort' must be a string"),
                         ({"reasoning_effort": "auto"}, "'reasoning_effort' must be one of none, minimal, low")):
        with pytest.raises(BodyError, match=re.escape(message)):
            body_to_request("/v1/chat/completions", {**chat, **bad})


def test_openai_bookkeeping_fields_and_null_fields_do_not_fail_a_line():
    """prompt_cache_key and safety_identifier (OpenAI's successors of user), and fields a serializer writes as null
    (audio, prediction, functions), failed their lines as "not supported"."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    body = {"messages": [{"role": "user", "content": "Hi"}], "prompt_cache_key": "k", "safety_identifier": "u1",
            "verbosity": "low", "modalities": ["text"], "audio": None, "prediction": None, "functions": None,
            "web_search_options": None, "max_tokens": 3}
    assert body_to_request("/v1/chat/completions", body).overrides == {"max_tokens": 3}
    for bad, message in (({"audio": {"voice": "alloy"}}, "body field(s) not supported: audio"),
                         ({"modalities": ["text", "audio"]}, "'modalities' = [\"text\", \"audio\"] is not supported")):
        with pytest.raises(BodyError, match=re.escape(message)):
            body_to_request("/v1/chat/completions", {**body, **bad})


def test_max_completion_tokens_wins_over_max_tokens_and_a_null_one_is_not_given():
    """A body with both (a writer that emits null for the field it did not set) failed its line ("give max_tokens
    or max_completion_tokens, not both"); vLLM's server takes max_completion_tokens where it is set."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    for sizes, expected in (({"max_tokens": None, "max_completion_tokens": 4}, 4),
                            ({"max_tokens": 4, "max_completion_tokens": None}, 4),
                            ({"max_tokens": 9, "max_completion_tokens": 4}, 4),
                            ({"max_tokens": None, "max_completion_tokens": None}, None),
                            # a pandas column with gaps writes 4.0 (it failed the line; max_tokens took it)
                            ({"max_completion_tokens": 4.0}, 4)):
        overrides = body_to_request("/v1/chat/completions", {**chat, **sizes})[3]
        assert overrides.get("max_tokens") == expected and type(overrides.get("max_tokens")) is not float, sizes
    for bad in (0, -1, 2.5, True, "8.5"):  # refused by the name the body gave (the error said max_tokens)
        with pytest.raises(BodyError, match="'max_completion_tokens' must be a positive integer"):
            body_to_request("/v1/chat/completions", {**chat, "max_completion_tokens": bad})


def test_an_openai_line_with_a_non_string_custom_id_echoes_it_in_its_error():
    """OpenAI's custom_id is a string; an integer one failed its line with custom_id null, so the error
    could not be matched to its line by id."""
    body = {"messages": [{"role": "user", "content": "Hi"}]}
    lines = [{"custom_id": 5, "url": "/v1/chat/completions", "body": body},
             {"custom_id": ["x"], "url": "/v1/chat/completions", "body": body}]
    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    records = [error.record(result.file_format) for error in result.errors]
    assert [(r["custom_id"], r["error"]["message"]) for r in records] == [
        (5, "line 1: 'custom_id' must be a non-empty string"), (None, "line 2: 'custom_id' must be a non-empty string")]


def test_a_prompt_error_names_its_line_once():
    """Errors from the prompt side came out as "line 1: conversation 1: message 0 ..."."""
    data = (b'{"id": "a", "messages": [{"content": "Hi"}]}\n{"id": "b", "prompt_token_ids": [1, 99999999]}\n'
            + json.dumps({"id": "c", "prompt": "word " * 9000}).encode() + b"\n")
    messages = sorted(e.message for e in ingest(data).errors)
    assert messages[:2] == ["line 1: message 0 must be an object with a 'role' (and its 'content'), got dict "
                            "{'content': 'Hi'}",
                            "line 2: token id 99999999 is outside the vocabulary [0, 49152)"]
    assert messages[2].startswith("line 3: the prompt has 9001 tokens; the context (max_model_len) is 8192")


def test_a_line_the_context_cannot_hold_gets_openais_code_in_run_and_ray_alike():
    """Every failed OpenAI line had the code "invalid_request": a prompt (or a prompt and its max_tokens) the context
    cannot hold now has OpenAI's "context_length_exceeded", in `run`'s records and in `run --ray`'s, whose rows carry
    the problem as text (`error_code_of`); other problems keep "invalid_request"."""
    from batchllm.io.ingest import error_code_of

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    lines = [{"custom_id": "big", "url": "/v1/chat/completions", "body": {**chat, "max_tokens": 1_000_000}},
             {"custom_id": "long", "url": "/v1/completions", "body": {"prompt": "word " * 9000}},
             {"custom_id": "bad", "url": "/v1/chat/completions", "body": {**chat, "max_tokens": -1}}]
    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    records = {r["custom_id"]: r for r in (error.record(result.file_format) for error in result.errors)}
    codes = {rid: (r["error"]["code"], r["response"]["body"]["error"]["code"]) for rid, r in records.items()}
    assert codes == {"big": ("context_length_exceeded",) * 2, "long": ("context_length_exceeded",) * 2,
                     "bad": ("invalid_request",) * 2}
    for rid, record in records.items():
        problem = record["error"]["message"].split(": ", 1)[1]
        assert (error_code_of(problem) or "invalid_request") == codes[rid][0], rid


def test_a_chat_template_option_replaces_the_tokenizers(tmp_path):
    """vLLM's --chat-template (a file or the template itself): for base models without one, or another."""
    from batchllm.inputs import prompt_processor_for, read_chat_template

    inline = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (path := tmp_path / "t.jinja").write_text(inline)
    assert read_chat_template(str(path)) == inline == read_chat_template(inline)
    with pytest.raises(ValueError, match="'nope.jinja' is neither a file nor a Jinja template"):
        read_chat_template("nope.jinja")
    deep = tmp_path / ("d" * 90) / "nope.jinja"  # a long path was cut at 80 characters, its file name with it
    with pytest.raises(ValueError, match=f"'{re.escape(str(deep))}' is neither a file"):
        read_chat_template(str(deep))
    with pytest.raises(ValueError, match="renders `messages`"):
        read_chat_template("templates/{{model}}.jinja")  # a mistyped path is not taken for a template
    # a syntax error failed every line after the model loaded, and the fixed file's rerun was refused as another
    (broken := tmp_path / "bad.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    with pytest.raises(ValueError, match=r"bad.jinja' is not valid Jinja: line 2: unexpected '}'"):
        read_chat_template(str(broken))
    assert read_chat_template("{% generation %}{{ messages }}{% endgeneration %}"), "transformers' own tags parse"
    prompts = prompt_processor_for(None, chat_template=str(path))
    hi = [{"role": "user", "content": "Hi"}]
    assert prompts.apply_chat_template(hi) == "<user>Hi"
    assert processor().apply_chat_template(hi) != "<user>Hi", "others keep theirs"
    assert processor().apply_chat_template(hi, chat_template=inline) == "<user>Hi", "one call's, as LLM.chat's"


def test_a_line_with_seed_minus_one_gets_the_runs_seed_as_a_line_without_one():
    """-1 is vLLM's "no seed": such a line is seeded from --seed and its id, as a line with no seed is."""
    none, minus = (sampling_params_for(BatchLine(1, "a", "x", False, fields), {}, 7, {})
                   for fields in ({}, {"seed": -1}))
    assert none.seed is not None and minus.seed == none.seed
    assert sampling_params_for(BatchLine(1, "a", "x", False, {"seed": -1}), {}, None, {}).seed is None


def test_an_openai_bodys_seed_lies_in_64_signed_bits_as_vllms_server_bounds_it():
    """vLLM's request models bound seed to [-2**63, 2**63 - 1]; a line above it was answered (SamplingParams, as
    LLM calls, takes up to 2**64 - n, and still does)."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    body = {"prompt": "x", "max_tokens": 2}
    for seed in (2**63 - 1, -2**63, "9223372036854775807"):
        assert body_to_request("/v1/completions", {**body, "seed": seed}).overrides["seed"] == int(seed)
    for seed in (2**63, -2**63 - 1, "9223372036854775808"):
        with pytest.raises(BodyError, match="'seed' must lie in a signed 64-bit integer"):
            body_to_request("/v1/completions", {**body, "seed": seed})
    assert SamplingParams(seed=2**63).seed == 2**63


def test_an_id_written_as_a_whole_float_is_read_as_the_integer_and_a_bad_id_is_shown():
    """pandas writes an integer id column with gaps as floats (1000.0): every such line failed with
    "'id' must be a string or an integer", which did not show the value."""
    line = parse_line(b'{"id": 1000.0, "prompt": "x"}', 1)
    assert line.request_id == 1000 and type(line.request_id) is int
    error = parse_line(b'{"id": 1.5, "prompt": "x"}', 2)
    assert error.message == "line 2: 'id' must be a string or an integer, got 1.5"


def test_a_tables_other_columns_are_ignored_and_a_misspelt_field_is_named():
    """A DataFrame written whole (`to_json(orient="records", lines=True)`) carries its other columns: every
    line failed ("unsupported field(s): rating, text"). They are now ignored and counted, as vLLM's server
    ignores a request's unknown fields; a near miss of a field's name is still an error naming the field."""
    data = (b'{"id": 1, "prompt": "Hi", "rating": 5, "text": "good"}\n'
            b'{"id": 2, "prompt": "Hi", "rating": 3, "uid": 7, "n_tokens": 3, "prompt_tokens": 2, "topk": 1}\n'
            b'{"id": 3, "prompt": "Hi", "temprature": 0.5, "max_new_tokens": 9}\n')
    result = ingest(data)
    assert [v.line.request_id for v in result.valid] == [1, 2] and result.ignored_fields == {
        "rating": 2, "text": 1, "uid": 1, "n_tokens": 1, "prompt_tokens": 1, "topk": 1}
    assert [e.message for e in result.errors] == [
        "line 3: unsupported field(s): 'max_new_tokens' (a plain line's is 'max_tokens'), "
        "'temprature' (did you mean 'temperature'?)"]


def test_a_plain_line_asking_for_beam_search_or_greedy_by_another_apis_name_fails_naming_it():
    """`num_beams`, `do_sample`: false, `use_beam_search`, `best_of` ... were ignored as a table's columns and the line
    was sampled at run's default temperature instead (an OpenAI line's body check refuses them): each fails its line,
    saying what a line takes; an unrelated column next to them is still ignored, and their default values (which ask
    for nothing else) are taken, as an OpenAI body's are."""
    names = ("num_beams", "do_sample", "use_beam_search", "beam_width", "length_penalty", "early_stopping", "best_of")
    data = b"".join(b'{"id": %d, "prompt": "Hi", "%s": %s, "rating": 1}\n' % (i, name.encode(), {
        "do_sample": b"false", "early_stopping": b"true", "use_beam_search": b"true"}.get(name, b"4"))
        for i, name in enumerate(names))
    result = ingest(data)
    assert not result.valid and len(result.errors) == len(names)
    for error, name in zip(result.errors, names):
        assert f"unsupported field(s): '{name}' (" in error.message, error.message
    assert '"temperature": 0' in result.errors[1].message and "beam_search" in result.errors[0].message
    assert '"n"' in result.errors[-1].message
    harmless = (b'{"id": "a", "prompt": "Hi", "use_beam_search": false, "best_of": 1, "length_penalty": 1.0, '
                b'"num_beams": 1, "do_sample": true, "early_stopping": false, "beam_width": null}\n')
    kept = ingest(harmless).valid
    assert [v.line.request_id for v in kept] == ["a"]  # values that ask for nothing else: taken,
    assert kept[0].line.ignored_fields == ()  # not reported as a table's ignored columns


def test_a_plain_line_with_token_ids_and_their_text_runs_the_ids_as_generate_does():
    """A line with both "prompt" and "prompt_token_ids" was refused ("needs exactly one of ..."), while
    LLM.generate({"prompt_token_ids": ids, "prompt": text}) runs the ids and keeps the text, as vLLM's TokensPrompt.
    It now runs the ids (truncated as a token prompt is); the text must be a string, and messages beside either
    still fail."""
    data = (b'{"id": "both", "prompt": "not these words", "prompt_token_ids": [5, 6, 7]}\n'
            b'{"id": "cut", "prompt": "x", "prompt_token_ids": [5, 6, 7, 8], "truncate_prompt_tokens": 2}\n'
            b'{"id": "list", "prompt": [1, 2], "prompt_token_ids": [5, 6]}\n'
            b'{"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "prompt_token_ids": [5, 6]}\n'
            b'{"id": "empty", "prompt": "x", "prompt_token_ids": []}\n')
    result = ingest(data)
    assert {v.line.request_id: v.prompt.token_ids.tolist() for v in result.valid} == {"both": [5, 6, 7],
                                                                                       "cut": [7, 8]}
    assert [(e.request_id, e.message) for e in result.errors] == [
        ("list", "line 3: 'prompt' beside 'prompt_token_ids' must be a string (the ids' text)"),
        ("chat", "line 4: needs exactly one of prompt, messages, prompt_token_ids (or 'prompt_token_ids' with its "
                 "'prompt' text)"),
        ("empty", "line 5: 'prompt_token_ids' must be a non-empty list of integers")]
    line = parse_line(b'{"id": 1, "prompt": "seven", "prompt_token_ids": [7]}', 1)
    assert line.prompt == {"prompt_token_ids": [7], "prompt": "seven"}  # (LLM.generate's dict prompt)


def test_a_plain_line_with_a_url_or_body_column_stays_a_plain_line():
    """A table's `url` column (most web datasets have one) sent a plain line to the OpenAI reader, which
    failed it for a missing custom_id and wrote the error to the OpenAI errors file."""
    line = parse_line(b'{"id": 1, "prompt": "Hi", "url": "https://example.com", "body": "text"}', 1)
    assert line.format == "plain" and set(line.ignored_fields) == {"url", "body"}
    openai = parse_line(b'{"url": "/v1/completions", "body": {"prompt": "Hi"}}', 2)
    assert openai.format == "openai" and "missing 'custom_id'" in openai.message


def test_a_line_that_failed_before_is_not_run_again_on_resume():
    """A line with an error record (one the KV cache refused, say) came back valid on a resume with more
    memory, and got a second record: the README says a resume keeps its error."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(b'{"id": "a", "prompt": "Hi"}\n{"id": "b", "prompt": "Hi"}\n')
        resume = ResumeState(done_error_lines={2})
        result = prepare_lines(path, processor(), {"max_tokens": 4}, None, resume)
    assert [v.line.request_id for v in result.valid] == ["a"] and not result.errors


def test_a_line_that_breaks_the_parser_keeps_its_id_and_format(monkeypatch):
    """A line that raised inside the parser (a bug: the parser never raises, it answers the line) got an
    error record with id null in the file's format: an OpenAI line's error lost its custom_id."""
    from batchllm.io import jsonl

    def broken(*args):
        raise NameError("a bug")

    monkeypatch.setattr(jsonl, "_parse_openai_line", broken)
    line = {"custom_id": "c-1", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Hi"}]}}
    error = jsonl.parse_line(json.dumps(line).encode(), 3)
    record = error.record(jsonl.PLAIN)
    assert record["custom_id"] == "c-1" and record["response"]["status_code"] == 400, record
    assert record["error"]["message"] == "line 3: cannot be read (NameError: 'a bug')"
    monkeypatch.setattr(jsonl, "_parse_line", broken)
    assert jsonl.parse_line(b'{"id": 7, "prompt": "Hi"}', 1).record(jsonl.OPENAI) == {
        "id": 7, "error": {"line": 1, "message": "line 1: cannot be read (NameError: 'a bug')"}}
    assert jsonl.parse_line(b"\xff{", 2).request_id is None


def test_an_openai_lines_keys_beside_its_request_are_ignored_and_named():
    """A key beside custom_id, method, url and body (a job's own bookkeeping) failed the line ("unsupported
    field(s): metadata"); vLLM's run-batch allows extra keys, and so does this reader, naming them once."""
    data = (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi"}, '
            b'"metadata": {"a": "b"}}\n'
            b'{"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Hi"}}\n')
    result = ingest(data)
    assert [v.line.request_id for v in result.valid] == ["a", "b"] and not result.errors
    assert result.ignored_fields == {"metadata": 1}


def test_openai_body_values_of_the_wrong_kind_are_named():
    """A response_format string said "response_format type 'None' is not supported"; a chat body's logprobs
    "false" (a string) asked for logprobs: it is read as vLLM's server reads a boolean, and 2 is named."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(BodyError, match=re.escape("response_format must be an object with a 'type' (text, "
                                                  "json_object, json_schema, structural_tag), got \"json\"")):
        body_to_request("/v1/chat/completions", {**chat, "response_format": "json"})
    for off in (False, 0, "false", "False", "0", None):  # as vLLM's server (pydantic) reads a boolean
        assert "logprobs" not in body_to_request("/v1/chat/completions", {**chat, "logprobs": off})[3], off
    for on in (True, 1, "true"):
        assert body_to_request("/v1/chat/completions", {**chat, "logprobs": on, "top_logprobs": 2})[3]["logprobs"] == 2
    for bad in (2, "maybe", [True]):
        with pytest.raises(BodyError, match=re.escape("'logprobs' must be true or false, got ")):
            body_to_request("/v1/chat/completions", {**chat, "logprobs": bad})


def test_openai_numbers_written_as_text_method_case_and_missing_content_are_read_as_vllm_reads_them():
    """vLLM's server (pydantic, lax) reads "temperature": "0" and "max_tokens": "4" as numbers, never reads a line's
    method, and takes a message without content (empty text): each failed its line here."""
    from batchllm.io.openai_batch import body_to_request

    completions = body_to_request("/v1/completions", {"prompt": "hi", "temperature": "0", "max_tokens": " 4 ",
                                                      "logprobs": "2", "seed": "4_000", "top_p": "0.5", "n": "1.0"})
    assert completions.overrides == {"temperature": 0.0, "top_p": 0.5, "seed": 4000, "n": 1, "logprobs": 2,
                                     "max_tokens": 4}
    chat = body_to_request("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_completion_tokens": "8", "logprobs": "true"})
    assert chat.overrides["max_tokens"] == 8 and chat.overrides["logprobs"] == 0
    for bad in ("4.5", "four", "1e3"):
        assert body_to_request("/v1/completions", {"prompt": "hi", "max_tokens": bad}).overrides["max_tokens"] == bad
    lines = [{"custom_id": "a", "method": "post", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "system"}, {"role": "user", "content": "Hi"}], "max_tokens": "3"}},
             {"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}},
             {"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": "4.5"}}]
    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert [v.line.request_id for v in result.valid] == ["a"] and result.valid[0].params.max_tokens == 3
    assert sorted(e.message for e in result.errors) == [
        "line 2: unsupported method 'GET' (only POST)",
        "line 3: max_tokens must be a positive integer or None, got '4.5'"]


def test_openai_booleans_written_as_text_are_read_for_every_boolean_field():
    """vLLM's server reads "false" as false for every boolean field; here `logprobs` and `echo` took it while
    `ignore_eos`, `skip_special_tokens` and `include_stop_str_in_output` failed their lines, `"stream": "false"` was
    "not supported (only false)" and `"parallel_tool_calls": "false"` "not supported (only true or false)"."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    request = body_to_request("/v1/chat/completions", {**chat, "ignore_eos": "false", "skip_special_tokens": "True",
                                                       "include_stop_str_in_output": "0", "stream": "f",
                                                       "parallel_tool_calls": "false", "use_beam_search": "no"})
    assert request.overrides["ignore_eos"] is False and request.overrides["skip_special_tokens"] is True
    assert request.overrides["include_stop_str_in_output"] is False
    # pydantic's words, as vLLM's server reads them: "t"/"y" are true; spaces around a word are refused, by name
    assert body_to_request("/v1/completions", {"prompt": "hi", "ignore_eos": "y"}).overrides["ignore_eos"] is True
    assert body_to_request("/v1/completions", {"prompt": "hi", "echo": "T"}).echo is not None
    spaced = body_to_request("/v1/completions", {"prompt": "hi", "ignore_eos": " false"}).overrides["ignore_eos"]
    with pytest.raises(ValueError, match="ignore_eos must be true or false, got ' false'"):
        SamplingParams(ignore_eos=spaced)
    assert body_to_request("/v1/completions", {"prompt": "hi", "add_special_tokens": "true"}).prompt == "hi"
    with pytest.raises(BodyError, match=re.escape("body field 'stream' = true is not supported (only false)")):
        body_to_request("/v1/chat/completions", {**chat, "stream": "TRUE"})
    with pytest.raises(BodyError, match="body field 'stream' = \"maybe\" is not supported"):
        body_to_request("/v1/chat/completions", {**chat, "stream": "maybe"})


@pytest.mark.parametrize("prompt, expected", [(["Hello"], "Hello"), ([[5, 6, 7]], [5, 6, 7]), ("Hello", "Hello"),
                                              ([504.0, 35.0], [504, 35]), ([[5.0, 6]], [5, 6])])
def test_a_completions_list_holding_one_prompt_is_that_prompt(prompt, expected):
    """OpenAI's and vLLM's completions take a list of prompts; one such list of one prompt failed its line. Token
    ids written as floats (504.0) are read as vLLM's server reads them; they failed the line."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    assert body_to_request("/v1/completions", {"prompt": prompt})[1] == expected
    with pytest.raises(BodyError, match="give each prompt of a list its own line"):
        body_to_request("/v1/completions", {"prompt": ["Hello", "Bye"]})
    with pytest.raises(BodyError, match="must be a string or a non-empty list of token ids"):
        body_to_request("/v1/completions", {"prompt": [5.5, 6.0]})


def test_a_line_cut_inside_a_string_is_named_so():
    """A line cut inside a string read "Invalid control character at at column 29" (the line's newline,
    and "at" twice)."""
    cut = parse_line(b'{"id": "y", "prompt": "What is\n', 4)
    assert cut.request_id == "y" and cut.message == "line 4: malformed JSON: Unterminated string starting at column 23"
    assert " at at " not in parse_line(b'{"id": "z", "prompt": "a\tb"}\n', 5).message


def test_tool_call_arguments_reach_the_template_as_objects_as_in_vllm():
    """OpenAI history holds a tool call's arguments as a JSON string; vLLM parses them before the template, which
    writes them with tojson (Qwen2.5, Llama 3.1, Hermes): they were quoted twice. A line's chat_template_kwargs
    holding chat_template are refused, as by vLLM's server (a per-line template overrode --chat-template); tokenize
    is overridden, as vLLM overrides it."""
    prompts = processor()
    template = ("{% for m in messages %}{{ m.role }}:{{ m.content }}{% for c in m.tool_calls or [] %}"
                "<{{ c.function.name }} {{ c.function.arguments | tojson }}>{% endfor %};{% endfor %}")
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    history = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    rendered = prompts.apply_chat_template(history, chat_template=template)
    assert rendered == 'user:Weather?;assistant:<weather {"city": "Paris"}>;tool:sunny;'
    assert history[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}', "the caller's are unchanged"
    empty = [{**history[1], "tool_calls": [{**call, "function": {"name": "now", "arguments": ""}}]}]
    assert prompts.apply_chat_template(empty, chat_template=template) == "assistant:<now {}>;"
    no_calls = [{"role": "assistant", "content": "x", "tool_calls": []}]
    assert prompts.apply_chat_template(no_calls, chat_template="{{ messages[0].tool_calls is defined }}") == "False"
    # as vLLM 0.26's _postprocess_messages makes them: missing, empty or null arguments are {}, another JSON value
    # is kept, and arguments that are not JSON (a call cut off by max_tokens, replayed) fail the line by name
    for arguments, rendered in ((None, "{}"), ("", "{}"), ("null", "{}"), ("5", "5"), ('"s"', '"s"'),
                                ([1], "[1]")):
        given = [{**history[1], "tool_calls": [{**call, "function": {"name": "w", "arguments": arguments}}]}]
        assert prompts.apply_chat_template(given, chat_template=template) == f"assistant:<w {rendered}>;", arguments
    for arguments, problem in (("{city", r"arguments is not JSON \(Expecting property name"),
                               (5, "arguments must be a JSON string or an object, got int")):
        cut = [{**history[1], "tool_calls": [{**call, "function": {"name": "w", "arguments": arguments}}]}]
        with pytest.raises(ValueError, match=rf"messages\[0\]\.tool_calls\[0\]\.function\.{problem}"):
            prompts.apply_chat_template(cut, chat_template=template)
    for calls, message in (([{"type": "code", "function": {}}], r"\.tool_calls\[0\] must be an object of type "),
                           ({"a": call}, r"\.tool_calls must be a list of tool calls")):
        with pytest.raises(ValueError, match=rf"conversation 2: messages\[1\]{message}"):
            prompts.apply_chat_template([history[0], {**history[1], "tool_calls": calls}], 2, chat_template=template)
    with pytest.raises(ValueError, match="chat_template_kwargs must not hold chat_template .vLLM's server refuses"):
        prompts.apply_chat_template(history[:1], kwargs={"chat_template": "x"})
    assert prompts.apply_chat_template(history[:1], kwargs={"tokenize": True}, chat_template=template) == (
        prompts.apply_chat_template(history[:1], chat_template=template)), "tokenize is overridden, as in vLLM"


def test_a_message_reaches_the_template_with_the_keys_vllm_passes_on():
    """Every key of a message reached the chat template: an assistant's reasoning_content (which Qwen3-style templates
    render as <think>), a user's tool_calls or reasoning, a name that is not a string, keys of the caller's own.
    vLLM's _parse_chat_message_content keeps role and content; an assistant's tool_calls and reasoning (also as
    reasoning_content); a tool message's tool_call_id; a developer's tools; name and task where they are strings."""
    prompts = processor()
    template = ("{% for m in messages %}{{ m.role }}{{ m | dictsort | map('first') | reject('in', ['role', "
                "'content']) | join(',') | default('', true) }}{% if m.reasoning_content %}<think>"
                "{{ m.reasoning_content }}</think>{% endif %}:{{ m.content }};{% endfor %}"
                "{# names 'developer': the role is kept (else a system one, `inputs.developer_as_system`) #}")
    conversation = [
        {"role": "system", "content": "S", "name": 5, "extra": "X"},
        {"role": "user", "content": "Q", "name": "ann", "reasoning": "R", "tool_calls": [], "tool_call_id": "c0"},
        {"role": "assistant", "content": "A", "reasoning_content": "old", "thinking": "T"},
        {"role": "assistant", "content": "B", "reasoning": "why", "task": "t"},
        {"role": "tool", "content": [{"type": "text", "text": "r"}], "tool_call_id": "c1", "reasoning": "no"},
        {"role": "developer", "content": "D"}]
    assert prompts.apply_chat_template(conversation, chat_template=template) == (
        "system:S;username:Q;assistant:A;assistantreasoning,reasoning_content,task,thinking<think>why</think>:B;"
        "tooltool_call_id:r;developer:D;")  # (thinking: transformers' copy of reasoning, as vLLM's template gets it)
    with pytest.raises(ValueError, match=r"conversation 0: messages\[0\]\.content\[0\] has no type; only text"):
        prompts.apply_chat_template([{"role": "user", "content": [{"type": ["text"], "text": "x"}]}])


def test_vllm_request_model_defaults_tools_and_documents_in_an_openai_body():
    """Bodies written from vLLM's request models carry use_beam_search, priority, include_reasoning and
    add_special_tokens at their defaults: each failed its line. tools with tool_choice "none" and documents reach
    the chat template, as in vLLM (tools were refused whatever tool_choice said)."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    defaults = {"use_beam_search": False, "priority": 0, "include_reasoning": True}
    assert body_to_request("/v1/chat/completions", {**chat, **defaults, "add_special_tokens": False}).overrides == {}
    assert body_to_request("/v1/completions", {"prompt": "x", **defaults, "add_special_tokens": True}).overrides == {}
    assert body_to_request("/v1/completions", {"prompt": "x", "include_reasoning": False}).overrides == {}, (
        "no field of vLLM's completions request: an extra one, ignored there")
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    asked = body_to_request("/v1/chat/completions", {**chat, "tools": [tool], "tool_choice": "none",
                                                     "documents": [{"title": "t", "text": "d"}]})
    assert asked.template == {"tools": [{"type": "function", "function": {"name": "weather", "description": None,
                                                                       "parameters": {"type": "object"}}}],
                              "documents": [{"title": "t", "text": "d"}]}
    from batchllm.io.tool_calls import ToolChoiceError, served_tool_choice

    for auto in ({"tools": [tool]}, {"tools": [tool], "tool_choice": "auto"}):  # (refused by a job without a parser)
        with pytest.raises(ToolChoiceError, match=re.escape('"tool_choice": "auto" (vLLM\'s default where tools are '
                                                            "given) needs a tool-call parser")):
            served_tool_choice(body_to_request("/v1/chat/completions", {**chat, **auto}).tool_call, None)
    for bad, message in (({"tools": "weather", "tool_choice": "none"}, "'tools' must be a list of objects"),
                         ({"use_beam_search": True}, "'use_beam_search' = true is not supported (only false)"),
                         ({"add_special_tokens": 7}, "'add_special_tokens' must be true or false, got 7")):
        with pytest.raises(BodyError, match=re.escape(message)):
            body_to_request("/v1/chat/completions", {**chat, **bad})


VLLM_CHAT_DEFAULTS = {
    "model": None, "frequency_penalty": 0.0, "logit_bias": None, "logprobs": False, "top_logprobs": 0,
    "max_tokens": None, "max_completion_tokens": None, "n": 1, "presence_penalty": 0.0, "response_format": None,
    "seed": None, "stop": [], "stream": False, "stream_options": None, "temperature": None, "top_p": None,
    "tools": None, "tool_choice": "none", "reasoning_effort": None, "thinking_token_budget": None,
    "include_reasoning": True, "parallel_tool_calls": True, "user": None, "use_beam_search": False, "top_k": None,
    "min_p": None, "repetition_penalty": None, "length_penalty": 1.0, "stop_token_ids": [],
    "include_stop_str_in_output": False, "ignore_eos": False, "min_tokens": 0, "skip_special_tokens": True,
    "spaces_between_special_tokens": True, "truncate_prompt_tokens": None, "truncation_side": None,
    "prompt_logprobs": None, "logprob_token_ids": None, "allowed_token_ids": None, "bad_words": [], "echo": False,
    "add_generation_prompt": True, "continue_final_message": False, "add_special_tokens": False, "documents": None,
    "chat_template": None, "chat_template_kwargs": None, "media_io_kwargs": None, "mm_processor_kwargs": None,
    "structured_outputs": None, "priority": 0, "request_id": "r-1", "return_tokens_as_token_ids": None,
    "return_token_ids": None, "return_token_offsets": False, "return_prompt_text": None,
    "return_assistant_tokens_mask": False, "cache_salt": None, "kv_transfer_params": None,
    "ec_transfer_params": None, "vllm_xargs": None, "repetition_detection": None}
"""vLLM 0.26's ChatCompletionRequest written whole (`model_dump()`: every field, each at its default), messages
aside; CompletionRequest's fields are the shared ones below with its own."""
VLLM_COMPLETIONS_DEFAULTS = {
    **{k: v for k, v in VLLM_CHAT_DEFAULTS.items() if k not in {
        "top_logprobs", "max_completion_tokens", "tools", "tool_choice", "reasoning_effort", "include_reasoning",
        "parallel_tool_calls", "add_generation_prompt", "continue_final_message", "documents", "chat_template",
        "chat_template_kwargs", "media_io_kwargs", "mm_processor_kwargs", "return_prompt_text",
        "return_assistant_tokens_mask"}},
    "logprobs": None, "max_tokens": 16, "suffix": None, "prompt_embeds": None, "add_special_tokens": True}


def test_a_body_vllms_request_model_writes_whole_is_taken():
    """A body dumped from vLLM 0.26's request model carries every field at its default: return_token_offsets and
    return_assistant_tokens_mask (false) failed every such line as not supported (vLLM's generation endpoints ignore
    them, true too); false for the optional flag return_prompt_text is its default too, and true, which changes
    vLLM's answer, is refused by name. return_tokens_as_token_ids is taken either way."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    hi = [{"role": "user", "content": "Hi"}]
    chat = body_to_request("/v1/chat/completions", {**VLLM_CHAT_DEFAULTS, "messages": hi})
    assert chat.is_chat and SamplingParams(**chat.overrides) == SamplingParams()
    plain = body_to_request("/v1/completions", {**VLLM_COMPLETIONS_DEFAULTS, "prompt": "Hi"})
    assert SamplingParams(**plain.overrides) == SamplingParams(max_tokens=16)
    body_to_request("/v1/chat/completions", {"messages": hi, "return_prompt_text": False})
    with pytest.raises(BodyError, match="body field 'return_prompt_text' = true is not supported"):
        body_to_request("/v1/chat/completions", {"messages": hi, "return_prompt_text": True})
    for flag in (True, False):
        asked = body_to_request("/v1/chat/completions", {"messages": hi, "return_tokens_as_token_ids": flag})
        assert asked.asks.tokens_as_ids is flag
    for name in ("return_token_offsets", "return_assistant_tokens_mask"):
        body_to_request("/v1/chat/completions", {"messages": hi, name: True})


def test_a_plain_lines_errors_name_its_own_fields():
    """A plain line's errors said "SamplingParams.max_tokens ..." where an OpenAI line's say "max_tokens": the
    line's field is named as the line gives it."""
    result = ingest(b'{"id": "a", "prompt": "Hi", "max_tokens": -1}\n{"id": "b", "prompt": "Hi", "n": 0}\n')
    assert [e.message for e in result.errors] == ["line 1: max_tokens must be a positive integer or None, got -1",
                                                  "line 2: n must be in [1, 16384], got 0"]


def test_an_openai_line_with_id_for_custom_id_is_told_so():
    """A line shaped as OpenAI's but naming its request by `id` is read as a plain line: its error said only that a
    prompt field was missing."""
    result = ingest(b'{"id": "x1", "method": "POST", "url": "/v1/chat/completions", '
                    b'"body": {"messages": [{"role": "user", "content": "Hi"}]}}\n{"id": "x2"}\n')
    assert [e.message for e in result.errors] == [
        "line 1: needs exactly one of prompt, messages, prompt_token_ids (or 'prompt_token_ids' with its 'prompt' "
        "text) (an OpenAI Batch line names its request by 'custom_id', not 'id')",
        "line 2: needs exactly one of prompt, messages, prompt_token_ids (or 'prompt_token_ids' with its 'prompt' "
        "text)"]


def test_vllms_fields_without_a_counterpart_fail_a_plain_line_as_they_fail_sampling_params():
    """thinking_token_budget, repetition_detection and flat_logprobs asking for what does not run here were a plain
    line's ignored columns: the line passed as a success with a note, where SamplingParams and an OpenAI body refuse
    them by name. At the values that ask for what runs here they are taken, with no note."""
    result = ingest(b'{"id": "a", "prompt": "Hi", "thinking_token_budget": 10}\n'
                    b'{"id": "b", "prompt": "Hi", "flat_logprobs": false, "thinking_token_budget": null}\n'
                    b'{"id": "c", "prompt": "Hi", "flat_logprobs": true}\n'
                    b'{"id": "d", "prompt": "Hi", "repetition_detection": {"window": 8}}\n')
    messages = [e.message for e in result.errors]
    assert messages[0].startswith("line 1: unsupported field(s): 'thinking_token_budget' (vLLM's, not supported "
                                  "here (no reasoning parser here")
    assert messages[1].startswith("line 3: unsupported field(s): 'flat_logprobs'")
    assert messages[2].startswith("line 4: unsupported field(s): 'repetition_detection'")
    (taken,) = result.valid
    assert taken.line.request_id == "b" and result.ignored_fields == {}
    with pytest.raises(ValueError, match="thinking_token_budget"):
        SamplingParams(thinking_token_budget=10)


def test_inputs_the_engine_has_not_fail_a_plain_line_as_llm_generate_refuses_them():
    """A line with vLLM's multi_modal_data, mm_processor_kwargs, prompt_embeds or lora_request ran without them and
    passed as a success, with a note of ignored columns; LLM.generate refuses them. Null or empty, they ask for
    nothing and are taken, with no note."""
    result = ingest(b'{"id": "mm", "prompt": "Hi", "multi_modal_data": {"image": "x.png"}}\n'
                    b'{"id": "lora", "prompt": "Hi", "lora_request": {"lora_name": "a", "lora_int_id": 1}}\n'
                    b'{"id": "embeds", "prompt": "Hi", "prompt_embeds": [[0.5]]}\n'
                    b'{"id": "empty", "prompt": "Hi", "multi_modal_data": {}, "mm_processor_kwargs": null, '
                    b'"lora_request": null}\n')
    assert [e.message for e in result.errors] == [
        "line 1: unsupported field(s): 'multi_modal_data' (vLLM's, not supported here (the models here take text "
        "and token ids only))",
        "line 2: unsupported field(s): 'lora_request' (vLLM's, not supported here (no LoRA adapters here: merge the "
        "adapter into the model's weights))",
        "line 3: unsupported field(s): 'prompt_embeds' (vLLM's, not supported here (the models here take text and "
        "token ids only))"]
    (taken,) = result.valid
    assert taken.line.request_id == "empty" and result.ignored_fields == {}
    with pytest.raises(ValueError, match="prompt 0: a dict prompt's 'prompt' must be a string, got list"):
        processor().tokenize_prompt({"prompt": [1, 2, 3]})


def test_vllms_old_guided_fields_fail_their_line_naming_structured_outputs():
    """guided_choice in a plain line was ignored as a table's column: the line ran unconstrained and passed as a
    success; in an OpenAI body it was refused without naming what replaced it."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    result = ingest(b'{"id": 1, "prompt": "Hi", "guided_choice": ["yes", "no"]}\n')
    assert not result.valid and [e.message for e in result.errors] == [
        "line 1: unsupported field(s): 'guided_choice' (vLLM's name before 0.12: give "
        '"structured_outputs": {"choice": ...})']
    with pytest.raises(BodyError, match="guided_json is vLLM's name before 0.12: give structured_outputs or "
                                        "response_format"):
        body_to_request("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                 "guided_json": {"type": "object"}})


def test_a_constraint_at_a_plain_lines_top_level_fails_its_line_naming_structured_outputs():
    """"regex" (and json, grammar, choice, json_object, SGLang's json_schema and ebnf) at a plain line's top level
    was ignored as a table's column, noted only among the ignored fields: the line ran unconstrained as a success."""
    for field, value, inner in (("regex", "[0-9]+", "regex"), ("json", {"type": "object"}, "json"),
                                ("grammar", 'root ::= "a"', "grammar"), ("choice", ["a", "b"], "choice"),
                                ("json_object", True, "json_object"), ("json_schema", {"type": "object"}, "json"),
                                ("ebnf", 'root ::= "a"', "grammar"), ("json", '{"type": "object"}', "json")):
        result = ingest(json.dumps({"id": 1, "prompt": "Hi", field: value}).encode() + b"\n")
        assert not result.valid and [e.message for e in result.errors] == [
            f"line 1: unsupported field(s): '{field}' (a structured-output constraint belongs in "
            f'"structured_outputs": {{"{inner}": ...}})'], field
    assert ingest(b'{"id": 1, "prompt": "Hi", "structured_outputs": {"regex": "[0-9]+"}, "rating": 3}\n').valid


def test_a_tables_column_that_only_shares_a_constraints_name_stays_an_ignored_column():
    """A dataset's "choice" label ("B"), a "json" flag or a "json_object" of false constrain nothing a user meant:
    only a value shaped as the constraint fails the line (the test above)."""
    for field, value in (("choice", "B"), ("choice", 2), ("json", True), ("json_schema", "a name"),
                         ("json_object", False), ("regex", None), ("grammar", 3), ("grammar", "ungrammatical"),
                         ("json", {"a": 1}), ("json", '{"a": 1}'), ("ebnf", "")):
        result = ingest(json.dumps({"id": 1, "prompt": "Hi", field: value}).encode() + b"\n")
        assert result.valid and result.ignored_fields == {field: 1}, (field, value)


def test_a_template_that_loops_over_content_gets_text_parts_as_vllms_auto_format_gives_them():
    """A template written for OpenAI's content parts iterated the string by character and lost the text
    ("user\n" with nothing after it); vLLM's "auto" content format gives such a template the parts."""
    from batchllm.inputs import loops_over_content

    parts = ("{% for m in messages %}{{ m.role }}:{% for part in m['content'] %}{% if part.type == 'text' %}"
             "{{ part.text }}{% endif %}{% endfor %};{% endfor %}")
    either = ("{% for message in messages %}{% if message.content is string %}{{ message.content }}{% else %}"
              "{% for c in message.content %}{{ c.text }}{% endfor %}{% endif %};{% endfor %}")
    plain = "{% for m in messages %}{{ m.content | trim }};{% endfor %}"
    assert loops_over_content(parts) and loops_over_content(either) and not loops_over_content(plain)
    assert loops_over_content("{% for m in messages %}{% generation %}{% for p in m.content %}{{ p.text }}"
                              "{% endfor %}{% endgeneration %}{% endfor %}"), "transformers' own tags parse"
    assert not loops_over_content("{% for x in tools %}{% for y in x.content %}{% endfor %}{% endfor %}"
                                  "{{ messages }}"), "only a message's content, as vLLM's detection"
    prompts = processor()
    assert not loops_over_content(prompts.tokenizer.chat_template), "SmolLM2's takes strings"
    chat = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": [
        {"type": "text", "text": "4"}, {"type": "text", "text": "!"}]}, {"role": "user", "content": None}]
    assert prompts.apply_chat_template(chat, chat_template=parts) == "user:What is 2+2?;assistant:4!;user:;"
    assert prompts.apply_chat_template(chat, chat_template=either) == "What is 2+2?;4!;;"
    assert prompts.apply_chat_template(chat, chat_template=parts, content_format="string") == (
        "user:;assistant:;user:;"), "vLLM's string format: the text is joined, and this template loses it"
    tool = [{"role": "tool", "content": [{"type": "text", "text": "42"}]}]  # (vLLM: a tool result stays text)
    assert prompts.apply_chat_template(tool, chat_template="{{ messages[0].content | tojson }}{{ messages }}",
                                       content_format="openai").startswith('"42"')
    assert prompts.apply_chat_template(chat, chat_template=plain, content_format="openai").startswith(
        "[{'type': 'text', 'text': 'What is 2+2?'}]")


def test_tools_reach_the_template_as_vllms_server_passes_them_and_plain_lines_take_them():
    """vLLM dumps each tool through its pydantic model: type, then the function's name, description and parameters
    (null where missing), strict only where given; templates write them with tojson, so the prompt held the body's
    own order and no nulls. A plain messages line's tools were ignored as a table's column."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}], "tool_choice": "none"}
    given = [{"function": {"parameters": {"type": "object"}, "name": "weather", "x-extra": 1}},
             {"type": "function", "function": {"name": "now", "strict": True}, "defer_loading": True}]
    tools = body_to_request("/v1/chat/completions", {**chat, "tools": given}).template["tools"]
    assert tools == [{"type": "function", "function": {"name": "weather", "description": None,
                                                       "parameters": {"type": "object"}, "x-extra": 1}},
                     {"type": "function", "function": {"name": "now", "description": None, "parameters": None,
                                                       "strict": True, "defer_loading": True},
                      "defer_loading": True}]
    assert list(tools[0]["function"]) == ["name", "description", "parameters", "x-extra"]
    for bad, message in (([{"type": "function"}], r"tools\[0\] must be"),
                         ([{"function": {"name": "a", "parameters": "x"}}], r"tools\[0\].function.parameters")):
        with pytest.raises(BodyError, match=message):
            body_to_request("/v1/chat/completions", {**chat, "tools": bad})
    plain = ingest((json.dumps({"id": 1, "messages": chat["messages"], "tools": given[:1]}) + "\n"
                    + json.dumps({"id": 2, "prompt": "x", "tools": given[:1]}) + "\n").encode())
    assert [v.line.chat_template_kwargs["tools"] for v in plain.valid] == [given[:1]], "as LLM.chat's: as given"
    assert plain.ignored_fields == {}
    assert "'chat_template_kwargs', 'tools' and 'documents' need 'messages'" in plain.errors[0].message


def test_a_plain_lines_tool_choice_and_documents_and_an_openai_bodys_flags_as_vllm_reads_them():
    """A plain line's tool_choice "auto" and its documents were ignored as a table's columns (the answer passed
    as a success, the documents never reached the template); an OpenAI body's add_generation_prompt "false" failed
    its line (vLLM's server reads it as false)."""
    from batchllm.io.openai_batch import body_to_request

    messages = [{"role": "user", "content": "Hi"}]
    tool = {"type": "function", "function": {"name": "weather"}}
    lines = [{"id": 1, "messages": messages, "tools": [tool], "tool_choice": "auto"},
             {"id": 2, "messages": messages, "tools": [tool], "tool_choice": "none",
              "documents": [{"title": "t", "text": "d"}]}]
    result = ingest("".join(json.dumps(line) + "\n" for line in lines).encode())
    assert '"tool_choice": "auto" (vLLM\'s default where tools are given) needs a tool-call parser' in (
        result.errors[0].message)
    assert result.valid[0].line.chat_template_kwargs == {"tools": [tool], "documents": [{"title": "t", "text": "d"}]}
    assert result.ignored_fields == {}
    for value, expected in (("false", False), ("True", True), (0, False)):
        asked = body_to_request("/v1/chat/completions", {"messages": messages, "add_generation_prompt": value})
        assert asked.template["add_generation_prompt"] is expected
    openai = ingest((json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {
        "messages": messages, "add_generation_prompt": "false"}}) + "\n").encode())
    assert openai.valid[0].line.continued_role == "user"
    # tools in chat_template_kwargs reach the template over the body's, as vLLM 0.26's server merges them (the
    # body's are defaults under the request's keywords; a review ran vLLM's code: the line was refused here); the
    # body's tools alone drive the tool-call parser
    other = {"type": "function", "function": {"name": "clock"}}
    asked = body_to_request("/v1/chat/completions", {"messages": messages, "chat_template_kwargs": {"tools": [tool]}})
    assert asked.template == {"tools": [tool]} and asked.tool_call is None
    asked = body_to_request("/v1/chat/completions", {"messages": messages, "tools": [other], "tool_choice": "required",
                                                     "chat_template_kwargs": {"tools": [tool], "x": 1}})
    assert asked.template == {"tools": [tool], "x": 1}
    assert asked.tool_call.name is None and "clock" in json.dumps(asked.overrides["structured_outputs"])
    assert "weather" not in json.dumps(asked.overrides["structured_outputs"])


def test_token_id_lists_written_as_floats_are_read_as_integers_and_an_old_backend_field_says_remove_it():
    """[9230.0, 2838] in stop_token_ids, allowed_token_ids or logprob_token_ids failed the line (vLLM's server
    reads them as integers); guided_decoding_backend was told to become structured_outputs."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    result = ingest(b'{"id": 1, "prompt": "x", "stop_token_ids": [2.0], "allowed_token_ids": [5.0, 6],'
                    b' "logprob_token_ids": [7.0]}\n{"id": 2, "prompt": "x", "stop_token_ids": [2.5]}\n')
    params = result.valid[0].params
    assert (params.stop_token_ids, params.allowed_token_ids, params.logprob_token_ids) == ([2], [5, 6], [7])
    assert "stop_token_ids must be a list of integers" in result.errors[0].message
    with pytest.raises(BodyError, match="guided_decoding_backend is vLLM's before 0.12: remove it"):
        body_to_request("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                 "guided_decoding_backend": "xgrammar"})


def test_a_one_line_chat_template_longer_than_a_file_name_is_the_template():
    """A minified template of 260 characters on one line failed with "File name too long" (an OSError from asking
    whether it names a file); vLLM takes it as the template."""
    from batchllm.inputs import read_chat_template

    template = "{% for m in messages %}" + "{{ m['role'] }}: {{ m['content'] }}" * 8 + "{% endfor %}" + " " * 40
    assert len(template) > 255 and read_chat_template(template) == template


def test_truncation_side_left_is_taken_and_right_refused_in_both_formats():
    """A plain line's truncation_side "right" was ignored as a table's column (its prompt cut from the left), and an
    OpenAI body's, vLLM 0.26's field, failed its line even at "left", the side truncation takes. An OpenAI body's
    "right" beside no truncate_prompt_tokens changes nothing in vLLM, and runs."""
    lines = [{"id": "a", "prompt": "x", "truncation_side": "left", "truncate_prompt_tokens": 1},
             {"id": "b", "prompt": "x", "truncation_side": "right"},
             {"custom_id": "c", "url": "/v1/completions", "body": {"prompt": "x", "truncation_side": "left"}},
             {"custom_id": "d", "url": "/v1/completions", "body": {"prompt": "x", "truncation_side": "right",
                                                                   "truncate_prompt_tokens": 1}},
             {"custom_id": "e", "url": "/v1/completions", "body": {"prompt": "x", "truncation_side": "right"}}]
    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert sorted(v.line.request_id for v in result.valid) == ["a", "c", "e"]
    messages = sorted(e.message for e in result.errors)
    assert messages[0].startswith("line 2: truncation_side 'right' is not supported")
    assert messages[1].startswith("line 4: body field 'truncation_side' = \"right\" is not supported")


def test_an_openai_lines_min_tokens_past_what_the_context_leaves_fails_it_as_vllm():
    """A chat line without max_tokens runs to the context; a min_tokens past what it leaves was silently not honoured
    (the answer ended at the context with fewer tokens); vLLM's server refuses it."""
    from batchllm.io.ingest import ENDPOINT_DEFAULTS, OPENAI_MAX_TOKENS

    body = {"messages": [{"role": "user", "content": "Hi"}]}
    lines = [{"custom_id": "a", "url": "/v1/chat/completions", "body": {**body, "min_tokens": 9000}},
             {"custom_id": "b", "url": "/v1/chat/completions", "body": {**body, "min_tokens": 100}}]
    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines),
                    defaults={"max_tokens": 4, OPENAI_MAX_TOKENS: ENDPOINT_DEFAULTS})
    assert [v.line.request_id for v in result.valid] == ["b"]
    assert re.fullmatch(r"line 1: min_tokens must be <= max_tokens \(81\d\d: what the context of 8192 tokens leaves "
                        r"after the \d+-token prompt\), got 9000", result.errors[0].message)
    # a max_tokens of the model's above what the context leaves: vLLM's server takes the smaller, and refuses the
    # min_tokens past it (it ran, ending at the context with fewer)
    from batchllm.io.ingest import MODEL_FOR_CHAT

    result = ingest(b"".join(json.dumps(line).encode() + b"\n" for line in lines),
                    defaults={"max_tokens": 9500, OPENAI_MAX_TOKENS: MODEL_FOR_CHAT})
    assert [v.line.request_id for v in result.valid] == ["b"]
    assert re.fullmatch(r"line 1: min_tokens must be <= max_tokens \(81\d\d: what the context of 8192 tokens leaves "
                        r"after the \d+-token prompt\), got 9000", result.errors[0].message)


def test_default_chat_template_kwargs_go_under_each_chat_lines_own(monkeypatch, tmp_path):
    """vLLM's --default-chat-template-kwargs (Qwen3's '{"enable_thinking": false}' for a whole file) was
    refused; it now reaches every chat line's template, under the line's own keywords (a line's null or
    "auto" leaves the default, as vLLM merges them), and a text prompt is left alone."""
    tokenizer = processor().tokenizer
    template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}|{{ tone }}")
    monkeypatch.setattr(tokenizer, "chat_template", template)
    messages = [{"role": "user", "content": "Hi"}]
    lines = [{"id": "plain", "messages": messages},
             {"id": "own", "messages": messages, "chat_template_kwargs": {"enable_thinking": True}},
             {"id": "null", "messages": messages, "chat_template_kwargs": {"enable_thinking": None, "tone": "auto"}},
             {"custom_id": "oa", "url": "/v1/chat/completions", "body": {"messages": messages}},
             {"id": "text", "prompt": "Hi"}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = prepare_lines(path, processor(), {"max_tokens": 4}, None,
                           serving=LineServing({"enable_thinking": False, "tone": "dry"}))
    texts = {v.line.request_id: tokenizer.decode(v.prompt.array.tolist()) for v in result.valid}
    assert texts == {"plain": "Hi/no_think|dry", "own": "Hi|dry", "null": "Hi/no_think|dry",
                     "oa": "Hi/no_think|dry", "text": "Hi"}, texts
    unset = prepare_lines(path, processor(), {"max_tokens": 4}, None)
    assert tokenizer.decode(unset.valid[0].prompt.array.tolist()) == "Hi|"
    from batchllm.io.openai_batch import with_template_defaults

    defaults = {"enable_thinking": False}
    assert with_template_defaults(defaults, None, openai=True) is defaults, "lines without keywords share it"
    assert with_template_defaults({**defaults, "add_generation_prompt": False}, None, openai=True) == defaults


def test_an_openai_body_decides_its_generation_prompt_over_template_keywords(monkeypatch, tmp_path):
    """As vLLM's server merges them: an OpenAI body's add_generation_prompt (true unless it says false) and
    continue_final_message beat its chat_template_kwargs and the job's defaults; a plain line's keywords and the
    job's defaults decide them for a plain line."""
    tokenizer = processor().tokenizer
    monkeypatch.setattr(tokenizer, "chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                                    "{% if add_generation_prompt %}|GEN{% endif %}")
    messages = [{"role": "user", "content": "Hi"}]
    lines = [{"custom_id": "oa", "url": "/v1/chat/completions",
              "body": {"messages": messages, "chat_template_kwargs": {"add_generation_prompt": False}}},
             {"custom_id": "oa-body", "url": "/v1/chat/completions",
              "body": {"messages": messages, "add_generation_prompt": False}},
             {"id": "plain", "messages": messages}]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = prepare_lines(path, processor(), {"max_tokens": 4}, None,
                           serving=LineServing({"add_generation_prompt": False}))
    texts = {v.line.request_id: tokenizer.decode(v.prompt.array.tolist()) for v in result.valid}
    assert texts == {"oa": "Hi|GEN", "oa-body": "Hi", "plain": "Hi"}, texts


def test_a_plain_lines_error_stays_plain_in_a_file_of_mostly_openai_lines():
    """A plain line (it has a prompt field) that failed while being read (a misspelt field, a duplicate id) took the
    file's majority format: in a mostly-OpenAI file its error went to the errors file as an OpenAI record, and the
    output held nothing for its id. A line that shows no format of its own still takes the file's."""
    from batchllm.io.jsonl import OPENAI, PLAIN

    for raw, expected in ((b'{"id": "x", "prompt": "a", "temprature": 0.5}', PLAIN),
                          (b'{"id": "d", "prompt": "a"}', None),
                          (b'{"id": "y", "url": "/v1/completions", "body": {"prompt": "a"}}', None),
                          (b'{"custom_id": "c", "url": "/v1/nope", "body": {}}', OPENAI),
                          (b'{"id": "s", "prompt": "bad \\ud800 x"}', PLAIN)):  # (a lone surrogate)
        parsed = parse_line(raw, 1)
        if expected is None and isinstance(parsed, BatchLine):
            continue
        assert isinstance(parsed, LineError) and parsed.format == expected, (raw, parsed)
    assert not parse_line(b'{"id": "y", "url": "/v1/completions", "body": {"prompt": "a"}}', 2).is_openai()
    assert parse_line(b'{"id": "y", "url": "/v1/completions", "body": {"prompt": "a"}}', 2).is_openai(OPENAI)


def test_a_chat_echo_asks_for_prompt_logprobs_as_vllms():
    """vLLM's chat request: prompt_logprobs, where the body gives none and `echo` is true, is `top_logprobs` (0 where
    not given; an explicit null leaves none). The chat answer's `prompt_logprobs` was null with echo."""
    from batchllm.io.openai_batch import body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}], "echo": True}

    def asked(**body):
        return body_to_request("/v1/chat/completions", {**chat, **body}).overrides.get("prompt_logprobs")

    assert asked() == 0 and asked(logprobs=True, top_logprobs=3) == 3 and asked(logprobs=True, top_logprobs="2") == 2
    assert asked(prompt_logprobs=1, logprobs=True, top_logprobs=3) == 1, "the body's own wins"
    assert asked(top_logprobs=None) is None and asked(echo=False) is None and asked(echo="false") is None


def _old_sampling_params_for(line, defaults, global_seed):
    """sampling_params_for before seeded lines shared their settings: one SamplingParams per line, built whole."""
    import zlib

    from batchllm.io.ingest import _line_fields

    fields = _line_fields(line, defaults)
    if fields.get("seed") in (None, -1) and global_seed is not None:
        rid = line.request_id
        fields["seed"] = zlib.crc32(f"{global_seed}:{rid if isinstance(rid, str) else f'#{rid}'}".encode())
    return SamplingParams(**fields)


SEEDED_LINE_FIELDS = [{}, {"seed": 5}, {"seed": -1}, {"seed": 2**64 - 1}, {"seed": 2**64 - 1, "n": 2, "temperature": 1},
                      {"seed": "x"}, {"seed": 1.5}, {"seed": True}, {"seed": 3, "max_tokens": 0}, {"temperature": 9},
                      {"seed": -2**63}, {"seed": -2**63 - 1}, {"stop": ["a", "b"], "seed": 7},
                      {"n": 3, "temperature": 1}]


@pytest.mark.parametrize("global_seed", [None, 0, 1234])
def test_seeded_lines_get_the_same_sampling_params_as_before_and_share_their_settings(global_seed):
    """Regression: the per-line seed (the line's, or --seed's derived one) was part of the sampling cache's key,
    so a seeded job built a whole SamplingParams per line (~1.9 KB: 10,000 objects for 10,000 lines instead of 2).
    Each line's params must equal what it was (every field, the seed included, and the same error for a bad
    value), while the lines of one setting share their values: the per-line object is a small copy."""
    cache: dict = {}
    made = []
    for i, fields in enumerate(SEEDED_LINE_FIELDS * 3):
        line = BatchLine(i, f"id-{i}" if i % 2 else i, "x", False, dict(fields))
        try:
            old = _old_sampling_params_for(line, {"max_tokens": 4}, global_seed)
        except ValueError as e:
            with pytest.raises(ValueError) as new_error:
                sampling_params_for(line, {"max_tokens": 4}, global_seed, cache)
            assert str(new_error.value) == str(e)
            continue
        new = sampling_params_for(line, {"max_tokens": 4}, global_seed, cache)
        assert new == old and new.seed == old.seed and type(new.seed) is type(old.seed)
        assert (new._stop_list, new.stop, new.stop_token_ids, new.n) == (old._stop_list, old.stop, old.stop_token_ids,
                                                                          old.n)
        made.append(new)
    seeded = [sp for sp in made if sp.seed is not None and sp.stop == []]
    assert len(seeded) >= 9 and len({id(sp.stop_token_ids) for sp in seeded}) <= len(cache)  # values shared
    assert not hasattr(seeded[0], "__dict__"), "a per-line object holds its fields in slots"


def test_a_seeded_jobs_lines_cost_little_more_than_an_unseeded_jobs():
    """The memory of prepare_lines follows the token arrays, not the line count: --seed adds a small object per
    line (here ~670 bytes a line unseeded; seeded ~2,560 before, ~1,040 now)."""
    import gc
    import tracemalloc

    data = b"".join(json.dumps({"id": i, "prompt": f"p {i}", "temperature": 0.7}).encode() + b"\n" for i in range(3000))
    held = {}
    ingest(data, seed=7)  # (first: what the first use of the tokenizer and the parser allocates for good)
    for seed in (None, 7):
        gc.collect()
        tracemalloc.start()
        result = ingest(data, seed=seed)
        gc.collect()
        held[seed] = tracemalloc.get_traced_memory()[0] / len(result.valid)
        tracemalloc.stop()
        del result
    assert held[7] - held[None] < 600, held


@pytest.mark.parametrize("n", [1, 2])
def test_seeded_lines_generate_the_same_tokens_as_their_own_sampling_params(tiny_model_factory, n):
    """The outputs of seeded lines do not change: params `with_seed` sample as a SamplingParams built whole."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", skip_tokenizer_init=True,
              kv_cache_memory_gib=64 * 2048 / 2**30)
    prompts = [{"prompt_token_ids": [100 + 7 * i + j for j in range(5 + i % 3)]} for i in range(8)]
    shared = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, n=n)
    seeds = [1, 2, 3, 2**32 - 1, 7, 7, 123456789, 0]
    built = llm.generate(prompts, [SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, n=n, seed=s)
                                   for s in seeds], use_tqdm=False)
    copied = llm.generate(prompts, [shared.with_seed(s) for s in seeds], use_tqdm=False)
    tokens = lambda outputs: [[c.token_ids for c in o.outputs] for o in outputs]  # noqa: E731
    assert tokens(copied) == tokens(built)
    assert len({tuple(t[0]) for t in tokens(built)}) > 1, "the seeds sample different tokens"


def test_a_plain_lines_bad_messages_are_named_in_llm_chats_words():
    """A plain line's bad "messages" said "'messages' must be a non-empty list", naming neither what a conversation
    is nor what was given, where LLM.chat now says both; the line's error uses those words."""
    from batchllm.inputs import NOT_A_CONVERSATION
    from batchllm.io.jsonl import parse_line

    one = {"role": "user", "content": "Hi"}
    for value, got in (("hello", "str 'hello'"), ([], "an empty list"),
                       (one, "dict {'content': 'Hi', 'role': 'user'} (one message: wrap it in a list)")):
        line = parse_line(json.dumps({"id": 1, "messages": value}).encode(), 3)
        assert line.message == f"line 3: 'messages': {NOT_A_CONVERSATION}, got {got}", value
    assert NOT_A_CONVERSATION.startswith("a conversation is a non-empty list of message dicts")


def test_a_null_prompt_field_is_not_given_in_a_plain_line_as_in_a_ray_row():
    """A table written with gaps holds null where a row has no value: {"prompt": null, "prompt_token_ids": [...]}
    failed as a plain line ("'prompt' beside 'prompt_token_ids' must be a string") and ran as a Ray row, and
    {"prompt": "x", "prompt_token_ids": null} likewise. A null field is not given in both."""
    result = ingest(b'{"id": 1, "prompt": null, "prompt_token_ids": [5, 6]}\n'
                    b'{"id": 2, "prompt": "Hi", "prompt_token_ids": null, "messages": null}\n'
                    b'{"id": 3, "prompt": null}\n')
    assert {v.line.request_id: v.prompt.token_ids.tolist()[-2:] for v in result.valid}[1] == [5, 6]
    assert [v.line.request_id for v in result.valid] == [1, 2]
    assert parse_line(b'{"id": 2, "prompt": "Hi", "prompt_token_ids": null}', 1).prompt == "Hi"
    assert [e.message for e in result.errors] == ["line 3: needs exactly one of prompt, messages, prompt_token_ids "
                                                  "(or 'prompt_token_ids' with its 'prompt' text)"]


def test_an_id_goes_to_the_first_line_that_is_accepted():
    """An OpenAI line refused for its content (temperature 7) took its custom_id: a later valid line with that id
    failed as its duplicate, and the id got no answer. The id now goes to the first accepted line; a later line with
    it is still refused, its error naming the line that has it (plain lines too, across tokenizer chunks)."""
    def openai(cid, **body):
        return {"custom_id": cid, "url": "/v1/completions", "body": {"prompt": "Hi", "max_tokens": 2, **body}}

    lines = [openai("d", temperature=7), openai("d"), {"id": "x", "prompt": "Hi"}, {"id": "y", "prompt": "Hi"},
             {"id": "z", "prompt": "Hi"}, {"id": "x", "prompt": "again"}, openai("d")]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    result = ingest(data)
    assert [(v.line.line_number, v.line.request_id) for v in result.valid] == [(2, "d"), (3, "x"), (4, "y"), (5, "z")]
    assert [(e.line_number, e.request_id) for e in result.errors] == [(1, "d"), (6, "x"), (7, "d")]
    assert "temperature" in result.errors[0].message
    assert result.errors[1].message == "line 6: duplicate id 'x' (line 3 has it)"
    assert result.errors[2].message == "line 7: duplicate custom_id 'd' (line 2 has it)"
    assert result.errors[2].record()["error"]["message"] == "line 7: duplicate custom_id 'd' (line 2 has it)"

    with tempfile.TemporaryDirectory() as tmp:  # resumed: the answered line keeps its id, the duplicates stay so
        (path := Path(tmp) / "in.jsonl").write_bytes(data)
        resume = ResumeState(done_ids={"d", "x"}, done_error_lines={1})
        resumed = prepare_lines(path, processor(), {"max_tokens": 4}, None, resume, chunk=3)
        assert [v.line.request_id for v in resumed.valid] == ["y", "z"]
        assert [(e.line_number, e.message) for e in resumed.errors] == [
            (6, "line 6: duplicate id 'x' (line 3 has it)"), (7, "line 7: duplicate custom_id 'd' (line 2 has it)")]


def test_the_reading_bar_into_a_log_redraws_every_few_seconds(tmp_path, monkeypatch):
    """Into a stderr that is no terminal (a log file, Slurm's output) the "reading" bar redrew its line every
    0.1 s, as the token bar did (progress.py): it now writes a line every LOG_INTERVAL_S (`progress.CountLog`). Its
    clock is a fake that moves 0.05 s a reading, so 400 lines span 20 s: a handful of lines, not a hundred."""
    import io
    from types import SimpleNamespace

    from batchllm import progress
    from batchllm.progress import LOG_INTERVAL_S

    clock = iter(range(10**6))
    monkeypatch.setattr(progress, "time", SimpleNamespace(perf_counter=lambda: next(clock) * 0.05))
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"id": {i}, "prompt_token_ids": [5, 6]}}\n' for i in range(400)))
    result = prepare_lines(path, processor(), {"max_tokens": 4}, None, ResumeState(), progress=True)
    assert len(result.valid) == 400
    redraws = log.getvalue().count("reading")
    assert 2 <= redraws <= 2 + 20 / LOG_INTERVAL_S * 2, log.getvalue()


def test_reading_into_a_log_writes_whole_lines(tmp_path, capsys, monkeypatch):
    """Into a file (stderr no terminal) the reading counter was tqdm's: \\r-joined redraws on one growing line, and
    an interrupt's message glued onto its end. It now writes whole lines, as the tokens' progress does there: one
    per interval (none for a read shorter than one) and a last with the total."""
    from batchllm import progress

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{k}", "prompt": "Hi"}) + "\n" for k in range(5)))
    prepare_lines(path, processor(), {"max_tokens": 4}, None, ResumeState(), progress=True)
    assert capsys.readouterr().err == "", "a quick read says nothing (old: tqdm's \\r redraws)"
    monkeypatch.setattr(progress.CountLog.__init__, "__defaults__", (0.0,))  # (a line per update)
    prepare_lines(path, processor(), {"max_tokens": 4}, None, ResumeState(), progress=True)
    lines = capsys.readouterr().err.split("\n")
    assert lines[-1] == "" and len(lines) == 5 + 2 and "\r" not in "".join(lines)
    assert [re.match(r"reading: (\d+) lines \[00:00, \d+ lines/s\]$", line)[1] for line in lines[:-1]] == [
        "1", "2", "3", "4", "5", "5"]


def test_an_openai_bodys_add_special_tokens_is_taken_as_vllms_server_takes_it(tiny_model_factory, tmp_path):
    """vLLM's server tokenizes a body's text with or without special tokens as its add_special_tokens says; a
    value other than the endpoint's default failed the line ("not supported"), though plain lines took it."""
    from batchllm.inputs import prompt_processor_for
    from tests.unit.test_vllm_port_api import _with_bos

    tokenizer_dir = _with_bos(tiny_model_factory("llama"), tmp_path)
    prompts = prompt_processor_for(tokenizer_dir)
    plain = prompts.tokenizer("The sky is", add_special_tokens=False)["input_ids"]
    lines = [{"custom_id": name, "url": "/v1/completions", "body": {"prompt": "The sky is", **extra}}
             for name, extra in (("default", {}), ("without", {"add_special_tokens": False}),
                                 ("as-text", {"add_special_tokens": "false"}), ("with", {"add_special_tokens": 1}),
                                 ("opens-with-bos", {"prompt": "<|im_start|>The sky is", "add_special_tokens": True}))]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = prepare_lines(path, prompts, {"max_tokens": 2}, None, ResumeState())
    assert not result.errors, result.errors
    tokens = {v.line.request_id: v.prompt.array.tolist() for v in result.valid}
    assert tokens == {"default": [1, *plain], "without": plain, "as-text": plain, "with": [1, *plain],
                      "opens-with-bos": [1, *plain]}, "the endpoint's default, stated, tokenizes as left out"


def test_fields_vllm_reads_to_no_effect_are_taken_and_its_lax_values_are_read():
    """vLLM's server takes these and nothing changes (length_penalty outside beam search, truncation_side beside no
    truncation, thinking_token_budget -1, empty stream_options or suffix, extra_args for connectors and plugins,
    OpenAI's prediction); each failed its line. Its lax reading takes 1/0 for booleans, ids and numbers written as
    text, and clamps a logit_bias to [-100, 100]."""
    from batchllm.io.openai_batch import BodyError, body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    no_effect = {"length_penalty": 0.5, "truncation_side": "right", "thinking_token_budget": -1, "stream_options": {},
                 "prediction": {"type": "content", "content": "x"}, "vllm_xargs": {"a": 1},
                 "kv_transfer_params": {"k": 1}, "ec_transfer_params": {"e": 1}, "priority": "0"}
    for penalty in (True, "1.0"):  # (pydantic's lax float)
        assert body_to_request("/v1/chat/completions", {**chat, "length_penalty": penalty}).overrides == {}
    assert body_to_request("/v1/chat/completions", {**chat, **no_effect}).overrides == {}
    assert body_to_request("/v1/completions", {"prompt": "x", "suffix": ""}).overrides == {}
    lax = {"ignore_eos": 1.0, "skip_special_tokens": 0, "stop_token_ids": ["2", 3.0], "allowed_token_ids": [" 504 "],
           "logit_bias": {"504": "5", "28": 150, "29": -1e9}}
    assert body_to_request("/v1/chat/completions", {**chat, **lax}).overrides == {
        "ignore_eos": True, "skip_special_tokens": False, "stop_token_ids": [2, 3], "allowed_token_ids": [504],
        "logit_bias": {"504": 5.0, "28": 100.0, "29": -100.0}}
    for bad, message in (({"truncation_side": "right", "truncate_prompt_tokens": 3}, "'truncation_side' = \"right\""),
                         ({"stream_options": {"include_usage": True}}, "'stream_options'"),
                         ({"thinking_token_budget": 5}, "'thinking_token_budget' = 5"),
                         ({"logit_bias": {"504": "x"}}, "logit_bias['504'] must be a number, got \"x\""),
                         ({"ignore_eos": 2}, "ignore_eos"),
                         ({"truncation_side": "middle"}, "'truncation_side' = \"middle\" is not supported (only "
                                                         "\"left\", or \"right\" beside no truncate_prompt_tokens)"),
                         ({"length_penalty": "abc"}, "'length_penalty' must be a number"),
                         ({"thinking_token_budget": "-1"}, "'thinking_token_budget' must be an integer"),
                         ({"vllm_xargs": "x"}, "'vllm_xargs' must be an object"),
                         ({"seed": 9.3e18}, "'seed' must lie in a signed 64-bit integer")):
        with pytest.raises((BodyError, ValueError), match=re.escape(message)):
            request = body_to_request("/v1/chat/completions", {**chat, **bad})
            SamplingParams(**request.overrides)


def test_a_chats_explicit_null_top_logprobs_asks_for_no_logprobs_as_in_vllm():
    """vLLM samples a chat with logprobs=top_logprobs (None for an explicit null) and answers no logprobs; this
    answered each token's logprob with empty top lists. Unset, top_logprobs is 0 there and here."""
    from batchllm.io.openai_batch import body_to_request

    chat = {"messages": [{"role": "user", "content": "Hi"}], "logprobs": True}
    assert body_to_request("/v1/chat/completions", {**chat, "top_logprobs": None}).overrides["logprobs"] is None
    assert body_to_request("/v1/chat/completions", chat).overrides["logprobs"] == 0
    named = body_to_request("/v1/chat/completions", {**chat, "top_logprobs": None, "logprob_token_ids": [28]})
    assert named.overrides["logprob_token_ids"] == [28] and "logprobs" not in named.overrides


@pytest.mark.parametrize("change", ["grown", "shrunk", "rewritten"])
def test_an_input_that_changes_as_the_job_starts_stops_it_before_any_line_runs(tmp_path, change):
    """The job is tied to its input's bytes (size and SHA-256) when it starts, and its lines were read again by path
    while the model loaded: a file grown, cut or rewritten in between ran the lines read, the counts disagreed
    (`num_lines_left` -20 in --stats), and the same command was then refused as another input. The reading now
    checks it read the bytes the job was tied to."""
    from batchllm.io.job import InputChanged, prepare_output

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": f"r{i}", "prompt": "hi"}) + "\n" for i in range(4)]
    src.write_text("".join(lines))
    resume = prepare_output(out, src, overwrite=False, defer_start=True)
    assert prepare_lines(src, processor(), {"max_tokens": 4}, None, resume).valid, "unchanged: read as it was"
    src.write_text({"grown": "".join(lines + lines[:1]).replace('"r0"', '"r9"', 1), "shrunk": "".join(lines[:2]),
                    "rewritten": "".join(lines).replace("hi", "ho")}[change])
    with pytest.raises(InputChanged, match="changed while the job read it") as changed:
        prepare_lines(src, processor(), {"max_tokens": 4}, None, resume)
    import pickle

    again = pickle.loads(pickle.dumps(changed.value))  # (as a Ray task's error reaches the driver)
    assert type(again) is InputChanged and str(again) == str(changed.value)
