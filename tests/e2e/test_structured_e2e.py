"""Structured output end to end on SmolLM2: every constrained request's text parses and validates
against its JSON schema / matches its regex / is one of its choices, greedy and sampled, with
prefix sharing on (asynchronous scheduling, preemption forced) and off; penalties change the tokens
as asked; a grammar that does not compile is refused by name."""

from __future__ import annotations

import json
import math
import re

import pytest

from batchllm import LLM, SamplingParams
from batchllm.layers.sampler import FORBIDDEN_LOGPROB
from batchllm.structured import StructuredOutputError, StructuredOutputsParams, grammar_key

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.slow

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],  # name first, then age:
          "properties": {"name": {"type": "string", "maxLength": 12},  # a bounded age ends within max_tokens
                         "age": {"type": "integer", "minimum": 0, "maximum": 150}}}
LABELS = ["positive", "negative", "neutral"]
PHONE = r"\d{3}-\d{4}"
YES_NO = 'root ::= "yes" | "no"'
SQL_LARK = """
?start: select  // vLLM's example, in Lark (as vLLM tells the two apart: no "::=")
select: "SELECT " column " from " table
column: "col_1" | "col_2"
table: "table_1" | "table_2"
"""

CASES = [  # (question, structured_outputs, check)
    ("Describe a person as JSON.", {"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON)),
    ("Give me a JSON object about a cat.", {"json_object": True}, lambda t: isinstance(json.loads(t), dict)),
    ("Sentiment of 'I love this phone'?", {"choice": LABELS}, lambda t: t in LABELS),
    ("Make up a phone number.", {"regex": PHONE}, lambda t: re.fullmatch(PHONE, t) is not None),
    ("Is the sky blue? Answer yes or no.", {"grammar": YES_NO}, lambda t: t in ("yes", "no")),
]


@pytest.fixture(scope="module", params=["sharing-async-preempted", "no-sharing"])
def llm(request, default_model_dir):
    if request.param == "no-sharing":
        return LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=1024, prefix_sharing=False)
    # a cache too small for the batch, admission overcommitted on purpose: preemption happens
    return LLM(str(default_model_dir), dtype="float32", device="cpu", max_model_len=1024, prefix_sharing=True,
               async_scheduling=True, block_size=8, num_kv_blocks=48, max_num_batched_tokens=128,
               kv_admission_threshold=4.0)


def test_every_structured_request_validates(llm):
    conversations, params, checks = [], [], []
    for greedy in (True, False):
        for k, (question, structured, check) in enumerate(CASES):
            # a distinct tail of ~40 tokens each: the batch outgrows the small cache
            filler = f" (request {k}, {'greedy' if greedy else 'sampled'})" + " Please answer carefully." * 8
            conversations.append([{"role": "user", "content": question + filler}])
            sampling = dict(temperature=0.0) if greedy else dict(temperature=1.0, seed=100 + k)
            # any JSON object may nest as deep as the model likes: a larger budget for it
            max_tokens = 200 if "json_object" in structured else 64
            params.append(SamplingParams(max_tokens=max_tokens, structured_outputs=structured, **sampling))
            checks.append(check)
    outputs = llm.chat(conversations, params, use_tqdm=False)
    for output, check, sp in zip(outputs, checks, params, strict=True):
        completion = output.outputs[0]
        if sp.structured_outputs.json_object and sp.temperature > 0 and completion.finish_reason == "length":
            # sampled at temperature 1, this model leaves a free JSON object open within 200 tokens for about
            # one seed in four: what it wrote must still be a prefix the grammar accepts, token by token
            state = llm.prompts.grammars.new_state(grammar_key(sp.structured_outputs))
            state.advance(list(completion.token_ids))
            assert not state.broken, completion.text
            continue
        assert completion.finish_reason == "stop", (sp.structured_outputs, completion.text)
        assert check(completion.text) is not False, (sp.structured_outputs, completion.text)
    if llm.config.sharing.prefix_sharing:
        assert llm.last_stats["num_preemptions"] > 0, "the cache was meant to be too small for the batch"
        assert llm.last_stats["num_groups"] > 0, "the chats share the template's system prompt"


def test_unconstrained_requests_beside_constrained_ones_are_unchanged(llm):
    prompts = ["The capital of France is", "List three colors:"]
    plain = SamplingParams(temperature=0.0, max_tokens=12)
    alone = llm.generate(prompts, plain, use_tqdm=False)
    mixed = llm.generate(prompts + ["Answer yes or no:"], [plain, plain, SamplingParams(
        temperature=0.0, max_tokens=8, structured_outputs={"grammar": YES_NO})], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids for o in alone]
    assert mixed[2].outputs[0].text in ("yes", "no")


def test_penalties_and_bias_change_greedy_tokens_as_asked(default_llm):
    prompt = "Count: one two three one two three one two three"
    base = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0].outputs[0]
    banned = base.token_ids[0]
    biased = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, logit_bias={banned: -100}),
                                  use_tqdm=False)[0].outputs[0]
    assert banned not in biased.token_ids
    allowed = [base.token_ids[0], base.token_ids[1]]
    only = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=6, allowed_token_ids=allowed),
                                use_tqdm=False)[0].outputs[0]
    assert set(only.token_ids) <= set(allowed)
    penalised = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, frequency_penalty=2.0),
                                     use_tqdm=False)[0].outputs[0]
    assert len(set(penalised.token_ids)) > len(set(base.token_ids)), (base.text, penalised.text)
    word = default_llm.get_tokenizer().decode(base.token_ids[:1]).strip()
    no_word = default_llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, bad_words=[word]),
                                   use_tqdm=False)[0].outputs[0]
    assert word not in no_word.text.split(), (word, no_word.text)


