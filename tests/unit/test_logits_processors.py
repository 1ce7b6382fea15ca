"""Penalties, biases, allowed tokens, bad words and grammar masks on logits the test controls, with
exact expected values; repetition_penalty against HF's RepetitionPenaltyLogitsProcessor."""

from __future__ import annotations

import json
import random

import pytest
import torch

from batchllm.layers.logits_processors import (
    OutputHistory,
    apply_adjustments,
    apply_grammar_bitmask,
    banned_by_bad_words,
)
from batchllm.layers.sampler import sample_on_device
from batchllm.outputs import PLACEHOLDER_TOKEN_ID, LogitsAdjust, SamplingSpec


def _sample(*args, **kwargs):
    """Sample on the device and read the tokens and logprobs back (what the runner does in two steps)."""
    return sample_on_device(*args, **kwargs).lists()


VOCAB = 8
LOGITS = [2.0, -1.0, 0.5, 3.0, -2.0, 1.0, 0.0, 4.0]


def spec(adjust=None, **kw):
    base = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=None, num_logprobs=None, adjust=adjust)
    base.update(kw)
    return SamplingSpec(**base)


def history(outputs, prompt_len=3):
    h = OutputHistory(prompt_len)
    h.record(prompt_len, list(outputs))
    return h


def adjusted(adjust, outputs=()):
    logits = torch.tensor([LOGITS])
    apply_adjustments(logits, [spec(adjust)], [history(outputs)])
    return logits[0].tolist()


def test_presence_and_frequency_penalties_subtract_exact_amounts():
    out = adjusted(LogitsAdjust(presence_penalty=0.5, frequency_penalty=0.25), outputs=[3, 3, 3, 1])
    expected = list(LOGITS)
    expected[3] -= 0.5 + 3 * 0.25
    expected[1] -= 0.5 + 1 * 0.25
    assert out == pytest.approx(expected)


def test_negative_penalties_raise_the_generated_tokens():
    out = adjusted(LogitsAdjust(presence_penalty=-1.0), outputs=[4])
    assert out[4] == pytest.approx(-1.0) and out[:4] == pytest.approx(LOGITS[:4])


def test_repetition_penalty_matches_hf_over_prompt_and_outputs():
    from transformers import RepetitionPenaltyLogitsProcessor

    prompt, outputs = [0, 1, 2], [3, 4, 1]
    adjust = LogitsAdjust(repetition_penalty=1.7, prompt_token_ids=tuple(prompt))
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)) * 3
    ours = logits.clone()
    apply_adjustments(ours, [spec(adjust)], [history(outputs)])
    hf = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + outputs]), logits.clone())
    assert torch.equal(ours, hf)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    out = adjusted(LogitsAdjust(repetition_penalty=2.0, prompt_token_ids=(0,)), outputs=[1])
    assert out[0] == 1.0 and out[1] == -2.0 and out[2:] == LOGITS[2:]


def test_logit_bias_adds_and_can_flip_greedy():
    out = adjusted(LogitsAdjust(logit_bias=((2, 10.0), (7, -100.0))))
    assert out[2] == pytest.approx(10.5) and out[7] == pytest.approx(-96.0)
    tokens, _ = _sample(torch.tensor([LOGITS]), [spec(LogitsAdjust(logit_bias=((2, 10.0),)))], None,
                        torch.Generator(), histories=[history([])])
    assert tokens == [2]


def test_allowed_token_ids_mask_everything_else():
    out = adjusted(LogitsAdjust(allowed_token_ids=(1, 4)))
    assert out[1] == -1.0 and out[4] == -2.0
    assert all(v == float("-inf") for i, v in enumerate(out) if i not in (1, 4))
    tokens, _ = _sample(torch.tensor([LOGITS] * 200),
                        [spec(LogitsAdjust(allowed_token_ids=(1, 4)), temperature=1.0)] * 200,
                        None, torch.Generator().manual_seed(0), histories=[history([])] * 200)
    assert set(tokens) == {1, 4}


def test_a_row_whose_bans_leave_no_allowed_token_samples_an_allowed_one():
    """min_tokens' stop tokens or a bad word banning every allowed token left a row of -inf, and the sampler took
    token 0, outside allowed_token_ids; now such a row samples among its allowed tokens as before the bans (a grammar
    row keeps its own fallback, and rows with a token left are untouched)."""
    allowed = LogitsAdjust(allowed_token_ids=(4, 6))
    banned_all = spec(allowed, banned_token_ids=(4, 6))  # (min_tokens' bans of two stop tokens)
    one_left = spec(allowed, banned_token_ids=(6,))
    by_context = spec(LogitsAdjust(allowed_token_ids=(5,), bad_words=((5, 5),)), temperature=1.0, seed=3)
    tokens, _ = _sample(torch.tensor([LOGITS] * 3), [banned_all, one_left, by_context], [9, 9, 9],
                        torch.Generator().manual_seed(0), histories=[history([]), history([]), history([5])])
    assert tokens == [6, 4, 5], "6 is the likelier allowed token; 4 is the one left; 5 the only one allowed"
    many = 100
    tokens, _ = _sample(torch.tensor([LOGITS] * many), [spec(allowed, banned_token_ids=(4, 6), temperature=1.0)] * many,
                        None, torch.Generator().manual_seed(0), histories=[history([])] * many)
    assert set(tokens) == {4, 6}


