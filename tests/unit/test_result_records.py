"""The records `batchllm run` writes for a plain line (`io.jsonl.result_record`) and an OpenAI line
(`io.openai_batch.success_record`): every completion of an n > 1 line keeps its own logprobs, and each
says what ended it (vLLM's stop_reason)."""

from __future__ import annotations

import pytest

from batchllm.io.ingest import LineServing
from batchllm.io.jsonl import result_record
from batchllm.io.openai_batch import CHAT_URL, success_record
from batchllm.request_output import CompletionOutput, Logprob, RequestOutput


def two_samples() -> RequestOutput:
    def completion(index, tokens, stop_reason):
        logprobs = [{t: Logprob(-0.5 - index, rank=1, decoded_token=f"t{t}")} for t in tokens]
        return CompletionOutput(index, f"text {index}", tokens, -1.0, logprobs, finish_reason="stop",
                                stop_reason=stop_reason)

    return RequestOutput("r", "p", [1, 2], None, [completion(0, [5, 6], "."), completion(1, [7, 8, 9], 9)])


def test_every_sample_of_a_plain_line_keeps_its_logprobs():
    """Samples 1 .. n-1 of a plain line lost their logprobs: only the first one's were written."""
    record = result_record("a", two_samples(), prompt_tokens=2)
    assert record["text"] == "text 0" and record["stop_reason"] == "."
    assert [e["token_id"] for e in record["logprobs"]] == [5, 6]
    second = record["outputs"][1]
    assert second["token_ids"] == [7, 8, 9] and second["stop_reason"] == 9
    assert [(e["token_id"], e["logprob"]) for e in second["logprobs"]] == [(7, -1.5), (8, -1.5), (9, -1.5)]
    assert record["completion_tokens"] == 5


def test_openai_choices_say_what_ended_them():
    body = success_record("c", CHAT_URL, "m", two_samples(), prompt_tokens=2)["response"]["body"]
    assert [c["stop_reason"] for c in body["choices"]] == [".", 9]


def test_a_positions_logprobs_start_with_the_chosen_token_as_in_vllm():
    """vLLM puts the sampled (or prompt) token first; here it came last, so `next(iter(d.values()))`, a
    common way to read the token's own logprob (perplexity scoring), gave the top token's."""
    from batchllm.output_processor import logprob_entry
    from batchllm.outputs import TokenLogprobs

    below = logprob_entry(502, TokenLogprobs(-4.0, 14, [28, 281], [-0.5, -1.0]))
    assert list(below) == [502, 28, 281] and next(iter(below.values())).rank == 14
    output = RequestOutput("r", "p", [1], None,
                           [CompletionOutput(0, "x", [502], -4.0, [below], finish_reason="length")])
    top = result_record("a", output, prompt_tokens=1)["logprobs"][0]["top"]
    assert [e["rank"] for e in top] == [1, 2, 14], "a plain record's list stays in rank order"
    among = logprob_entry(281, TokenLogprobs(-1.0, 2, [28, 281], [-0.5, -1.0]))
    assert list(among) == [281, 28] and [lp.rank for lp in among.values()] == [2, 1]


