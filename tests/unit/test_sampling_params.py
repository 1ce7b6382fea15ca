import json
import re

import numpy as np
import pytest

from batchllm import SamplingParams


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 3}, "min_tokens"),
        ({"stop": 3}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids"),
        ({"stop_token_ids": 7}, "stop_token_ids"),
        ({"logprobs": -2}, "logprobs"),  # (-1: the whole vocabulary, as in vLLM)
        ({"prompt_logprobs": -2}, "prompt_logprobs"),
        ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
        ({"seed": "x"}, "seed"),
        ({"temperature": "hot"}, "temperature"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
        ({"detokenize": 0}, "detokenize"),
        ({"detokenize": False, "stop": ["."]}, "detokenize"),
        ({"spaces_between_special_tokens": 0}, "spaces_between_special_tokens"),
        ({"extra_args": [1]}, "extra_args"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": 2.5}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": True}, "truncate_prompt_tokens"),
    ],
)
def test_bad_values_raise_an_error_that_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field}\b"):
        SamplingParams(**kwargs)


def test_defaults_and_normalisation():
    sp = SamplingParams(stop="###", top_k=-1)
    assert sp.stop_strings == ["###"] and sp.top_k == 0 and sp.stop_token_ids == []
    assert SamplingParams(temperature=0).is_greedy and not SamplingParams().is_greedy
    assert SamplingParams().max_tokens == 16  # vLLM's default


def test_seed_minus_one_is_no_seed_as_in_vllm():
    """vLLM reads seed=-1 as None; here it was a fixed seed, so k samples of one prompt were all alike."""
    assert SamplingParams(seed=-1).seed is None and SamplingParams(seed=-1, n=3).for_child(2).seed is None
    assert SamplingParams(seed=-2).seed == -2
    assert [SamplingParams(seed=-2, n=3).for_child(i).seed for i in range(3)] == [-2, 2**64 - 1, 0], \
        "a child whose seed comes to -1 stays seeded (modulo 2^64, the same seed)"


def test_an_engine_seed_of_none_runs_as_seed_0(tiny_model_factory):
    """LLM(seed=None) reached torch.manual_seed(None) after the weights loaded; it is now seed 0, as vLLM V1 read
    None (0.26 declares seed: int = 0), so a ported script stays reproducible."""
    from batchllm import LLM
    from batchllm.config import ModelConfig

    assert ModelConfig(seed=None).seed == 0
    with pytest.raises(ValueError, match="seed must be an integer or None"):
        ModelConfig(seed="3")
    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64, seed=None)
    try:
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    finally:
        llm.shutdown()
    assert len(out[0].outputs[0].token_ids) == 3


def test_children_of_a_seeded_request_get_distinct_seeds():
    sp = SamplingParams(n=3, seed=10, stop=["a"])
    children = [sp.for_child(i) for i in range(3)]
    assert [c.seed for c in children] == [10, 11, 12]
    assert all(c.n == 1 and c.stop_strings == ["a"] for c in children)
    with_prompt = SamplingParams(n=3, prompt_logprobs=2)  # the prompt's logprobs are computed once
    assert [with_prompt.for_child(i).prompt_logprobs for i in range(3)] == [2, None, None]


@pytest.mark.parametrize("fields,name", [
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 10**400}, "temperature"), ({"top_p": float("nan")}, "top_p"),
    ({"min_p": float("-inf")}, "min_p"), ({"n": 2**70}, "n"), ({"n": 16385}, "n"),
    ({"seed": 2**64}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 2**64 - 1, "n": 2}, "seed"),
    ({"top_k": 2**70}, "top_k"), ({"stop": [[["x"]] * 3]}, "stop"),
    # vLLM 0.26 refuses these too (they ran: n equal greedy answers; a temperature past OpenAI's range)
    ({"temperature": 2.5}, "temperature"), ({"n": 2, "temperature": 0}, "n"),
])
def test_values_the_engine_cannot_run_are_refused_by_name(fields, name):
    with pytest.raises(ValueError, match=f"SamplingParams.{name} "):
        SamplingParams(**fields)