def test_a_schema_that_does_not_compile_is_refused_by_name(default_llm):
    with pytest.raises(StructuredOutputError, match="JSON schema cannot be compiled: Unsupported type"):
        default_llm.generate("x", SamplingParams(structured_outputs={"json": {"type": "nonsense"}}), use_tqdm=False)
    with pytest.raises(StructuredOutputError, match="regex cannot be compiled"):
        default_llm.generate("x", SamplingParams(structured_outputs={"regex": "(abc"}), use_tqdm=False)


def test_an_objects_properties_come_in_the_schemas_order(default_llm):
    """OpenAI and vLLM write properties in the schema's order; the grammar was compiled from the schema
    with its keys sorted, so "reasoning" then "answer" came out as "answer" then "reasoning"."""
    properties = {"zeta": {"type": "string", "maxLength": 8}, "reasoning": {"type": "string", "maxLength": 8},
                  "answer": {"type": "integer"}}
    schema = {"type": "object", "properties": properties, "required": list(properties),
              "additionalProperties": False}
    params = SamplingParams(temperature=0.0, max_tokens=64, structured_outputs={"json": schema})
    text = default_llm.chat([[{"role": "user", "content": "Reason, then answer: 2 + 2?"}]], params,
                            use_tqdm=False)[0].outputs[0].text
    assert list(json.loads(text)) == ["zeta", "reasoning", "answer"], text


def test_a_lark_grammar_is_taken_as_vllm_takes_it(default_llm):
    """vLLM compiles a grammar without "::=" as Lark; it failed here as EBNF ("Unexpected character: ':'")."""
    grammars = [SQL_LARK, SQL_LARK, "answer: 'yes' | 'no'  # no start rule: the first is the root"]
    outs = default_llm.generate(["Write a SQL query:"] * 2 + ["Is water wet?"], [
        SamplingParams(max_tokens=16, temperature=t, seed=3, structured_outputs={"grammar": g})
        for t, g in zip((0.0, 1.0, 0.0), grammars)], use_tqdm=False)
    for out in outs[:2]:
        assert re.fullmatch(r"SELECT col_[12] from table_[12]", out.outputs[0].text), out.outputs[0].text
    assert outs[2].outputs[0].text in ("yes", "no")


def test_a_grammar_that_ended_leaves_ignore_eos_to_go_on_without_failing_the_batch(default_llm):
    """ignore_eos with a constraint: the grammar ends at its stop token and the answer goes on past it, unmasked (as
    vLLM leaves such a row); the matcher, asked again after its end, failed every request of the batch."""
    constrained = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, structured_outputs={"choice": LABELS})
    plain = SamplingParams(temperature=0.0, max_tokens=8)
    out = default_llm.generate(["Sentiment of 'great'?", "Hello"], [constrained, plain], use_tqdm=False)
    first = out[0].outputs[0]
    assert len(first.token_ids) == 8 and first.finish_reason == "length"
    assert any(first.text.startswith(label) for label in LABELS), first.text
    assert out[1].outputs[0].token_ids == default_llm.generate("Hello", plain, use_tqdm=False)[0].outputs[0].token_ids