def test_served_model_name_and_response_role_name_the_answer():
    """vLLM's run-batch --served-model-name names the model in every response (a line's own name where it is
    one of them), and --response-role the chat answer's role; without them a line's own model is echoed,
    and a line without one gets the model's."""
    import json

    from batchllm.io.ingest import ResponseShape, record_for
    from batchllm.io.jsonl import parse_line

    def body(line: dict, names: ResponseShape) -> dict:
        parsed = parse_line(json.dumps(line).encode(), 1)
        parsed.prompt = None  # (as `ingest.prepare_lines` drops it once tokenized: the role was read from it)
        return record_for(parsed, two_samples(), names)["response"]["body"]

    chat = {"custom_id": "c", "method": "POST", "url": CHAT_URL, "body": {"model": "gpt-x", "messages": [
        {"role": "user", "content": "hi"}]}}
    unnamed = {**chat, "body": {"messages": chat["body"]["messages"]}}
    assert body(chat, ResponseShape("/models/smol"))["model"] == "gpt-x"
    assert body(unnamed, ResponseShape("/models/smol"))["model"] == "/models/smol"
    served = body(chat, ResponseShape("/models/smol", ("smol-served", "smol"), "bot"))
    assert served["model"] == "smol-served", "a line naming another model gets the first served name"
    assert [c["message"]["role"] for c in served["choices"]] == ["bot", "bot"]
    smol = {**chat, "body": {**chat["body"], "model": "smol"}}
    assert body(smol, ResponseShape("/models/smol", ("smol-served", "smol")))["model"] == "smol", (
        "a line naming one of the served names gets its own back (vLLM's rule)")
    assert body(unnamed, ResponseShape("/models/smol", ("smol-served", "smol")))["model"] == "smol-served"
    assert {c["message"]["role"] for c in body(chat, ResponseShape("m"))["choices"]} == {"assistant"}
    # vLLM's rule: an answer that continues the last message (no generation prompt) takes that message's role
    continued = {**chat, "body": {**chat["body"], "add_generation_prompt": False, "continue_final_message": True,
                                  "messages": [*chat["body"]["messages"], {"role": "assistant", "content": "Hel"}]}}
    assert {c["message"]["role"] for c in body(continued, ResponseShape("m", (), "bot"))["choices"]} == {"assistant"}
    user_turn = {**chat, "body": {**chat["body"], "add_generation_prompt": False}}
    assert {c["message"]["role"] for c in body(user_turn, ResponseShape("m", (), "bot"))["choices"]} == {"user"}
    # vLLM reads the body's field, not chat_template_kwargs' (which reach the template only)
    kwargs_only = {**chat, "body": {**chat["body"], "chat_template_kwargs": {"add_generation_prompt": False}}}
    assert {c["message"]["role"] for c in body(kwargs_only, ResponseShape("m", (), "bot"))["choices"]} == {"bot"}


def test_reasoning_parsers_split_thinking_as_vllms():
    """vLLM's run-batch --reasoning-parser was refused; deepseek_r1 and qwen3 now split an answer as vLLM 0.26
    does (BaseThinkingReasoningParser; Qwen3Parser, which reads the line's enable_thinking)."""
    from batchllm.io.reasoning import REASONING_PARSERS, reasoning_parser_named

    r1, qwen3 = REASONING_PARSERS["deepseek_r1"], REASONING_PARSERS["qwen3"]
    assert r1("<think>plan</think>\n\nAnswer", None) == ("plan", "\n\nAnswer")
    assert r1("plan</think>Answer", None) == ("plan", "Answer"), "the template opened the thinking"
    assert r1("still thinking", None) == ("still thinking", None), "cut off inside the thinking"
    assert r1("<think>plan</think>", None) == ("plan", None)
    assert qwen3("<think>\nplan\n</think>\n\nAnswer</think>", {}) == ("\nplan\n", "\n\nAnswer"), (
        "a second </think> is dropped")
    assert qwen3("no tags", None) == ("no tags", None)
    assert qwen3("</think>Answer", None) == (None, "Answer")
    assert qwen3("<think>x</think>y", {"enable_thinking": False}) == (None, "<think>x</think>y")
    call = '<tool_call>\n{"name": "f"}\n</tool_call>'
    assert qwen3("I should call it" + call, None) == ("I should call it", call), "a tool call ends the thinking"
    assert qwen3("<think>plan</think>ok" + call, None) == ("plan", "ok" + call)
    assert reasoning_parser_named(None) is None
    import pytest

    with pytest.raises(ValueError, match="'granite' is not supported .*deepseek_r1, qwen3"):
        reasoning_parser_named("granite")