def test_the_edges_of_the_ranges_are_accepted():
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    assert SamplingParams(seed=2**64 - 4, n=4).for_child(3).seed == 2**64 - 1
    assert SamplingParams(n=1024).n == 1024
    assert SamplingParams(temperature=2.0).temperature == 2.0 and SamplingParams(n=2, temperature=0.01).n == 2


def test_error_messages_quote_values_briefly():
    deep = json.loads("[" * 950 + "]" * 950)
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=deep)
    assert len(str(e.value)) < 200
    with pytest.raises(ValueError) as e:
        SamplingParams(stop=["x" * 10**6, 3])
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("field,value", [("allowed_token_ids", [10]), ("logit_bias", {10: 1.0}),
                                         ("logprob_token_ids", [7, 10])])
def test_token_ids_outside_the_vocabulary_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=rf"SamplingParams.{field}: token id 10 is outside the vocabulary \[0, 10\)"):
        SamplingParams(**{field: value}).check_for_model(10)
    SamplingParams(**{field: [7, 9] if field != "logit_bias" else {9: 1.0}}).check_for_model(10)


def test_stop_token_ids_take_any_integers_as_vllm_026_does():
    """vLLM 0.26 checks only that stop_token_ids are integers (SamplingParams._verify_args; its processor does not
    bound them): an id no token has can never be sampled, so it never stops anything. They were refused, failing
    the line ('outside the vocabulary', 'non-negative')."""
    for ids in ([10], [-1], [7, 2**70], [3, 3]):
        params = SamplingParams(stop_token_ids=ids, min_tokens=2, allowed_token_ids=[9])
        params.check_for_model(10)
        assert params.stop_token_ids == ids
    for bad in ([1.5], ["7"], [True], [None], 7, "7"):
        with pytest.raises(ValueError, match=r"SamplingParams.stop_token_ids must be a list of integers"):
            SamplingParams(stop_token_ids=bad)