def test_bad_words_ban_the_completing_token_only():
    words = ((5,), (2, 3))
    assert banned_by_bad_words(words, []) == [5]
    assert banned_by_bad_words(words, [1, 2]) == [5, 3]
    out = adjusted(LogitsAdjust(bad_words=((7,), (6, 3))), outputs=[6])
    assert out[7] == out[3] == float("-inf") and out[0] == 2.0


def test_rows_without_adjustments_are_untouched_and_mixed_batches_keep_rows_apart():
    logits = torch.tensor([LOGITS, LOGITS])
    apply_adjustments(logits, [spec(), spec(LogitsAdjust(frequency_penalty=1.0))], [None, history([7, 7])])
    assert logits[0].tolist() == LOGITS
    assert logits[1, 7].item() == pytest.approx(2.0)


def test_history_skips_recomputed_outputs_and_refuses_gaps_and_placeholders():
    h = OutputHistory(num_prompt_tokens=4)
    h.record(0, [9, 9, 9, 9])  # the prompt: no outputs
    h.record(4, [11])
    h.record(5, [12])
    h.record(0, [9, 9, 9, 9, 11, 12, 13])  # a recompute after preemption, then a new output
    assert h.outputs == [11, 12, 13]
    with pytest.raises(RuntimeError, match="placeholder"):
        h.record(7, [PLACEHOLDER_TOKEN_ID])
    with pytest.raises(RuntimeError, match="out of order"):
        h.record(9, [5])


def test_grammar_bitmask_keeps_exactly_the_allowed_bits():
    vocab = 40
    bitmask = torch.zeros((1, 2), dtype=torch.int32)
    bitmask[0, 0] = (1 << 3) - (1 << 31)  # tokens 3 and 31 (bit 31 set: the int32 word is negative)
    bitmask[0, 1] = 1 << 4  # token 36
    logits = torch.zeros((2, vocab))
    apply_grammar_bitmask(logits, bitmask, torch.tensor([1]))
    assert logits[0].tolist() == [0.0] * vocab
    allowed = [i for i, v in enumerate(logits[1].tolist()) if v != float("-inf")]
    assert allowed == [3, 31, 36]


def test_the_schema_check_reads_types_and_property_names_as_a_schema_means_them():
    """The check of keywords xgrammar ignores failed valid schemas with a TypeError (a nullable type is a list; a
    property named "type" is no type), and took a default's value for a schema."""
    from batchllm.structured import unenforced_schema_feature

    for fine in ({"type": ["string", "null"]},
                 {"type": "object", "properties": {"type": {"type": "string"}, "format": {"type": "string"}}},
                 {"type": "object", "properties": {"x": {"type": "array", "default": {"type": "array",
                                                                                      "uniqueItems": True}}}},
                 {"type": "string", "format": "date"}):
        assert unenforced_schema_feature(fine) is None, fine
    assert unenforced_schema_feature({"type": "object", "properties": {"x": {"type": ["array", "null"],
                                                                             "uniqueItems": True}}}) == \
        "'uniqueItems' (in properties.x)"
    assert unenforced_schema_feature({"$defs": {"a": {"type": "integer", "multipleOf": 3}},
                                      "anyOf": [{"$ref": "#/$defs/a"}]}) == "'multipleOf' (in $defs.a)"