def test_a_chat_answers_reasoning_goes_to_its_message_and_structured_output_stays_whole():
    """With --reasoning-parser, a chat answer's thinking goes to `message.reasoning` (vLLM's field; null without a
    parser) and the rest to `content`; the message carries vLLM's other null fields. Completions, structured
    output (its grammar holds from the first token: unlike vLLM's, which waits for the thinking to end) and Qwen3
    lines without thinking are left whole."""
    import json

    from batchllm.io.ingest import ResponseShape, record_for
    from batchllm.io.jsonl import parse_line

    def message(body: dict, parser: str | None = "qwen3", url: str = CHAT_URL) -> dict:
        line = parse_line(json.dumps({"custom_id": "c", "url": url, "body": body}).encode(), 1)
        output = RequestOutput("r", "p", [1], None, [CompletionOutput(0, "<think>hm</think>Paris", [5], -1.0, None,
                                                                        finish_reason="stop")])
        names = ResponseShape("m", serving=LineServing(reasoning_parser=parser))
        choice = record_for(line, output, names)["response"]["body"]["choices"][0]
        return choice.get("message", choice)

    chat = {"messages": [{"role": "user", "content": "Capital?"}]}
    assert message(chat) == {"role": "assistant", "content": "Paris", "refusal": None, "annotations": None,
                             "audio": None, "function_call": None, "reasoning": "hm"}
    assert (message(chat, None)["content"], message(chat, None)["reasoning"]) == ("<think>hm</think>Paris", None)
    off = {**chat, "chat_template_kwargs": {"enable_thinking": False}}
    assert (message(off)["content"], message(off)["reasoning"]) == ("<think>hm</think>Paris", None)
    assert message({**chat, "reasoning_effort": "none"})["reasoning"] is None, "reasoning_effort none: no thinking"
    structured = {**chat, "response_format": {"type": "json_object"}}
    assert message(structured)["content"] == "<think>hm</think>Paris"
    assert message({"prompt": "Capital?"}, url="/v1/completions")["text"] == "<think>hm</think>Paris"


def test_include_reasoning_false_drops_the_reasoning_and_metadata_under_a_parser_as_vllms_server():
    """vLLM's include_reasoning false failed its line; vLLM 0.26's server, where a reasoning or tool-call parser
    runs, answers with the parser's content and no reasoning, logprobs or token ids, and without a parser changes
    nothing."""
    import json

    from batchllm.io.ingest import ResponseShape, record_for
    from batchllm.io.jsonl import parse_line
    from batchllm.io.openai_batch import BodyError, body_to_request

    def choice(body: dict, **serving) -> dict:
        line = parse_line(json.dumps({"custom_id": "c", "url": CHAT_URL, "body": body}).encode(), 1)
        logprobs = [{5: Logprob(-0.5, rank=1, decoded_token="x")}]
        output = RequestOutput("r", "p", [1], None, [CompletionOutput(0, "<think>hm</think>Paris", [5], -0.5, logprobs,
                                                                      finish_reason="stop")])
        return record_for(line, output, ResponseShape("m", serving=LineServing(**serving)))["response"]["body"][
            "choices"][0]

    chat = {"messages": [{"role": "user", "content": "Capital?"}], "logprobs": True, "return_token_ids": True}
    for serving in ({"reasoning_parser": "qwen3"}, {"auto_tool_parser": "hermes"}):
        shown, hidden = choice(chat, **serving), choice({**chat, "include_reasoning": "false"}, **serving)
        assert shown["logprobs"] is not None and shown["token_ids"] == [5], serving
        assert (hidden["message"]["reasoning"], hidden["logprobs"], hidden["token_ids"]) == (None, None, None)
        assert hidden["message"]["content"] == shown["message"]["content"], serving
    assert choice(chat, reasoning_parser="qwen3")["message"]["reasoning"] == "hm"
    unparsed = choice({**chat, "include_reasoning": False})
    assert unparsed["logprobs"] is not None and unparsed["token_ids"] == [5], "no parser: nothing changes"
    with pytest.raises(BodyError, match="'include_reasoning' must be true or false"):
        body_to_request(CHAT_URL, {**chat, "include_reasoning": "maybe"})