def test_vllms_prompt_types_and_clone_port_unchanged(tiny_model_factory):
    """`from vllm import TokensPrompt, TextPrompt` and `SamplingParams.clone()` port as a change of import;
    a clone is independent of its original."""
    from batchllm import LLM, TextPrompt, TokensPrompt

    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, stop=["x"])
    copy_ = params.clone()
    copy_.stop_token_ids.append(7)
    assert params.stop_token_ids == [] and copy_ == SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                                   stop=["x"], stop_token_ids=[7])
    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
    try:
        by_ids, by_text = llm.generate([TokensPrompt(prompt_token_ids=[5, 6, 7]), TextPrompt(prompt="Hi")], params,
                                       use_tqdm=False)
        plain = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
        # numpy ids (a tokenizer's return_tensors="np"), vLLM's lora_request=None and a conversation as a tuple
        numpy_ids = llm.generate(np.array([5, 6, 7]), params, use_tqdm=False, lora_request=None)
        numpy_ids += llm.generate([{"prompt_token_ids": np.array([5, 6, 7])}, [np.int64(5), 6, 7]], params,
                                  use_tqdm=False)
        message = {"role": "user", "content": "Hi"}
        as_tuple, as_list = (llm.chat(m, params, use_tqdm=False, tools=None)[0] for m in ((message,), [message]))
        for unsupported in ({"lora_request": object()}, {"mm_processor_kwargs": {"size": 1}},
                            {"chat_template_content_format": "mistral"}):
            with pytest.raises(ValueError, match=f"{next(iter(unsupported))}=.* is not supported: "):
                llm.chat([message], params, use_tqdm=False, **unsupported)
        with pytest.raises(ValueError, match="priority=.* is not supported: "):
            llm.generate([[5, 6, 7], [5, 6]], params, use_tqdm=False, priority=[0, 2])
        # vLLM 0.26's generate takes mm_processor_kwargs (a TypeError here before); asking for nothing, it is taken
        assert llm.generate([[5, 6, 7]], params, use_tqdm=False, mm_processor_kwargs=None)[0].outputs[0].token_ids
        with pytest.raises(ValueError, match="mm_processor_kwargs=.* is not supported: "):
            llm.generate([[5, 6, 7]], params, use_tqdm=False, mm_processor_kwargs={"size": 1})
        for kwargs, refusal in (({"truncation": True}, "tokenization_kwargs 'truncation' not supported"),
                                ({"truncate_prompt_tokens": 2, "truncation_side": "right"}, "truncation_side='right'"),
                                ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens")):
            with pytest.raises(ValueError, match=re.escape(refusal)):
                llm.generate([[5, 6, 7], [5, 6]], params, use_tqdm=False, tokenization_kwargs=kwargs)
        # vLLM 0.26's truncation (its SamplingParams has no truncate_prompt_tokens): the prompt's last k tokens
        truncated = llm.generate([[9, 5, 6, 7], [5, 6]], params, use_tqdm=False,
                                 tokenization_kwargs={"truncate_prompt_tokens": 3, "truncation_side": "left"})
        assert [o.prompt_token_ids for o in truncated] == [[5, 6, 7], [5, 6]]
        assert truncated[0].outputs[0].token_ids == plain.outputs[0].token_ids
        chat_cut = llm.chat([message], params, use_tqdm=False, tokenization_kwargs={"truncate_prompt_tokens": 2})[0]
        assert len(chat_cut.prompt_token_ids) == 2
        # chat's arguments in vLLM's positional order (messages, params, use_tqdm, lora_request, chat_template, ...)
        assert llm.chat([message], params, False, None, None)[0].outputs[0].token_ids == as_list.outputs[0].token_ids
        for task in ("encode", "embed", "classify", "score", "reward"):  # vLLM's pooling tasks: refused by name
            with pytest.raises(ValueError, match=f"LLM.{task} is not supported: this engine runs text generation"):
                getattr(llm, task)(["Hi"])
        # vLLM's defaults of those arguments ask for nothing: taken
        llm.generate([[5, 6, 7], [5, 6]], params, use_tqdm=False, priority=[0, 0], tokenization_kwargs={})
        llm.generate([[5, 6, 7], [5, 6]], params, use_tqdm=False, lora_request=[None, None])  # one per prompt
        with pytest.raises(ValueError, match="lora_request=.* is not supported: "):
            llm.generate([[5, 6, 7], [5, 6]], params, use_tqdm=False, lora_request=[None, object()])
        llm.generate([[5, 6, 7], [5, 6]], params, use_tqdm=False, priority=np.zeros(2, dtype=np.int64))
        llm.chat([message], params, use_tqdm=False, chat_template_content_format="string", mm_processor_kwargs={})
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        template = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{{ messages[-1].content }}"
        with_tools = llm.chat([message], params, use_tqdm=False, tools=[tool], chat_template=template)[0]
        called = {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{}"}}]}  # (no content: vLLM takes it so)
        answered = {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
        after_a_call = llm.chat([message, called, answered], params, use_tqdm=False, tools=[tool],
                                chat_template=template)[0]
    finally:
        llm.shutdown()
    assert by_ids.outputs[0].token_ids == plain.outputs[0].token_ids and by_text.prompt == "Hi"
    assert [o.outputs[0].token_ids for o in numpy_ids] == [plain.outputs[0].token_ids] * 3
    assert as_tuple.prompt_token_ids == as_list.prompt_token_ids
    assert with_tools.prompt == "[get_weather]Hi", "tools reach the chat template, as vLLM gives them (was refused)"
    assert after_a_call.prompt == "[get_weather]sunny"


def test_logprobs_minus_one_is_the_whole_vocabulary_as_in_vllm(tiny_model_factory):
    """vLLM's logprobs=-1 / prompt_logprobs=-1 return every token's; they were refused as negative. The cap
    (max_logprobs) still applies, counting the whole vocabulary."""
    from batchllm import LLM
    from tests.helpers import VOCAB

    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, logprobs=-1, prompt_logprobs=-1)
    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64, max_logprobs=-1)
    try:
        out = llm.generate([[5, 6, 7]], params.clone(), use_tqdm=False)[0]
    finally:
        llm.shutdown()
    assert [len(entry) for entry in out.outputs[0].logprobs] == [VOCAB, VOCAB]
    assert out.prompt_logprobs[0] is None and [len(e) for e in out.prompt_logprobs[1:]] == [VOCAB, VOCAB]
    with pytest.raises(ValueError, match=rf"logprobs = -1 \(the whole vocabulary, {VOCAB}\) is more than max_logprobs"):
        params.clone().check_for_model(VOCAB, max_logprobs=20)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens_as_in_vllm(tiny_model_factory):
    """vLLM's truncate_prompt_tokens = k keeps a prompt's last k tokens (left truncation), before the prompt is
    checked against the context; -1 keeps what the context holds with room for one token."""
    from batchllm import LLM
    from batchllm.inputs import PromptProcessor

    prompts = PromptProcessor(None, vocab_size=100, max_model_len=10)
    ids = [500] + list(range(1, 20))  # (the token outside the vocabulary is cut off: no error)
    assert prompts.validate_ids(ids, 0, None, 4).token_ids == [16, 17, 18, 19]
    assert prompts.validate_ids(ids, 0, None, -1).token_ids == list(range(11, 20))
    assert prompts.validate_ids([1, 2], 0, None, 5).token_ids == [1, 2], "a shorter prompt is kept whole"
    with pytest.raises(ValueError, match=r"prompt 3: truncate_prompt_tokens \(11\) is more than the context"):
        prompts.validate_ids(ids, 3, None, 11)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prompts.validate_ids(ids, 0, None)
    assert [p.token_ids if not isinstance(p, ValueError) else None
            for p in prompts.tokenize_many([ids, ids[:3], ids], [0, 1, 2], [2, None, None])] == [[18, 19], None, None]

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
    try:
        long = list(range(5, 105))  # 100 tokens: more than the context
        with pytest.raises(ValueError, match="prompt 0 has 100 tokens"):
            llm.generate([long], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
        cut, tail, whole_context = llm.generate(
            [long, long[-6:], long], [SamplingParams(max_tokens=3, temperature=0, truncate_prompt_tokens=6),
                                      SamplingParams(max_tokens=3, temperature=0),
                                      SamplingParams(max_tokens=None, temperature=0, truncate_prompt_tokens=-1)],
            use_tqdm=False)
    finally:
        llm.shutdown()
    assert cut.prompt_token_ids == long[-6:] and cut.outputs[0].token_ids == tail.outputs[0].token_ids
    assert whole_context.prompt_token_ids == long[-63:] and len(whole_context.outputs[0].token_ids) == 1
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt_tokens == -1


def test_detokenize_false_gives_the_tokens_without_text_as_in_vllm(tiny_model_factory):
    """vLLM's detokenize=False (and its extra_args, kept for custom code) were "unexpected keyword" here, and
    ignored fields in a plain line."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
    try:
        common = dict(max_tokens=5, temperature=0, ignore_eos=True, logprobs=1, prompt_logprobs=1)
        params = [SamplingParams(**common), SamplingParams(**common, detokenize=False, extra_args={"a": 1})]
        text, tokens_only = llm.generate([[5, 6, 7]] * 2, params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert tokens_only.outputs[0].token_ids == text.outputs[0].token_ids and text.outputs[0].text
    assert tokens_only.outputs[0].text == ""
    assert all(lp.decoded_token is None for entry in tokens_only.outputs[0].logprobs for lp in entry.values())
    assert all(lp.decoded_token is None for entry in tokens_only.prompt_logprobs[1:] for lp in entry.values())
    assert all(lp.decoded_token is not None for entry in text.outputs[0].logprobs for lp in entry.values())


def test_vllm_structured_output_spellings_are_taken():
    """vLLM 0.10 scripts pass SamplingParams(guided_decoding=GuidedDecodingParams(...)), and vLLM's
    StructuredOutputsParams takes disable_any_whitespace and friends; each was a TypeError."""
    from batchllm.sampling_params import GuidedDecodingParams, StructuredOutputsParams

    old = SamplingParams(guided_decoding=GuidedDecodingParams(choice=["yes", "no"], backend="xgrammar"))
    assert old.structured_outputs == StructuredOutputsParams(choice=["yes", "no"], backend="xgrammar")
    assert old.guided_decoding is None and old.clone().structured_outputs.choice == ["yes", "no"]
    assert SamplingParams(guided_decoding={"regex": "[0-9]+"}).structured_outputs.regex == "[0-9]+"
    taken = StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=True, disable_fallback=True,
                                    disable_additional_properties=True)
    assert SamplingParams(structured_outputs=taken)._grammar_key == SamplingParams(
        structured_outputs={"json": {"type": "object"}})._grammar_key, "the same grammar"
    assert SamplingParams(structured_outputs={"json_object": True, "whitespace_pattern": "[ ]?"})._grammar_key == (
        SamplingParams(structured_outputs={"json_object": True})._grammar_key), "taken, unused, as vLLM 0.26 takes it"
    for bad, message in ((dict(structured_outputs={"regex": "a"}, guided_decoding={"regex": "b"}), "not both"),
                         (dict(structured_outputs={"regex": "a", "whitespace_pattern": 5}), "whitespace_pattern must"),
                         (dict(structured_outputs={"regex": "a", "structural_tag": "{}"}), "got regex, structural_tag"),
                         (dict(structured_outputs={"regex": "a", "backend": "outlines"}), "not available"),
                         (dict(structured_outputs={"regex": "a", "disable_fallback": 1}), "disable_fallback must be")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**bad)


def test_vllm_forms_of_sampling_fields_are_taken():
    """vLLM's SamplingParams turns logprobs=True into 1 and a stop string into a list, takes output_kind
    (RequestOutputKind) and builds from optional values (`from_optional`); a ported script used all four."""
    from batchllm.inputs import PromptType  # noqa: F401 - vLLM's type of a prompt, imported by typed scripts
    from batchllm.sampling_params import RequestOutputKind

    sp = SamplingParams(logprobs=True, prompt_logprobs=True, stop="x", output_kind=RequestOutputKind.FINAL_ONLY)
    assert (sp.logprobs, sp.prompt_logprobs, sp.stop, sp.stop_strings) == (1, 1, ["x"], ["x"])
    # false (JSON's, from a table's boolean column) asks for none: it was refused as "not an integer"
    assert (SamplingParams(logprobs=False).logprobs, SamplingParams(prompt_logprobs=False).prompt_logprobs) == (None,
                                                                                                             None)
    with pytest.raises(ValueError, match="SamplingParams.output_kind must be a RequestOutputKind"):
        SamplingParams(output_kind="final")
    built = SamplingParams.from_optional(n=None, temperature=None, top_p=None, presence_penalty=None, max_tokens=5,
                                         seed=3)
    assert built == SamplingParams(max_tokens=5, seed=3)
    with pytest.raises(ValueError, match="temperature must be in \\[0, 2\\]"):
        SamplingParams.from_optional(temperature=-1.0)
    assert "output_kind" not in SamplingParams.field_names()  # (not a field of a JSONL line or a Ray row)


def test_a_structural_tag_is_its_own_kind():
    """It was refused ("not supported"); it is a kind of its own, vLLM's, given as a JSON text."""
    from batchllm.sampling_params import StructuredOutputsParams

    assert SamplingParams(structured_outputs={"structural_tag": '{"format": 1}'}).grammar_key == (
        "structural_tag", '{"format": 1}')
    for bad in (5, ""):
        with pytest.raises(ValueError, match="structured_outputs.structural_tag must be a structural tag's JSON text"):
            StructuredOutputsParams(structural_tag=bad)


def test_what_vllm_scripts_read_of_an_output_and_call_between_runs(tiny_model_factory):
    """`output.metrics`, `.lora_request`, `llm.reset_prefix_cache()` were AttributeErrors. The reset is true to its
    word: a second call over the same prompts finds nothing cached from the first."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
    try:
        prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13] + [i] for i in range(20, 24)]
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        first = llm.generate(prompts, params, use_tqdm=False)
        assert llm.reset_prefix_cache() is True
        second = llm.generate(prompts, params, use_tqdm=False)
        assert [o.num_cached_tokens for o in second] == [o.num_cached_tokens for o in first]
        assert first[0].num_cached_tokens == 0, "the first of a group computes the shared prefix, in every call"
        out = second[0]
        assert (out.metrics, out.lora_request, out.encoder_prompt, out.encoder_prompt_token_ids,
                out.kv_transfer_params, out.outputs[0].lora_request) == (None,) * 6
    finally:
        llm.shutdown()


def test_vllm_026s_other_fields_are_taken_at_their_defaults_and_refused_by_name_otherwise():
    """flat_logprobs=False, thinking_token_budget=None ... were "unexpected keyword argument" TypeErrors."""
    taken = SamplingParams(logprob_token_ids=None, flat_logprobs=False, skip_clone=True, output_text_buffer_length=0,
                           routed_experts_prompt_start=0, skip_reading_prefix_cache=None, thinking_token_budget=None,
                           repetition_detection=None)
    assert taken.clone() == SamplingParams(skip_clone=True)
    for name, value, instead in (("thinking_token_budget", 64, "max_tokens"),
                                 ("flat_logprobs", True, "list of dicts")):
        with pytest.raises(ValueError, match=f"SamplingParams.{name} is not supported .*{instead}"):
            SamplingParams(**{name: value})
    assert SamplingParams(prompt_logprobs=1, skip_reading_prefix_cache=True).skip_reading_prefix_cache  # (vLLM's own)
    with pytest.raises(ValueError, match="skip_reading_prefix_cache must be true, false or None"):
        SamplingParams(skip_reading_prefix_cache=1)


def test_logprob_token_ids_are_checked_as_vllm_checks_them():
    """vLLM's: at most 128 ids, inside the vocabulary, and logprobs (if given) equal to their number; the number
    of logprobs returned per position is theirs. (A refused field before.)"""
    sp = SamplingParams(logprob_token_ids=[5, 9, 7])
    assert sp.num_logprobs == 3 and SamplingParams(logprobs=2).num_logprobs == 2
    assert SamplingParams(logprob_token_ids=[]).num_logprobs is None and SamplingParams().num_logprobs is None
    assert SamplingParams(logprobs=2, logprob_token_ids=[1, 2]).num_logprobs == 2
    assert "logprob_token_ids" in SamplingParams.field_names()  # a JSONL line may carry it
    with pytest.raises(ValueError, match=r"SamplingParams.logprobs must equal the number of logprob_token_ids \(2\)"):
        SamplingParams(logprobs=3, logprob_token_ids=[1, 2])
    with pytest.raises(ValueError, match="has 129 token ids; at most 128"):
        SamplingParams(logprob_token_ids=list(range(129)))
    for bad in ([1, -2], [1.0], "5", [True]):
        with pytest.raises(ValueError, match="logprob_token_ids must be a list of non-negative integers"):
            SamplingParams(logprob_token_ids=bad)
    with pytest.raises(ValueError, match=r"logprob_token_ids: token id 100 is outside the vocabulary \[0, 100\)"):
        SamplingParams(logprob_token_ids=[3, 100]).check_for_model(vocab_size=100)


def test_a_call_that_fails_before_its_loop_leaves_the_engine_clean(tiny_model_factory, monkeypatch):
    """A progress bar that failed to build (tqdm.notebook without ipywidgets), or an interrupt while the requests
    were being added, left them in the engine: every later call failed with KeyError '0-0-0'. A use_tqdm callable
    written for vLLM (total, desc, dynamic_ncols, postfix) failed on the keywords it was given."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    try:
        expected = [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)]

        def broken_bar(**kwargs):
            raise ImportError("IProgress not found")

        with pytest.raises(ImportError):
            llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=broken_bar)
        core = llm.engine.core
        add, added = core.add_request, []

        def interrupted(request):
            if added:
                raise KeyboardInterrupt
            added.append(add(request))

        monkeypatch.setattr(core, "add_request", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[5, 6, 7], [8, 9], [10, 11]], SamplingParams(max_tokens=3, n=2), use_tqdm=False)
        monkeypatch.setattr(core, "add_request", add)
        assert added and not core.has_unfinished()
        seen = {}

        def vllms_bar(total, desc, dynamic_ncols, postfix):  # (vLLM 0.26 calls it with these alone)
            from tqdm import tqdm

            seen.update(total=total, desc=desc)
            return tqdm(total=total, desc=desc, dynamic_ncols=dynamic_ncols, postfix=postfix, disable=True)

        again = llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=vllms_bar)
        assert [o.outputs[0].token_ids for o in again] == expected and seen["desc"] == "Processed prompts"
    finally:
        llm.shutdown()