def test_min_tokens_past_a_grammars_end_gives_way_to_it(default_llm):
    """min_tokens bans EOS while the grammar allows only EOS (the answer is complete): every token was -inf, token 0
    came out and the request went on unconstrained. The grammar wins: the answer is one of the labels, ending there."""
    params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=6, structured_outputs={"choice": LABELS})
    completion = default_llm.generate("Sentiment of 'great'?", params, use_tqdm=False)[0].outputs[0]
    assert completion.text in LABELS and completion.finish_reason == "stop", completion.text


def test_allowed_token_ids_or_bad_words_that_leave_a_grammar_nothing_give_way_to_it(default_llm, caplog):
    """allowed_token_ids outside every label: every token was -inf, token 0 came out, the grammar refused it and the
    answer went on unconstrained ("()()()()"), written as a success. The grammar wins, as over min_tokens."""
    for extra in ({"allowed_token_ids": [1000, 1001]}, {"bad_words": ["yes", "no", "y", "n", "ye"]}):
        params = SamplingParams(temperature=0.0, max_tokens=8, structured_outputs={"choice": ["yes", "no"]}, **extra)
        completion = default_llm.generate("Is water wet?", params, use_tqdm=False)[0].outputs[0]
        assert completion.text in ("yes", "no") and completion.finish_reason == "stop", (extra, completion.text)
    assert "the grammar refused" not in caplog.text


def test_logprobs_of_a_constrained_request_are_its_grammars(default_llm):
    """As vLLM's (its mask is applied before its sampler): the alternatives are what the grammar allows and the
    chosen label's probability is renormalised over them. They were the raw model's: a label at rank 24."""
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=5, structured_outputs={"choice": ["yes", "no"]})
    completion = default_llm.generate("Is water wet? Answer:", params, use_tqdm=False)[0].outputs[0]
    first = completion.logprobs[0]
    assert first[completion.token_ids[0]].rank == 1
    for lp in first.values():  # the top 5: starts of a label ("yes", "y", "n", ...), which the grammar allows, or
        # tokens it forbids, at FORBIDDEN_LOGPROB (vLLM's server's -9999.0: JSON has no -inf)
        assert lp.logprob == FORBIDDEN_LOGPROB or any(label.startswith(lp.decoded_token) for label in ("yes", "no"))
    assert sum(math.exp(lp.logprob) for lp in first.values()) > 0.99, "the probability is the allowed tokens'"


@pytest.mark.parametrize("schema, named", [
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7}}}, "'multipleOf' (in properties.n)"),
    ({"type": "object", "properties": {"t": {"type": "string", "format": "credit-card"}}},
     "the string format 'credit-card' (in properties.t)"),
    ({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3}}},
     "'maxLength' with 'pattern' (put the length in the pattern, e.g. ^[a-z]{1,3}$) (in properties.code)"),
    ({"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name", "age"]},
     "'required' naming \"age\" without its schema in 'properties' (xgrammar writes only the listed properties, "
     "so {} passes: give each its schema)"),
    ({"type": "object", "properties": {"size": {"type": "string", "enum": ["S", "M", "XL"], "minLength": 2}}},
     "'minLength' beside 'enum', which \"S\" breaks (xgrammar keeps only the listed values and drops it: list only "
     "values that keep it) (in properties.size)"),
])
def test_a_schema_keyword_the_grammar_would_ignore_fails_its_request_by_name(default_llm, schema, named):
    """xgrammar drops these keywords and answers broke them ("uniqueItems" gave ["apple", "apple", "apple"]); vLLM
    refuses them with its xgrammar backend too (not the last two: a required name without its schema gave {}, a
    bound beside an enum let "S" through)."""
    with pytest.raises(StructuredOutputError, match=re.escape(f"the JSON schema uses {named}, which xgrammar")):
        default_llm.generate("x", SamplingParams(structured_outputs={"json": schema}), use_tqdm=False)