def test_the_system_fingerprint_follows_vllms_fingerprint_mode(tmp_path):
    """vLLM's run-batch writes system_fingerprint "vllm-<version>[-<parallelism>]-<hash8>" by default
    (--fingerprint-mode full); here it was always null and --fingerprint-mode / --fingerprint-value were
    unrecognized. The hash follows what serves the answers, not the options that do not."""
    import json
    import re

    from batchllm.cli import build_parser, response_shape
    from batchllm.io.ingest import record_for
    from batchllm.io.jsonl import parse_line

    def fingerprint(*flags) -> str | None:
        args = build_parser().parse_args(["run", "in.jsonl", "-o", "o.jsonl", *flags])
        line = parse_line(json.dumps({"custom_id": "c", "url": CHAT_URL, "body": {"messages": [
            {"role": "user", "content": "Hi"}]}}).encode(), 1)
        output = RequestOutput("r", "p", [1], None, [CompletionOutput(0, "x", [5], None, None, finish_reason="stop")])
        return record_for(line, output, response_shape(args, "m"))["response"]["body"]["system_fingerprint"]

    full = fingerprint()
    assert re.fullmatch(r"batchllm-[0-9.]+-[0-9a-f]{8}", full), full
    assert fingerprint("--fingerprint-mode", "hash") == full == fingerprint("--max-tokens", "9")
    assert fingerprint("--dtype", "float32") != full
    assert fingerprint("-dp", "2").startswith(full.rsplit("-", 1)[0] + "-dp2-")
    assert fingerprint("-dp", "2", "--fingerprint-mode", "hash") == full
    assert fingerprint("--fingerprint-mode", "custom", "--fingerprint-value", "mine") == "mine"
    assert fingerprint("--fingerprint-mode", "none") is None