def test_a_tiny_temperature_is_raised_and_from_optional_clamps_biases_as_vllm_does(caplog):
    """vLLM raises a temperature in (0, 0.01) to 0.01 (logits divided by less overflow) and its from_optional (its
    server's builder) clamps logit_bias to [-100, 100]; both were kept as given."""
    import logging

    from batchllm.sampling_params import _warn_low_temperature

    _warn_low_temperature.cache_clear()  # (warned once per value and process)
    with caplog.at_level(logging.WARNING, logger="batchllm"):
        assert SamplingParams(temperature=0.00499).temperature == 0.01
    assert "raised to 0.01" in caplog.text
    assert SamplingParams(temperature=0.0).temperature == 0.0 and SamplingParams(temperature=0.02).temperature == 0.02
    assert SamplingParams(temperature=1e-6, n=2).n == 2, "no longer greedy, as in vLLM"
    sp = SamplingParams(temperature=0.5)
    sp.temperature = 0.001  # set after construction: taken at submission, as vLLM reads it
    assert sp.as_given().temperature == 0.01
    assert SamplingParams.from_optional(logit_bias={"5": 500, 6: -250.5, 7: 3}).logit_bias == \
        {5: 100.0, 6: -100.0, 7: 3.0}


def test_greedy_resets_the_filters_of_sampling_as_vllm_does():
    """vLLM's SamplingParams sets top_p 1, top_k 0 and min_p 0 at temperature 0 (they change nothing there); scripts
    reading them back got the values given."""
    greedy = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.2)
    assert (greedy.top_p, greedy.top_k, greedy.min_p) == (1.0, 0, 0.0)
    sampled = SamplingParams(temperature=0.5, top_k=5, top_p=0.5, min_p=0.2)
    assert (sampled.top_p, sampled.top_k, sampled.min_p) == (0.5, 5, 0.2)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(temperature=0, top_p=0)  # still checked first, as in vLLM