def test_a_constrained_lines_logprobs_are_strict_json(tmp_path, default_model_dir):
    """A forbidden token's logprob was -inf, written as -Infinity: not JSON to jq, JavaScript or Go."""
    from batchllm.cli import main

    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    schema = {"type": "boolean"}
    src.write_text(json.dumps({"id": "a", "prompt": "Is water wet? Answer:", "max_tokens": 3, "temperature": 0,
                               "logprobs": 5, "structured_outputs": {"choice": ["yes", "no"]}}) + "\n"
                   + json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions", "body": {
                       "messages": [{"role": "user", "content": "Is water wet?"}], "max_tokens": 3, "temperature": 0,
                       "logprobs": True, "top_logprobs": 5,
                       "response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": schema}}}})
                   + "\n")
    assert main(["run", str(src), "-o", str(out), "--model", str(default_model_dir), "--no-progress"]) == 0

    def not_json(constant):
        raise AssertionError(f"{constant} in the output")

    records = [json.loads(line, parse_constant=not_json) for line in out.read_text().splitlines()]
    assert len(records) == 2


def test_the_compiled_grammars_kept_are_bounded(default_llm, monkeypatch):
    """Every distinct grammar stayed compiled for the engine's life (~50 KiB a JSON schema: a file whose lines each
    bring a schema grew by gigabytes); the least recently used are dropped past GRAMMARS_CACHED."""
    import batchllm.structured as structured

    monkeypatch.setattr(structured, "GRAMMARS_CACHED", 2)
    grammars = default_llm.prompts.grammars
    keys = [grammar_key(StructuredOutputsParams(choice=[f"a{i}", f"b{i}"])) for i in range(3)]
    compiled = [grammars.compile(key) for key in keys]
    assert list(grammars._cache) == keys[1:], "the two most recent"
    assert grammars.compile(keys[2]) is compiled[2], "a kept one is not compiled again"
    first = grammar_key(StructuredOutputsParams(choice=["a0", "b0"]))
    assert first not in grammars._cache
    out = default_llm.generate("Yes or no?", SamplingParams(structured_outputs={"choice": ["a0", "b0"]}, max_tokens=4),
                               use_tqdm=False)
    assert out[0].outputs[0].text in ("a0", "b0") and first in grammars._cache, "a dropped one compiles again"


def test_length_bounded_strings_stay_json_when_the_bias_pushes_control_characters_quotes_or_backslashes(
        default_llm):
    """xgrammar wrote a string with minLength / maxLength as [^"\\\r\n]{min,max}: pushed toward a tab, greedy gave
    {"s": "\t\t\t..."} with finish_reason "stop", which json.loads refused; no escape could come out. Every answer
    here parses and keeps its schema (lengths counted on the decoded string)."""
    tokenizer = default_llm.get_tokenizer()
    pushed = [tokenizer.encode(text, add_special_tokens=False) for text in ("\t", '"', "\\", '\\"')]
    assert all(len(ids) == 1 for ids in pushed), pushed
    def one(string):
        return {"type": "object", "properties": {"s": string}, "required": ["s"]}

    schemas = [one({"type": "string", "maxLength": 10}), one({"type": "string", "minLength": 3, "maxLength": 8}),
               one({"type": ["string", "null"], "maxLength": 5}),
               {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 1, "maxItems": 2}]
    cases = [(schema, ids[0]) for schema in schemas for ids in pushed]
    outs = default_llm.generate(["Write:"] * len(cases), [
        SamplingParams(temperature=0.0, max_tokens=48, logit_bias={token: 50.0}, structured_outputs={"json": schema})
        for schema, token in cases], use_tqdm=False)
    for (schema, token), out in zip(cases, outs):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (schema, token, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)


DEAD_END = 'root ::= "a" | "b" c\nc ::= c "x"'
"""A grammar no string completes once "b" came (c never ends): xgrammar's mask is then empty."""