def test_response_bodies_have_vllms_keys_and_answer_its_response_fields():
    """vLLM's run-batch writes every field of its response models (null where nothing is said): a parser indexing
    `body["service_tier"]` or `choice["token_ids"]` failed on ours. A body's `request_id` names the response
    (it was ignored) and `return_token_ids` gives the prompt's and each choice's token ids (it failed the line)."""
    import json

    from batchllm.io.ingest import ResponseShape, record_for
    from batchllm.io.jsonl import parse_line

    def body(url: str, fields: dict) -> dict:
        request = {"custom_id": "c", "url": url, "body": fields}
        line = parse_line(json.dumps(request).encode(), 1)
        return record_for(line, two_samples(), ResponseShape("m"))["response"]["body"]

    chat = body(CHAT_URL, {"messages": [{"role": "user", "content": "hi"}], "cache_salt": "s"})
    assert list(chat) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                          "usage", "prompt_logprobs", "prompt_token_ids", "prompt_text", "kv_transfer_params",
                          "ec_transfer_params", "metrics"]
    assert list(chat["choices"][0]) == ["index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids",
                                        "routed_experts"]
    assert chat["choices"][0]["token_ids"] is None and chat["prompt_token_ids"] is None
    text = body("/v1/completions", {"prompt": "hi"})
    assert list(text) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                          "usage", "kv_transfer_params", "ec_transfer_params", "metrics"]
    assert list(text["choices"][0]) == ["index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                                        "prompt_logprobs", "prompt_token_ids", "routed_experts"]
    asked = body(CHAT_URL, {"messages": [{"role": "user", "content": "hi"}], "request_id": "trace-7",
                            "return_token_ids": True})
    assert asked["id"] == "chatcmpl-trace-7" and asked["prompt_token_ids"] == [1, 2]
    assert [c["token_ids"] for c in asked["choices"]] == [[5, 6], [7, 8, 9]]
    import numpy as np

    ids = two_samples()
    ids.prompt_token_ids = np.array([1, 2], dtype=np.int32)  # (as `run` hands prompts over: the job crashed)
    request = {"custom_id": "c", "url": CHAT_URL, "body": {"messages": [{"role": "user", "content": "hi"}],
                                                           "return_token_ids": True}}
    record = record_for(parse_line(json.dumps(request).encode(), 1), ids, ResponseShape("m"))
    assert json.loads(json.dumps(record))["response"]["body"]["prompt_token_ids"] == [1, 2]
    asked = body("/v1/completions", {"prompt": "hi", "request_id": "r", "return_token_ids": "true"})
    assert asked["id"] == "cmpl-r" and asked["choices"][1]["token_ids"] == [7, 8, 9]
    assert asked["choices"][0]["prompt_token_ids"] == [1, 2]
    # echo: the prompt's text starts each choice's, but not beside return_token_ids, as vLLM writes it (the prompt
    # is in the ids: its text was there twice over)
    def echoed(**fields) -> list[str]:
        line = parse_line(json.dumps({"custom_id": "c", "url": "/v1/completions", "body": {
            "prompt": "hi", "echo": True, **fields}}).encode(), 1)
        output = RequestOutput("r", "hi", [1, 2], None, [CompletionOutput(0, " there", [5], None, None,
                                                                          finish_reason="stop")])
        return [c["text"] for c in record_for(line, output, ResponseShape("m"))["response"]["body"]["choices"]]

    assert echoed() == ["hi there"] and echoed(return_token_ids=True) == [" there"]
    bad = parse_line(json.dumps({"custom_id": "c", "url": CHAT_URL, "body": {
        "messages": [{"role": "user", "content": "hi"}], "request_id": 7}}).encode(), 1)
    assert "'request_id' must be a string, got 7" in bad.message
    assert body(CHAT_URL, {"messages": [{"role": "user", "content": "hi"}], "request_id": ""})["id"] == "chatcmpl-"
    salted = parse_line(json.dumps({"custom_id": "c", "url": CHAT_URL, "body": {
        "messages": [{"role": "user", "content": "hi"}], "cache_salt": ""}}).encode(), 1)
    assert "'cache_salt' must be a non-empty string" in salted.message
    # vLLM's chat echo: the last message's text starts an answer that continues it (same role), else nothing
    hello = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Hel"}]}]
    continued = body(CHAT_URL, {"messages": hello, "echo": True, "add_generation_prompt": False,
                                "continue_final_message": True})
    assert [c["message"]["content"] for c in continued["choices"]] == ["Heltext 0", "Heltext 1"]
    assert body(CHAT_URL, {"messages": hello[:1], "echo": True})["choices"][0]["message"]["content"] == "text 0"
    thinking = parse_line(json.dumps({"custom_id": "c", "url": CHAT_URL, "body": {
        "messages": hello[:1], "echo": True}}).encode(), 1)
    output = RequestOutput("r", "p", [1], None,
                           [CompletionOutput(0, "<think>still", [5], -1.0, None, finish_reason="length")])
    names = ResponseShape("m", serving=LineServing(reasoning_parser="qwen3"))
    message = record_for(thinking, output, names)["response"]["body"]["choices"][0]["message"]
    assert (message["reasoning"], message["content"]) == ("still", ""), "echo writes text, even none (vLLM's)"


def test_an_openai_line_asking_minus_one_logprobs_gets_every_entry():
    """-1 is vLLM's "the whole vocabulary" (under max_logprobs -1) for a chat's top_logprobs: the record lists every
    entry of each position, where a cut at -1 would list none but the last. A completions body's logprobs -1 fails
    its line, as vLLM's completions request refuses it ("must be a positive value")."""
    import json

    from batchllm.io.ingest import ResponseShape, record_for
    from batchllm.io.jsonl import parse_line

    entries = {t: Logprob(-0.1 * t, rank=t + 1, decoded_token=f"t{t}") for t in range(30)}
    output = RequestOutput("r", "p", [1, 2], None, [CompletionOutput(0, "t0t0", [0, 0], -0.0, [entries, entries],
                                                               finish_reason="length")])

    def record(line: dict) -> dict:
        parsed = parse_line(json.dumps(line).encode(), 1)
        parsed.prompt = None
        return record_for(parsed, output, ResponseShape("m"))["response"]["body"]["choices"][0]["logprobs"]

    chat = record({"custom_id": "c", "method": "POST", "url": CHAT_URL, "body": {
        "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": -1}})
    assert [len(position["top_logprobs"]) for position in chat["content"]] == [30, 30]
    refused = parse_line(json.dumps({"custom_id": "p", "method": "POST", "url": "/v1/completions",
                                     "body": {"prompt": "hi", "logprobs": -1}}).encode(), 1)
    assert refused.message == "line 1: 'logprobs' must be a positive value (or 0), got -1"


def test_openai_usage_counts_every_choice_and_the_cached_prompt_tokens():
    output = two_samples()
    output.num_cached_tokens = 1
    usage = success_record("c", CHAT_URL, "m", output, prompt_tokens=2)["response"]["body"]["usage"]
    assert usage == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7,
                     "prompt_tokens_details": {"cached_tokens": 1, "created_cache_tokens": None,
                                               "multimodal_tokens": None}}, "vLLM's PromptTokenUsageInfo's keys"