def test_keyword_combinations_xgrammar_drops_are_refused_and_the_ones_it_keeps_taken():
    """A pattern or format with minLength / maxLength compiled to the grammar without the bound (a pydantic
    constr(pattern=..., max_length=3) answered "JSON"); patternProperties and propertyNames, which xgrammar does
    enforce alone, were refused (as vLLM 0.26 refuses them). The combinations follow vLLM's current check of them
    (backend_xgrammar.py; 0.26 checks fewer); not, if and dependentRequired, which xgrammar drops whole (the grammar
    is the one without them), and string or number bounds in a schema without a type (any JSON value passes), are
    refused too."""
    from batchllm.structured import unenforced_schema_feature

    code = {"type": "string", "pattern": "^[A-Z]+$", "maxLength": 3}
    assert unenforced_schema_feature({"type": "object", "properties": {"code": code}}) == (
        "'maxLength' with 'pattern' (put the length in the pattern, e.g. ^[a-z]{1,3}$) (in properties.code)")
    assert unenforced_schema_feature({"type": "string", "format": "email", "minLength": 3}).startswith(
        "'minLength' with 'format'")
    for fine in ({"type": "object", "patternProperties": {"^x": {"type": "integer"}}},
                 {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}},
                 {"allOf": [{"type": "string"}]}, {"type": "string", "minLength": 2, "maxLength": 3},
                 {"type": "object", "properties": {"not": {"type": "string"}, "if": {"type": "integer"}}},
                 {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}, "additionalProperties": True},
                 {"enum": ["a"], "pattern": "a"}):
        assert unenforced_schema_feature(fine) is None, fine
    for schema, found in (
            ({"type": "object", "propertyNames": {"pattern": "^a", "maxLength": 3}}, "in 'propertyNames'"),
            ({"type": "object", "propertyNames": {"pattern": "^a"}, "properties": {}}, "'propertyNames' with 'prop"),
            ({"type": "object", "patternProperties": {"^a": {}, "^b": {}}}, "more than one pattern"),
            ({"type": "object", "patternProperties": {"^a": {}}, "properties": {}}, "'patternProperties' with 'p"),
            ({"patternProperties": {"^a": {}}, "properties": {}}, "'patternProperties' with 'p"),  # (object inferred)
            ({"additionalProperties": True, "propertyNames": {"pattern": "^a", "maxLength": 3}}, "in 'propertyNames'"),
            ({"additionalProperties": False, "patternProperties": {'^"$': {"type": "integer"}}}, "'\"'"),  # ({""": 1})
            ({"allOf": [{"type": "string"}, {"enum": ["yes", "no"]}]}, "'allOf' of several schemas"),
            ({"type": "object", "properties": {"a": {"not": {"type": "null"}}}}, "'not' (in properties.a)"),
            ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "'if'"),
            ({"type": "object", "dependentRequired": {"a": ["b"]}}, "'dependentRequired'"),
            ({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}, "'dependentSchemas'"),
            ({"type": "object", "dependencies": {"a": ["b"]}}, "'dependencies'"),  # (draft 7's spelling of both)
            ({"type": "object", "properties": {"code": {"pattern": "^[A-Z]+$"}}}, "'pattern' without a \"type\""),
            ({"type": "array", "items": {"minimum": 3}}, "'minimum' without a \"type\" (xgrammar then lets any")):
        assert found in unenforced_schema_feature(schema), schema


def test_bounds_beside_a_combinator_and_branches_of_required_alone_are_refused():
    """Measured on xgrammar: a bound beside anyOf or $ref ({"v": 10.0} passed a maximum of 3), and anyOf branches
    that list required properties without them (any JSON value passed: an array, an object of other keys), compiled
    unenforced while the README says such schemas are refused. A format that is not a string was a TypeError."""
    from batchllm.structured import unenforced_schema_feature

    number = {"anyOf": [{"type": "integer"}, {"type": "number"}], "maximum": 3}
    assert unenforced_schema_feature({"type": "object", "properties": {"v": number}}) == (
        "'maximum' beside 'anyOf' (xgrammar enforces it only inside a branch: put it in each) (in properties.v)")
    assert "'minimum' beside '$ref'" in unenforced_schema_feature(
        {"$defs": {"n": {"type": "integer"}}, "type": "object", "properties": {"v": {"$ref": "#/$defs/n",
                                                                                      "minimum": 200}}})
    contact = {"email": {"type": "string"}, "phone": {"type": "string"}}
    assert "'anyOf' branches listing required properties without their 'properties'" in unenforced_schema_feature(
        {"type": "object", "properties": contact, "anyOf": [{"required": ["email"]}, {"required": ["phone"]}]})
    assert "the string format \"['date']\"" in unenforced_schema_feature({"type": "string", "format": ["date"]})
    for fine in ({"anyOf": [{"type": "integer", "maximum": 3}, {"type": "null"}], "description": "optional"},
                 {"type": "object", "properties": contact, "anyOf": [
                     {"type": "object", "properties": contact, "required": ["email"]},
                     {"type": "object", "properties": contact, "required": ["phone"]}]}):
        assert unenforced_schema_feature(fine) is None, fine