def test_allowed_token_ids_that_every_ban_covers_are_refused_naming_the_options():
    """allowed_token_ids of stop tokens alone with min_tokens > 0 (or of one-token bad words) masked every token and
    the sampler emitted token 0, outside allowed_token_ids; such a request is refused before it runs."""
    class Words:  # a tokenizer of one token per word: "bad" is token 7, "worse" token 8
        def encode(self, text, add_special_tokens=False):
            return [{"bad": 7, "worse": 8}[w] for w in text.split()]

    def check(eos=(2,), **fields):
        SamplingParams(max_tokens=8, **fields).check_for_model(100, Words(), eos_token_ids=eos)

    with pytest.raises(ValueError, match=r"allowed_token_ids \[2\] holds only stop tokens .*min_tokens = 3"):
        check(allowed_token_ids=[2], min_tokens=3)
    with pytest.raises(ValueError, match=r"allowed_token_ids \[2, 5\] .*stop_token_ids.*min_tokens = 1"):
        check(allowed_token_ids=[2, 5], stop_token_ids=[5], min_tokens=1)
    with pytest.raises(ValueError, match=r"stop_token_ids\) or bad_words, which min_tokens"):
        check(allowed_token_ids=[2, 7], bad_words=["bad"], min_tokens=1)
    with pytest.raises(ValueError, match=r"allowed_token_ids \[7, 8\] are all banned by bad_words"):
        check(allowed_token_ids=[7, 8], bad_words=["bad", "worse"])
    check(allowed_token_ids=[2], min_tokens=0)  # (a stop token may end the answer at once)
    check(allowed_token_ids=[2, 9], min_tokens=3)  # (9 is sampled until min_tokens)
    check(allowed_token_ids=[7, 9], bad_words=["bad"], min_tokens=3)
    check(allowed_token_ids=[2], min_tokens=3, eos=())  # (2 is no stop token of this model)