def test_failed_completions_are_logged_once_per_call(default_llm, caplog):
    """Each completion that failed was a warning of its own ("prompt 1: ...", n of them for one line of n): a job of
    such lines flooded the log. The call's first is said once; every one is in its output."""
    b = default_llm.get_tokenizer().encode("b", add_special_tokens=False)[0]
    dead = SamplingParams(n=3, temperature=0.5, seed=1, max_tokens=8, logit_bias={b: 30.0},
                          structured_outputs={"grammar": DEAD_END})
    with caplog.at_level("WARNING", logger="batchllm.llm"):
        outs = default_llm.generate(["Hi", "Hello"], dead, use_tqdm=False)
    assert [c.finish_reason for o in outs for c in o.outputs] == ["error"] * 6
    warnings = [r.getMessage() for r in caplog.records if "allows no next token" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("prompt 0 of this call: "), warnings


def test_json_object_answers_are_objects_where_the_model_would_answer_otherwise(default_llm):
    """Asked for a number, the model answers "2.000000000000002" under a grammar of any JSON value; json_object
    (OpenAI's response_format) must give an object all the same."""
    questions = ["What is 2+2? Reply with the number only.", "Say yes or no: is the sky blue?"]
    sp = SamplingParams(temperature=0, max_tokens=40, structured_outputs={"json_object": True})
    for output in default_llm.chat([[{"role": "user", "content": q}] for q in questions], sp, use_tqdm=False):
        assert isinstance(json.loads(output.outputs[0].text), dict), output.outputs[0].text


def test_a_grammar_that_allows_no_next_token_fails_its_request_and_the_others_go_on(default_llm):
    """Pushed to "b", the grammar allowed no token: the empty mask row sampled token 0, the runner stopped masking
    ('the request goes on unconstrained', naming no request) and the answer ran to max_tokens as a success. It ends
    there with finish_reason "error" (vLLM's for a failed request) and the reason; one that allows no first token
    is refused when compiled, by name."""
    b = default_llm.get_tokenizer().encode("b", add_special_tokens=False)[0]
    dead = SamplingParams(temperature=0.0, max_tokens=8, logit_bias={b: 30.0}, structured_outputs={"grammar": DEAD_END})
    plain = SamplingParams(temperature=0.0, max_tokens=4)
    outs = default_llm.generate(["Hi", "Hello"], [dead, plain], use_tqdm=False)
    failed = outs[0].outputs[0]
    assert failed.finish_reason == "error" and failed.token_ids == [b], failed
    assert "after 1 token the grammar allows no next token" in failed.error
    assert outs[1].outputs[0].token_ids == default_llm.generate("Hello", plain, use_tqdm=False)[0].outputs[0].token_ids
    for nothing in ({"regex": r"[^\s\S]"}, {"grammar": 'root ::= a\na ::= a "x"'}):
        with pytest.raises(StructuredOutputError, match="matches no string"):
            default_llm.generate("x", SamplingParams(structured_outputs=nothing), use_tqdm=False)


def test_a_line_whose_grammar_allows_no_next_token_is_an_error_record(tmp_path, default_model_dir):
    """run wrote such a line as a success (finish_reason "length", exit 0); it is the line's error record (an OpenAI
    line's in the errors file), the other lines answered, and the run says lines failed."""
    from batchllm.cli import EXIT_LINES_FAILED, main

    b = 82  # "b" in SmolLM2's vocabulary (the test above reads it from the tokenizer)
    dead = {"max_tokens": 8, "temperature": 0, "logit_bias": {str(b): 30}, "structured_outputs": {"grammar": DEAD_END}}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(line) for line in (
        {"id": "dead", "prompt": "Hi", **dead}, {"id": "fine", "prompt": "Hello", "max_tokens": 3},
        {"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "Hi", **dead}},
    )) + "\n")
    assert main(["run", str(src), "-o", str(out), "--model", str(default_model_dir), "--no-progress"]) == (
        EXIT_LINES_FAILED)
    records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["dead"]["error"]["line"] == 1 and "allows no next token" in records["dead"]["error"]["message"]
    assert "error" not in records["fine"] and records["fine"]["finish_reason"] == "length"
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [e["custom_id"] for e in errors] == ["c"] and "allows no next token" in errors[0]["error"]["message"]


def test_an_empty_string_is_a_choice_as_in_vllm(default_llm):
    """choice ["", "spam"] was refused ("a non-empty list of non-empty strings"); vLLM 0.26 writes it as
    root ::= "" | "spam". The answer is one of them; an empty list (no rule) and a non-string stay refused."""
    outs = default_llm.generate(["Say nothing:", "Say nothing:"], [
        SamplingParams(temperature=0.0, max_tokens=4, structured_outputs={"choice": choice})
        for choice in (["", "spam"], [""])], use_tqdm=False)
    assert outs[0].outputs[0].text in ("", "spam") and outs[1].outputs[0].text == ""
    assert all(o.outputs[0].finish_reason == "stop" for o in outs)
    assert grammar_key(StructuredOutputsParams(choice=["", "spam"])) == ("grammar", 'root ::= "" | "spam"')
    for bad in ([], ["a", 1]):
        with pytest.raises(ValueError, match="choice must be a non-empty list of strings"):
            StructuredOutputsParams(choice=bad)


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
TAG = {"type": "structural_tag", "format": {"type": "triggered_tags", "triggers": ["<function="], "at_least_one": True,
                                            "tags": [{"begin": "<function=get_weather>", "end": "</function>",
                                                      "content": {"type": "json_schema", "json_schema": WEATHER}}]}}