NAMED = {"type": "object", "properties": {"name": {"type": "string"}}}
"""Schemas xgrammar compiled, whose answers then broke them (measured on xgrammar 0.2.9), with an answer it let
through and the refusal now named."""
DROPPED = [
    ({"type": "object", "required": ["name"]}, {}, "'required' naming \"name\" without its schema in 'properties'"),
    ({**NAMED, "required": ["name", "age"]}, {"name": "a"}, "'required' naming \"age\" without"),
    ({"type": "object", "required": ["name"], "additionalProperties": True}, {}, "'required' naming \"name\""),
    ({"type": "array", "items": {"type": "object", "required": ["name"], "additionalProperties": {"type": "string"}}},
     [{}], "'required' naming \"name\" without its schema in 'properties' (xgrammar writes only the listed "
           "properties, so {} passes: give each its schema) (in items)"),
    ({**NAMED, "required": ["name"], "anyOf": [NAMED]}, {}, "'required' beside 'anyOf'"),
    ({"type": "string", "enum": ["S", "M", "XL"], "minLength": 2}, "S",
     "'minLength' beside 'enum', which \"S\" breaks (xgrammar keeps only the listed values and drops it: list only "
     "values that keep it)"),
    ({"type": "integer", "enum": [1, 5, 9], "minimum": 5}, 1, "'minimum' beside 'enum', which 1 breaks"),
    ({"type": "integer", "const": 5, "exclusiveMaximum": 5}, 5, "'exclusiveMaximum' beside 'const', which 5"),
    ({"type": "string", "enum": ["S", "XL"], "pattern": "^X"}, "S", "'pattern' beside 'enum', which \"S\" breaks"),
    ({"type": "string", "enum": ["a", 1]}, 1, "'type' beside 'enum', which 1 breaks"),
    ({"enum": ["XL"], "const": "S"}, "S", "'enum' beside 'const', which \"S\" breaks"),
    ({"type": "string", "enum": ["S"], "format": "email"}, "S", "'format' beside 'enum' (xgrammar keeps only the "
                                                               "listed values and drops it, and this check cannot"),
    ({"enum": ["a", 1], "anyOf": [{"type": "integer"}]}, "a", "'anyOf' beside 'enum' (xgrammar keeps only"),
    ({"$defs": {"n": {"type": "integer"}}, "$ref": "#/$defs/n", "const": 3}, 4, "'const' beside '$ref' (xgrammar "
                                                                                "keeps the referenced schema"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 5, "'oneOf' branches 0 and 1 both taking 'integer' values "
     "(xgrammar then lets either through, as 'anyOf' does: use 'anyOf', or make the branches exclusive)"),
    ({"oneOf": [{"const": "a"}, {"type": "string", "description": "any"}]}, "a", "'oneOf' branches 0 and 1 both "),
    ({"type": "string", "anyOf": [{"type": "string"}, {"type": "integer"}]}, 5,
     "'type' beside 'anyOf', whose schemas may take other types"),
    ({"type": "integer", "$defs": {"x": {"type": "string"}}, "$ref": "#/$defs/x"}, "a", "'type' beside '$ref'"),
    ({**NAMED, "anyOf": [{"type": "object"}]}, {"name": 5}, "'properties' beside 'anyOf' (xgrammar keeps only what "
                                                           "'anyOf' gives: put it in each branch)"),
    ({"type": "array", "items": {"type": "integer"}, "anyOf": [{"type": "array"}]}, ["a"],
     "'items' beside 'anyOf'"),
    ({"minItems": 2}, [1], "'minItems' without a \"type\" (xgrammar then lets any JSON value through"),
    ({"maxProperties": 1}, {"a": 1, "b": 2}, "'maxProperties' without a \"type\""),
    ({"patternProperties": {"^a": {"type": "integer"}}}, {"a": "x"}, "'patternProperties' without a \"type\""),
    ({"propertyNames": {"pattern": "^a"}}, {"b": 1}, "'propertyNames' without a \"type\""),
    ({"multipleOf": 5}, 101, "'multipleOf'"),
    ({"contains": {"type": "integer"}}, ["x"], "'contains'"),
    ({"items": {"type": "integer"}, "uniqueItems": True}, [1, 1], "'uniqueItems'"),
]


def test_a_pattern_that_backtracks_for_ever_and_required_entries_that_are_not_names_are_refused_by_name():
    """A review's schemas: a pattern beside enum that Python's re took exponential time to judge (^(a+)+$ on 40 a's
    and a "!": the job reading the line hung, deaf to Ctrl-C), and `required` holding an object (a TypeError,
    "unhashable type", not naming the schema). Both now name the keyword; a pattern is judged for at most a second."""
    from batchllm.structured import unenforced_schema_feature
    from tests.helpers import within

    backtracking = {"type": "string", "enum": ["a" * 40 + "!", "hello"], "pattern": "^(a+)+$"}
    refusal = within(10, lambda: unenforced_schema_feature(backtracking))
    assert "'pattern' beside 'enum', which \"aaaa" in (refusal or "")  # (regex judges this one at once)
    backtracking["pattern"] = "^(a|aa)+$"  # (and backtracks on this one: cut after a second)
    refusal = within(10, lambda: unenforced_schema_feature(backtracking))
    assert "'pattern' beside 'enum' (xgrammar keeps only the listed values and drops it, and this check cannot" in (
        refusal or "")
    for entry in ({"a": 1}, ["a"], 3):
        schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a", entry]}
        assert f"'required' holding {json.dumps(entry)} (it lists property names: strings)" in (
            unenforced_schema_feature(schema) or ""), entry
    assert unenforced_schema_feature({"type": "string", "enum": ["aaa"], "pattern": "^(a+)+$"}) is None