def test_numpy_scalars_and_arrays_are_taken_as_python_values():
    """Prompts take numpy token ids, but `SamplingParams(max_tokens=np.int64(4))` (a value from a table's column)
    was refused as not an integer, as were numpy seeds, logprobs, logit_bias keys and np.float32 temperatures; an
    array of allowed_token_ids failed inside numpy ("truth value of an array is ambiguous"). They are Python's
    values now; a bool or a fraction is still refused by name."""
    params = SamplingParams(max_tokens=np.int64(4), min_tokens=np.int32(1), seed=np.int64(3), logprobs=np.int64(2),
                            temperature=np.float32(0.5), logit_bias={np.int64(5): np.float32(1.5)},
                            stop_token_ids=[np.int64(1), 2], allowed_token_ids=np.array([37, 38]))
    assert (params.max_tokens, params.min_tokens, params.seed, params.logprobs) == (4, 1, 3, 2)
    assert type(params.max_tokens) is int and type(params.temperature) is float and params.temperature == 0.5
    assert params.logit_bias == {5: 1.5} and all(type(k) is int for k in params.logit_bias)
    assert params.stop_token_ids == [1, 2] and params.allowed_token_ids == [37, 38]
    assert all(type(t) is int for t in params.stop_token_ids + params.allowed_token_ids)
    assert params == SamplingParams(max_tokens=4, min_tokens=1, seed=3, logprobs=2, temperature=0.5,
                                    logit_bias={5: 1.5}, stop_token_ids=[1, 2], allowed_token_ids=[37, 38])
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        SamplingParams(max_tokens=np.float64(4.5))
    with pytest.raises(ValueError, match="allowed_token_ids must be a non-empty list"):
        SamplingParams(allowed_token_ids=np.array([], dtype=np.int64))