OLDER_TAG = {"type": "structural_tag", "triggers": ["<function="],
             "structures": [{"begin": "<function=get_weather>", "schema": WEATHER, "end": "</function>"}]}
WEATHER_CALL = re.compile(r"<function=get_weather>(.*)</function>", re.S)


def test_a_structural_tag_keeps_the_tagged_part_to_its_schema(default_llm):
    """vLLM's structural tags (structured_outputs.structural_tag: xgrammar's, as JSON text) were refused. A tag that
    must appear (at_least_one) gives a call whose arguments keep to its schema; the older form (structures and
    triggers) compiles too, as vLLM's backend compiles it, and a tagged part it lets through keeps to the schema."""
    chat = [{"role": "user", "content": "What is the weather in Paris? Call the tool get_weather."}]
    [answer] = default_llm.chat(chat, SamplingParams(temperature=0, max_tokens=40, structured_outputs={
        "structural_tag": json.dumps(TAG)}), use_tqdm=False)
    call = WEATHER_CALL.fullmatch(answer.outputs[0].text)
    assert call is not None and answer.outputs[0].finish_reason == "stop", answer.outputs[0].text
    jsonschema.validate(json.loads(call[1]), WEATHER)
    grammars = default_llm.prompts.grammars
    tokenizer = default_llm.get_tokenizer()
    for text, kept in (('Sure. <function=get_weather>{"city": "Paris"}</function> Done.', True),
                       ('Sure. <function=get_weather>{"town": "Paris"}</function>', False)):
        state = grammars.new_state(("structural_tag", json.dumps(OLDER_TAG)))
        state.advance(tokenizer.encode(text, add_special_tokens=False))
        assert state.broken is not kept, text


def test_a_structural_tags_schemas_are_checked_as_a_schema_is(default_llm):
    """A keyword xgrammar would ignore fails a structural tag's request as it fails a JSON schema's, in either form;
    text that is no structural tag fails naming what could not be compiled."""
    unique = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    newer = {**TAG, "format": {**TAG["format"], "tags": [{**TAG["format"]["tags"][0],
                                                          "content": {"type": "json_schema", "json_schema": unique}}]}}
    older = {**OLDER_TAG, "structures": [{**OLDER_TAG["structures"][0], "schema": unique}]}
    for tag in (newer, older):
        with pytest.raises(StructuredOutputError, match="the JSON schema uses 'uniqueItems', which xgrammar"):
            default_llm.generate("x", SamplingParams(structured_outputs={"structural_tag": json.dumps(tag)}),
                                 use_tqdm=False)
    with pytest.raises(StructuredOutputError, match="the structural tag cannot be compiled"):
        default_llm.generate("x", SamplingParams(structured_outputs={"structural_tag": '{"type": "nothing"}'}),
                             use_tqdm=False)


def test_a_structural_tag_response_format_runs_its_line(tmp_path, default_model_dir):
    """An OpenAI line's response_format of type structural_tag (vLLM's, either form) was refused; it now runs, and
    one with neither a format nor structures and triggers fails its line alone, by name."""
    from batchllm.cli import main

    chat = [{"role": "user", "content": "What is the weather in Paris? Call the tool get_weather."}]
    lines = [{"custom_id": name, "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": chat, "max_tokens": 40, "temperature": 0, "response_format": form}}
             for name, form in (("newer", TAG), ("older", OLDER_TAG), ("bad", {"type": "structural_tag"}))]
    (src := tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    assert main(["run", str(src), "-o", str(out), "--model", str(default_model_dir), "--no-progress"]) == 1
    records = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    newer = records["newer"]["response"]["body"]["choices"][0]["message"]["content"]
    assert WEATHER_CALL.fullmatch(newer), newer
    assert records["older"]["response"]["status_code"] == 200
    errors = [json.loads(line) for line in (tmp_path / "out.errors.jsonl").read_text().splitlines()]
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert "invalid response_format structural_tag: give its 'format'" in errors[0]["error"]["message"]