def test_required_names_without_properties_and_keywords_beside_enum_or_const_are_refused():
    """A probe's schemas passed the check while xgrammar dropped a keyword: `required` names not in 'properties' ({}
    came out; with additionalProperties allowed too), `required` beside anyOf, a bound, pattern, format or type
    beside enum / const (xgrammar writes the listed values alone: "S" passed minLength 2), enum / const beside $ref
    (the $ref wins), and a oneOf of overlapping branches (xgrammar falls back to anyOf: 5 is an integer and a
    number). Siblings every listed value keeps lose nothing and are taken, as are overlaps the check cannot prove
    (xgrammar's fallback warning also comes for disjoint branches: a pydantic discriminated union)."""
    from batchllm.structured import unenforced_schema_feature

    for schema, _, named in DROPPED:
        assert named in (unenforced_schema_feature(schema) or ""), schema
    cat, dog = ({"type": "object", "properties": {"kind": {"const": kind, "type": "string"}}, "required": ["kind"]}
                for kind in ("cat", "dog"))
    for fine in ({**NAMED, "required": ["name"]}, {**NAMED, "required": []}, {"type": "string", "required": ["x"]},
                 {"type": "string", "enum": ["SS", "XL"], "minLength": 2, "maxLength": 2, "title": "size"},
                 {"type": "integer", "enum": [5, 9], "minimum": 5, "exclusiveMaximum": 10},
                 {"enum": [4, 8], "multipleOf": 2},
                 {"type": "number", "const": 1.0, "title": "one"}, {"const": "a", "enum": ["a", "b"]},
                 {"type": "string", "enum": ["XL"], "pattern": "X", "properties": {}, "items": {}},
                 {"type": "object", "enum": [{"name": "a"}], "required": ["name"], "minProperties": 1},
                 {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                 {"oneOf": [{"type": "array"}, {"type": "object"}]},
                 {"$defs": {"cat": cat, "dog": dog}, "oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}]},
                 {"oneOf": [{"type": "integer", "maximum": 3}, {"type": "integer", "minimum": 4}]},
                 {"type": ["string", "null"], "anyOf": [{"type": "string"}, {"type": "null"}]},
                 {"type": "number", "anyOf": [{"type": "integer"}, {"const": 2.5}]},
                 {"type": "object", "oneOf": [{"properties": {"b": {"type": "string"}}, "required": ["b"]},
                                              {"properties": {"c": {"type": "string"}}, "required": ["c"]}]},
                 {"type": "object", "additionalProperties": False, "anyOf": [NAMED]},
                 {"type": "object", "$defs": {"n": NAMED}, "$ref": "#/$defs/n"},
                 {"minItems": 2, "anyOf": [{"type": "array", "items": {}, "minItems": 2},
                                           {"items": {}, "minItems": 3}]}):
        assert unenforced_schema_feature(fine) is None, fine


def test_array_and_object_keywords_without_a_type_xgrammar_knows_are_refused():
    """A review's probe: minItems, maxProperties, patternProperties, propertyNames, multipleOf, uniqueItems or contains
    in a schema without a "type" compiled to any JSON value ({"n": 101} passed a typeless multipleOf 5), while the
    README says a bound without a type fails its line. xgrammar infers a type from some keywords (items, properties,
    additionalProperties): there it enforces the counts, and those schemas are taken (the answers breaking them are
    refused by their grammars, as measured here)."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    from batchllm.structured import unenforced_schema_feature

    typeless = {"type": "object", "properties": {"n": {"multipleOf": 5}}}
    assert unenforced_schema_feature(typeless) == "'multipleOf' (in properties.n)"
    for fine, breaking in (({"items": {"type": "integer"}, "minItems": 2}, [1]),
                           ({"items": {"type": "integer"}, "maxItems": 1}, [1, 2]),
                           ({"properties": {"a": {"type": "integer"}}, "minProperties": 1}, {}),
                           ({"additionalProperties": {"type": "integer"}, "maxProperties": 1}, {"a": 1, "b": 2}),
                           ({"type": "object", "patternProperties": {"^a": {"type": "integer"}}}, {"a": "x"})):
        assert unenforced_schema_feature(fine) is None, fine
        grammar = xgr.Grammar.from_json_schema(json.dumps(fine), any_whitespace=False)
        assert not _is_grammar_accept_string(grammar, json.dumps(breaking)), fine


NARROW_RANGES = [  # (schema of a number, refused): a review's four, which gave {"p": } as a "stop", and neighbours
    ({"type": "number", "exclusiveMinimum": 0, "maximum": 1e-7}, True),
    ({"type": "number", "minimum": 1e-7, "maximum": 5e-7}, True),
    ({"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 1.000001}, True),
    ({"type": ["number", "null"], "exclusiveMinimum": 0.1, "maximum": 0.1000001}, True),
    ({"type": "number", "minimum": 1e-7, "maximum": 1e-7}, True),
    ({"type": "number", "exclusiveMinimum": 1, "maximum": 1.000001}, False),
    ({"type": "number", "minimum": 0, "maximum": 1e-6}, False),
    ({"type": "number", "minimum": 0.5, "maximum": 0.5}, False),
    ({"type": "number", "minimum": -3, "exclusiveMaximum": 2.5}, False),
    ({"type": "integer", "minimum": 1, "maximum": 1}, False),
]


def test_a_number_range_holding_no_number_xgrammar_writes_is_refused():
    """xgrammar writes a number between two bounds with at most 6 decimal places; a range holding none compiled to
    a grammar whose value is empty, and '{"p": }' came out as a "stop". Such a range is refused by name; the others
    are taken. Measured on the installed xgrammar: the refused ones' grammars take the empty value, the taken ones'
    do not, and on 300 random ranges the refusal agrees with it."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    from batchllm.structured import unenforced_schema_feature

    for schema, refused in NARROW_RANGES:
        found = unenforced_schema_feature({"type": "object", "properties": {"p": schema}})
        assert (found is not None) == refused, schema
        assert not refused or "a range holding no number of at most 6 decimal places" in found
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        assert _is_grammar_accept_string(grammar, "") == refused, schema
    rng, compiled = random.Random(0), 0
    for _ in range(300):
        low = round(rng.uniform(-1, 1) * 10 ** rng.randint(-9, 3), rng.randint(0, 12))
        high = round(low + abs(rng.gauss(0, 1)) * 10 ** rng.randint(-9, 0), rng.randint(0, 12))
        schema = {"type": "number", rng.choice(["minimum", "exclusiveMinimum"]): low,
                  rng.choice(["maximum", "exclusiveMaximum"]): high}
        try:
            grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        except RuntimeError:  # (an empty range: xgrammar refuses it itself, by name)
            continue
        compiled += 1
        assert _is_grammar_accept_string(grammar, "") == (unenforced_schema_feature(schema) is not None), schema
    assert compiled > 150


def test_xgrammar_lets_through_the_answers_that_break_the_refused_schemas():
    """The measurement behind DROPPED, on the installed xgrammar (as BatchLLM compiles: compact, strict): each answer
    breaks its schema and its grammar takes it. Fails if xgrammar starts enforcing one (the refusal could then go)."""
    xgr = pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    from xgrammar.testing import _is_grammar_accept_string

    for schema, answer, _ in DROPPED:
        validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
        assert not validator.is_valid(answer), schema
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        assert _is_grammar_accept_string(grammar, json.dumps(answer)), schema


def test_a_lark_grammar_is_converted_as_vllm_converts_it():
    """vLLM 0.26 turns Lark into EBNF itself: the root is `start` or the first rule, single quotes are literals,
    %import / %ignore lines are dropped. xgrammar's own Lark reader refused "rule: 'hello'" (no start rule)."""
    from batchllm.structured import _is_lark, lark_as_ebnf

    assert lark_as_ebnf("rule: 'hello'") == 'root ::= rule\nrule ::= "hello"'
    grammar = ("?start: pick  // the choice\nword: 'say \"hi\"'\n%import common.WS\n%ignore WS\n"
               "pick: word\n    | 'no'")
    assert lark_as_ebnf(grammar) == ('root ::= start\nstart ::= pick\nword ::= "say \\"hi\\""\n'
                                     'pick ::= word | "no"')
    assert _is_lark(grammar) and not _is_lark('root ::= "a" // a: b')
    # escapes inside single quotes stay escapes, as vLLM swaps the quotes ('\n' was written as a backslash and n)
    assert lark_as_ebnf("start: 'a' '\\n' 'b'") == 'root ::= start\nstart ::= "a" "\\n" "b"'
    for bad, message in (("a: b c", "rules used but not defined: b, c"), ("| 'x'", "line 1: an alternative"),
                         ("a: 'x", "line 1: mismatched quotes"), ("%ignore WS", "no rule found"),
                         # (a regex terminal read as "rules used but not defined: a, z", its letters)
                         ("start: WORD\nWORD: /[a-z]+/", "line 2: a Lark regular expression"),
                         ("start: 'x'\n    | /y+/i", "line 2: a Lark regular expression")):
        with pytest.raises(ValueError, match=message):
            lark_as_ebnf(bad)
    assert lark_as_ebnf("start: 'a/b/' | \"/c/\"") == 'root ::= start\nstart ::= "a/b/" | "/c/"', "quoted: text"


BOUNDED_STRINGS = [  # (schema, [(JSON answer, valid)]): the answers are JSON text, escapes as written
    ({"type": "string", "maxLength": 3}, [
        ('"abc"', True), ('"abcd"', False), ('""', True), ('"\t"', False), ('"\\t"', True), ('"\\"\\\\\\/"', True),
        ('"\\n\\n\\n\\n"', False), ('"\\u00e9\\u00e9\\u00e9"', True), ('"\\u00e9\\u00e9\\u00e9\\u00e9"', False),
        ('"é😀x"', True), ('"\x01"', False), ('"\\x"', False), ('"\\u00g0"', False)]),
    ({"type": "string", "minLength": 2}, [('"a"', False), ('"\\t"', False), ('"\\t\\t"', True), ('"a\nb"', False),
                                          ('"ab\\"c"', True)]),
    ({"type": ["string", "null"], "maxLength": 2}, [("null", True), ('"\\\\\\\\"', True), ('"\t"', False)]),
    ({"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 1}},
     [('["\\""]', True), ('["\\"a"]', False), ('["\r"]', False), ('[]', True)]),
    ({"type": "object", "propertyNames": {"maxLength": 2}, "additionalProperties": {"type": "integer"}},
     [('{"\\tb": 1}', True), ('{"\tb": 1}', False), ('{"abc": 1}', False)]),
]


def test_length_bounded_strings_take_escapes_and_no_control_characters(default_model_dir):
    """xgrammar 0.2.9 writes a string with minLength / maxLength as [^"\\\r\n]{min,max} (its issue #800): a raw tab
    came out (json.loads refused the answer: "Invalid control character") and no escape could. Each answer here is
    taken exactly where it is valid JSON that keeps the schema (the decoded string's characters counted)."""
    xgr = pytest.importorskip("xgrammar")
    jsonschema = pytest.importorskip("jsonschema")
    from transformers import AutoTokenizer

    from batchllm.structured import GrammarBackend, StructuredOutputsParams, escaped_bounded_strings, grammar_key

    bounded = r'[^\"\\\r\n]'  # xgrammar's class; inside a literal (or a Regex's) it is text, left alone
    fixed = escaped_bounded_strings(f'root ::= (("{bounded}" {bounded}))\n')
    assert fixed.startswith(f'root ::= (("{bounded}" (([^\\0-\\x1f') and fixed.count(bounded) == 1, fixed
    assert xgr.Grammar.from_ebnf(fixed) is not None
    from xgrammar.testing import _is_grammar_accept_string

    two = xgr.Grammar.from_ebnf(escaped_bounded_strings(str(xgr.Grammar.from_json_schema(
        json.dumps({"type": "string", "maxLength": 2}), any_whitespace=False))))
    # a surrogate written raw (ED A0 80: not UTF-8, three replacement characters once decoded) is no character;
    # its neighbours U+D7FF and U+E000 are
    for raw, taken in ((b'"\xed\xa0\x80"', False), (b'"\xed\x9f\xbf"', True), (b'"\xee\x80\x80"', True)):
        assert _is_grammar_accept_string(two, raw) == taken, raw
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir))
    backend = GrammarBackend(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    for schema, answers in BOUNDED_STRINGS:
        compiled = backend.compile(grammar_key(StructuredOutputsParams(json=schema)))
        for answer, valid in answers:
            try:
                jsonschema.validate(json.loads(answer), schema)
                keeps = True
            except (ValueError, jsonschema.ValidationError):
                keeps = False
            assert keeps == valid, (schema, answer)
            matcher = xgr.GrammarMatcher(compiled)
            taken = matcher.accept_string(answer) and matcher.accept_token(tokenizer.eos_token_id)
            assert taken == valid, (schema, answer)


def test_an_object_takes_unnamed_properties_only_where_additional_properties_allows_them():
    """What README says of objects (it said they take only the properties their schema names, which is false
    where additionalProperties is true or a schema), as BatchLLM compiles schemas: compact, strict."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    named = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for additional, takes_int, takes_text in ((None, False, False), (False, False, False), (True, True, True),
                                              ({"type": "integer"}, True, False)):
        schema = named if additional is None else {**named, "additionalProperties": additional}
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        assert _is_grammar_accept_string(grammar, '{"a": 1}'), schema
        assert _is_grammar_accept_string(grammar, '{"a": 1, "b": 2}') == takes_int, schema
        assert _is_grammar_accept_string(grammar, '{"a": 1, "b": "x"}') == takes_text, schema


RAW_PATTERNS = [  # (pattern, a raw answer xgrammar's grammar of it takes, the character named)
    ("^\t$", '"\t"', "'\\t'"), ("^a\\nb$", '"a\nb"', "'\\n'"), ('^"$', '"""', "'\"'"), ("^\\\\$", '"\\"', "'\\\\'"),
    ("^[\\x00-\\x1f]$", '"\x01"', "'\\x00'"), ("^\\v$", '"\x0b"', "'\\x0b'")]