def test_a_minus_infinite_logit_bias_bans_its_token_as_in_vllm(tiny_model_factory):
    """vLLM adds logit_bias to the logits whatever its values: -inf bans a token (a common idiom), refused here as
    "not finite". +inf and NaN would make every probability NaN: still refused. n goes up to vLLM's 16,384."""
    from batchllm import LLM

    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", skip_tokenizer_init=True, num_kv_blocks=16)
    try:
        prompt = [{"prompt_token_ids": [5, 6, 7, 8]}]
        plain = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
        banned = plain.token_ids[0]
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                  logit_bias={banned: float("-inf")}))[0].outputs[0]
        assert banned not in out.token_ids and out.token_ids != plain.token_ids
        with pytest.raises(ValueError, match=rf"allowed_token_ids \[{banned}\] are all banned by bad_words or a -inf"):
            llm.generate(prompt, SamplingParams(max_tokens=2, allowed_token_ids=[banned],
                                                logit_bias={banned: float("-inf")}))
    finally:
        llm.shutdown()
    for value in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=r"logit_bias must map token ids .* finite numbers \(or -inf, a ban\)"):
            SamplingParams(logit_bias={5: value})
    assert SamplingParams(n=16384, temperature=1.0).n == 16384
    with pytest.raises(ValueError, match=r"n must be in \[1, 16384\]"):
        SamplingParams(n=16385, temperature=1.0)