def test_a_pattern_xgrammar_writes_raw_into_the_json_and_an_empty_type_list_are_refused():
    """A string pattern matching a control character, a quote or a backslash as itself ("^\\t$") compiled to a
    grammar that writes it raw: the answer held a raw tab and was not JSON (the family of the maxLength fix). And
    {"type": []} compiled to a grammar that lets any value through. Both are now refused by name; the patterns
    xgrammar keeps as a JSON-string Regex (., \\s, negated classes) are taken."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    from batchllm.structured import unenforced_schema_feature

    for pattern, raw, named in RAW_PATTERNS:
        schema = {"type": "string", "pattern": pattern}
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        assert _is_grammar_accept_string(grammar, raw), pattern  # (the measurement: not JSON, and taken)
        with pytest.raises(ValueError):
            json.loads(raw)
        assert f"the pattern {pattern!r}, which matches the character {named}" in (
            unenforced_schema_feature({"type": "object", "properties": {"s": schema}}) or ""), pattern
    assert "(in properties.s)" in unenforced_schema_feature({"type": "object", "properties": {"s": {
        "type": ["string", "null"], "pattern": "^\t$"}}})
    for where in ({"type": "object", "patternProperties": {"^\t": {"type": "integer"}}},
                  {"type": "object", "propertyNames": {"pattern": "^\n"}, "additionalProperties": {"type": "integer"}}):
        assert "which matches the character" in (unenforced_schema_feature(where) or ""), where
    for fine in ("^.$", "^[^a]$", "^\\s+$", "^[a-z]+$", "^.+@.+\\..+$", "^\\d{3}-\\d{4}$", "[("):
        assert unenforced_schema_feature({"type": "string", "pattern": fine}) is None, fine
    grammar = xgr.Grammar.from_json_schema(json.dumps({"type": []}), any_whitespace=False)
    assert _is_grammar_accept_string(grammar, "5") and _is_grammar_accept_string(grammar, '"x"')
    assert unenforced_schema_feature({"type": "object", "properties": {"v": {"type": []}}}) == (
        "'type' [] (an empty list of types: xgrammar then lets any JSON value through) (in properties.v)")


def test_a_pattern_with_a_lookaround_xgrammar_ignores_is_refused():
    """xgrammar drops a schema pattern's lookahead with a warning on stderr alone: {"pattern": "^(?!0000)[0-9]{4}$"}
    answered "0000" as a success. Such a pattern (lookahead or lookbehind, anywhere in it, in a string's pattern, a
    patternProperties key or propertyNames) is refused by name; the measurement: xgrammar's grammar takes "0000"."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    from batchllm.structured import unenforced_schema_feature

    schema = {"type": "string", "pattern": "^(?!0000)[0-9]{4}$"}
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    assert _is_grammar_accept_string(grammar, '"0000"')
    said = "whose lookahead or lookbehind xgrammar ignores"
    assert said in unenforced_schema_feature({"type": "object", "properties": {"code": schema}})
    for where in ({"type": "string", "pattern": "^(a|(b(?=c)))+$"}, {"type": "string", "pattern": "(?<!x)y"},
                  {"type": "object", "patternProperties": {"^(?!_)": {"type": "integer"}}},
                  {"type": "object", "propertyNames": {"pattern": "^(?=a)"}, "additionalProperties": True}):
        assert said in (unenforced_schema_feature(where) or ""), where
    assert unenforced_schema_feature({"type": "string", "pattern": "^(?:ab)+$"}) is None


def test_a_pattern_xgrammar_keeps_as_a_json_string_regex_is_taken_whatever_it_matches():
    """The raw-pattern refusal read only the pattern, so it refused common patterns that can match a quote or a
    control character but that xgrammar keeps as a JSON-string Regex (whose answers it escapes): printable ASCII
    ("^[ -~]{1,80}$", which worked before the refusal), a class or a branch holding a quote. They are taken again;
    the measurement: xgrammar's grammar for each takes no raw quote."""
    xgr = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string

    from batchllm.structured import unenforced_schema_feature

    for pattern in ("^[ -~]{1,80}$", "^[A-Za-z0-9 .,'\"-]+$", '^(a|")$'):
        schema = {"type": "string", "pattern": pattern}
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        assert not _is_grammar_accept_string(grammar, '"""'), pattern
        assert unenforced_schema_feature({"type": "object", "properties": {"s": schema}}) is None, pattern
