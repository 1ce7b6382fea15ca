"""Sampling end to end on SmolLM2: seeds, n > 1, stop strings, logprobs, min_tokens, max_tokens."""

from __future__ import annotations

import pytest

from batchllm import SamplingParams
from tests.e2e.prompts import RAW_PROMPTS

pytestmark = pytest.mark.slow

STORY = "Once upon a time, in a small village by the sea,"


def texts(outputs):
    return [o.outputs[0].text for o in outputs]


def test_seeded_request_is_reproducible_whatever_else_is_in_the_batch(default_llm):
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=24)
    alone = default_llm.generate(STORY, seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.2, max_tokens=30)
    batch = default_llm.generate(RAW_PROMPTS[:2] + [STORY] + RAW_PROMPTS[2:],
                                 [others, others, seeded, others, others], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    again = default_llm.generate(STORY, seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone
    other_seed = default_llm.generate(STORY, SamplingParams(temperature=1.0, top_p=0.95, seed=43, max_tokens=24),
                                      use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_completions_per_prompt(default_llm):
    out = default_llm.generate([STORY, "The sky is"], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12),
                               use_tqdm=False)
    assert [len(o.outputs) for o in out] == [3, 3]
    assert [c.index for c in out[0].outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out[0].outputs}) > 1
    # completion k of a seeded n>1 request is completion 0 of a request seeded with seed + k
    single = default_llm.generate(STORY, SamplingParams(temperature=1.0, seed=8, max_tokens=12), use_tqdm=False)
    assert single[0].outputs[0].token_ids == out[0].outputs[1].token_ids


def test_statistics_count_a_prompt_of_n_completions_once(default_llm):
    """vLLM's usage counts a request's prompt tokens once whatever its n; `last_stats` counted them once per
    completion (its prompt_tokens and num_requests were its n engine requests'). The saving stays what sharing
    saves against the prefill without it, the completions' prompt tokens."""
    out = default_llm.generate([STORY, "The sky is"], [SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=2),
                                                        SamplingParams(max_tokens=2)], use_tqdm=False)
    s = default_llm.last_stats
    lengths = [len(o.prompt_token_ids) for o in out]
    assert s["prompt_tokens"] == sum(lengths) and s["num_requests"] == 2
    assert s["completion_prompt_tokens"] == 3 * lengths[0] + lengths[1] and s["num_completions"] == 4
    assert s["output_tokens"] == sum(o.num_output_tokens for o in out) == 8
    assert s["saving_ratio"] == pytest.approx(1 - s["prefill_tokens_computed"] / s["completion_prompt_tokens"])
    assert s["prefill_tokens_computed"] < s["completion_prompt_tokens"], "the completions share their prompt"


def test_stop_strings_cut_exactly(default_llm):
    greedy = SamplingParams(temperature=0, max_tokens=40)
    full = default_llm.generate(STORY, greedy, use_tqdm=False)[0].outputs[0].text
    stop = full[18:24]
    assert stop.strip() and full.find(stop) == 18, "pick a stop string that occurs once, mid-text"
    cut = default_llm.generate(STORY, SamplingParams(temperature=0, max_tokens=40, stop=[stop, "zzzz"]),
                               use_tqdm=False)[0].outputs[0]
    assert cut.text == full[:18]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    kept = default_llm.generate(
        STORY, SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=True),
        use_tqdm=False)[0].outputs[0]
    assert kept.text == full[:24]


def test_logprobs_top_k_per_token(default_llm):
    out = default_llm.generate(STORY, SamplingParams(temperature=0, max_tokens=6, logprobs=3),
                               use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 6
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
        assert all(lp.logprob <= 0 for lp in entry.values())
        assert entry[token].decoded_token is not None
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_min_tokens_and_max_tokens(default_llm):
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    natural = default_llm.chat(conv, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0].outputs[0]
    assert natural.finish_reason == "stop" and len(natural.token_ids) < 12
    longer = default_llm.chat(conv, SamplingParams(temperature=0, max_tokens=40, min_tokens=15),
                              use_tqdm=False)[0].outputs[0]
    assert len(longer.token_ids) >= 15
    short = default_llm.chat(conv, SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert len(short.token_ids) == 3 and short.finish_reason == "length"


def test_generate_validates_every_prompt_before_running(default_llm):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        default_llm.generate(["fine", ""], use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        default_llm.generate({"prompt_token_ids": [1, 10**9]}, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        default_llm.generate({"prompt_token_ids": [5] * 5000}, use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        default_llm.generate(["x"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    # vLLM users pass settings as a dict; that used to be "AttributeError: 'str' object has no attribute ..."
    with pytest.raises(TypeError, match=r"SamplingParams or a list of them .* got dict \(build one"):
        default_llm.generate(["x"], {"max_tokens": 2}, use_tqdm=False)
    with pytest.raises(TypeError, match="got a list holding dict"):
        default_llm.generate(["x"], [{"max_tokens": 2}], use_tqdm=False)
    with pytest.raises(TypeError, match="got a list holding NoneType"):  # (was AttributeError: 'NoneType' ...)
        default_llm.generate(["x", "y"], [SamplingParams(max_tokens=2), None], use_tqdm=False)
    with pytest.raises(TypeError, match="prompts must be a prompt or a list of prompts, got NoneType"):
        default_llm.generate(None, use_tqdm=False)
    with pytest.raises(ValueError, match=r"logprobs = 21 is more than max_logprobs \(20\)"):  # vLLM's default cap
        default_llm.generate(["x"], SamplingParams(logprobs=21), use_tqdm=False)
    outs = default_llm.generate(["x"], (sp for sp in [SamplingParams(max_tokens=1)]), use_tqdm=False)
    assert len(outs[0].outputs[0].token_ids) == 1  # any iterable of SamplingParams still works
    assert not default_llm.engine.core.has_unfinished()


def test_stop_strings_wait_for_min_tokens(default_llm):
    """As vLLM: a stop string counts only once the output is longer than min_tokens, and only where it
    ends past the first min_tokens tokens' text. The stop string was matched from the first token, so an
    output could end with fewer than min_tokens tokens."""
    greedy = SamplingParams(temperature=0, max_tokens=40)
    full = default_llm.generate(STORY, greedy, use_tqdm=False)[0].outputs[0]
    stop = "."
    early = default_llm.generate(STORY, SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
                                 use_tqdm=False)[0].outputs[0]
    assert early.stop_reason == stop
    first_stop_tokens = len(early.token_ids)
    held = default_llm.generate(STORY, SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                                      min_tokens=first_stop_tokens + 1), use_tqdm=False)[0].outputs[0]
    assert len(held.token_ids) > first_stop_tokens + 1
    assert list(held.token_ids) == list(full.token_ids[:len(held.token_ids)]), "greedy: the same tokens"
    later = full.text.find(stop, len(early.text) + len(stop))
    if held.finish_reason == "stop":
        assert held.text == full.text[:later]
    else:
        assert later == -1 or later + len(stop) > len(held.text)


def test_a_stop_tokens_text_is_left_out(default_llm):
    """As vLLM: the output's text leaves out the EOS or stop_token_ids token that ended it (token_ids keep
    it) unless include_stop_str_in_output. It used to end with "\\n" or "<|im_end|>"."""
    greedy = SamplingParams(temperature=0, max_tokens=40)
    full = default_llm.generate(STORY, greedy, use_tqdm=False)[0].outputs[0]
    stop_token = full.token_ids[5]
    ended = default_llm.generate(STORY, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token]),
                                 use_tqdm=False)[0].outputs[0]
    cut = full.token_ids.index(stop_token)
    assert list(ended.token_ids) == list(full.token_ids[:cut + 1]) and ended.stop_reason == stop_token
    tokenizer = default_llm.get_tokenizer()
    assert ended.text == tokenizer.decode(full.token_ids[:cut], skip_special_tokens=True)
    kept = default_llm.generate(STORY, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_token],
                                                      include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == tokenizer.decode(full.token_ids[:cut + 1], skip_special_tokens=True)
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    raw = default_llm.chat(conv, SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False),
                           use_tqdm=False)[0].outputs[0]
    assert raw.finish_reason == "stop" and raw.stop_reason is None, "ended by EOS"
    assert "<|im_end|>" not in raw.text and raw.text == tokenizer.decode(raw.token_ids[:-1])


def test_stop_token_ids_no_token_has_never_stop_and_are_not_banned(default_llm):
    """As vLLM 0.26: stop_token_ids outside the vocabulary (or negative) are taken and, never sampled, never end
    the output; under min_tokens they ban nothing (they indexed the logits out of range, or failed the request).
    The output is the one without them, token for token."""
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    vocab = default_llm.llm_engine.get_model_config().get_vocab_size()
    plain = default_llm.chat(conv, SamplingParams(temperature=0, max_tokens=20, min_tokens=3), use_tqdm=False)
    odd = SamplingParams(temperature=0, max_tokens=20, min_tokens=3, stop_token_ids=[vocab, vocab + 7, -1, 2**70])
    got = default_llm.chat(conv, odd, use_tqdm=False)
    assert got[0].outputs[0].token_ids == plain[0].outputs[0].token_ids
    assert got[0].outputs[0].finish_reason == plain[0].outputs[0].finish_reason == "stop", "ended by EOS"


def test_chat_continues_the_final_message(default_llm):
    """vLLM's LLM.chat(continue_final_message=True): the assistant's last message is continued, not closed
    (the keyword was a TypeError)."""
    conv = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France"}]
    out = default_llm.chat(conv, SamplingParams(temperature=0, max_tokens=8), add_generation_prompt=False,
                           continue_final_message=True, use_tqdm=False)[0].outputs[0]
    assert out.text.startswith(" is Paris"), out.text
    with pytest.raises(ValueError, match="add_generation_prompt and continue_final_message cannot both be true"):
        default_llm.chat(conv, SamplingParams(max_tokens=2), continue_final_message=True, use_tqdm=False)
    # conversations from a generator ('generator' object is not subscriptable)
    made = default_llm.chat((c for c in [conv[:1], conv[:1]]), SamplingParams(temperature=0, max_tokens=4),
                            use_tqdm=False)
    assert len(made) == 2 and made[0].outputs[0].text == made[1].outputs[0].text


def test_chats_own_arguments_win_over_its_chat_template_kwargs(default_llm):
    """vLLM's LLM.chat merges its explicit add_generation_prompt, continue_final_message and tools over
    chat_template_kwargs; here the kwargs won (a kwargs add_generation_prompt false dropped the generation prompt
    that chat's own default True asks for)."""
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    one = SamplingParams(temperature=0, max_tokens=1)

    def prompt(conversation, **kwargs):
        return default_llm.chat(conversation, one, use_tqdm=False, **kwargs)[0].prompt_token_ids

    plain = prompt(conv)
    assert prompt(conv, chat_template_kwargs={"add_generation_prompt": False}) == plain
    assert prompt(conv, add_generation_prompt=False) != plain
    answer = [*conv, {"role": "assistant", "content": "The capital of France"}]
    closed = prompt(answer, add_generation_prompt=False)
    assert prompt(answer, add_generation_prompt=False, chat_template_kwargs={"continue_final_message": True}) == closed
    assert prompt(answer, add_generation_prompt=False, continue_final_message=True) != closed


def test_an_output_cut_inside_a_character_does_not_end_in_a_replacement_character(default_llm):
    """Byte-level BPE splits an emoji over tokens; an output cut by max_tokens between them ended in U+FFFD,
    where vLLM's detokenizer holds the unfinished character back."""
    prompt = "Smiley emoji: 😀😀😀 and again:"
    full = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0].outputs[0]
    assert "\ufffd" not in full.text and any(ord(c) > 0xFFFF for c in full.text), "the answer holds emoji"
    for n in range(1, 8):
        cut = default_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n), use_tqdm=False)[0].outputs[0]
        assert "\ufffd" not in cut.text and full.text.startswith(cut.text), (n, cut.text)


def test_a_token_ending_inside_a_character_shows_none_of_its_text(default_llm):
    """vLLM's detokenizer holds back the whole text of a token that ends inside a character: a token of bytes
    " \\xf0\\x9f" (a space, then an emoji's first half) cut by max_tokens gave " " here, "" there."""
    from batchllm.output_processor import token_bytes

    tokenizer = default_llm.get_tokenizer()
    half = next(t for t in range(1000, 40000) if token_bytes(tokenizer, t) == b" \xf0\x9f")
    params = SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=[half])
    assert default_llm.generate("Hi", params, use_tqdm=False)[0].outputs[0].text == ""
    two = SamplingParams(temperature=0, max_tokens=2, allowed_token_ids=[half, tokenizer.encode("a")[0]])
    out = default_llm.generate("Hi", two, use_tqdm=False)[0].outputs[0]
    assert not out.text.endswith(("\ufffd", " ")), out.text


def test_a_stop_string_in_the_ending_tokens_text_does_not_count(default_llm):
    """As vLLM: the EOS that ended the output is left out before stop strings are looked for, so a stop
    string spelling it ("<|im_end|>" with skip_special_tokens off) does not become the stop_reason."""
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    plain = SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False)
    stopped = SamplingParams(temperature=0, max_tokens=40, skip_special_tokens=False, stop=["<|im_end|>"])
    a, b = (default_llm.chat(conv, p, use_tqdm=False)[0].outputs[0] for p in (plain, stopped))
    assert (b.text, b.token_ids, b.finish_reason, b.stop_reason) == (a.text, a.token_ids, "stop", None)


def test_fields_set_after_construction_take_effect_and_are_checked(default_llm):
    """vLLM reads SamplingParams when a request is submitted: `sp.stop = [...]` after construction worked
    there, but was ignored here with n = 1 (its stop strings were derived once, at construction), and a
    bad value set so failed deep inside the engine, or not at all."""
    sp = SamplingParams(temperature=0, max_tokens=8)
    sp.stop = ["."]
    out = default_llm.generate("The capital of France is", sp, use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (" Paris", "stop", ".")
    sp.structured_outputs = {"choice": ["yes", "no"]}
    assert default_llm.generate("Is Paris in France?", sp, use_tqdm=False)[0].outputs[0].text in ("yes", "no")
    for name, value, message in (("max_tokens", 0, "SamplingParams.max_tokens"),
                                 ("logit_bias", {"x": 1.0}, "SamplingParams.logit_bias must map token ids")):
        bad = SamplingParams(temperature=0, max_tokens=4)
        setattr(bad, name, value)
        with pytest.raises(ValueError, match=message):
            default_llm.generate("Hi", bad, use_tqdm=False)
    given = SamplingParams(temperature=0, max_tokens=2, bad_words=["Paris"])
    default_llm.generate("Hi", [given], use_tqdm=False)
    assert given.bad_words_token_ids == [], "the caller's object is left as given (its copy is tokenized)"


def test_allowed_stop_tokens_alone_under_min_tokens_are_refused_and_never_answered_with_token_0(default_llm):
    """The model's EOS alone allowed, with min_tokens 2: every token was masked and the answer was [0, 0, EOS]."""
    eos = sorted(default_llm.eos_token_ids)
    with pytest.raises(ValueError, match=r"allowed_token_ids .* holds only stop tokens .*min_tokens = 2"):
        default_llm.generate("Hello", SamplingParams(max_tokens=4, min_tokens=2, allowed_token_ids=eos),
                             use_tqdm=False)
    out = default_llm.generate("Hello", SamplingParams(temperature=0, max_tokens=4, min_tokens=2,
                                                       allowed_token_ids=[*eos, 1000]), use_tqdm=False)
    tokens = out[0].outputs[0].token_ids
    assert tokens[:2] == [1000, 1000] and set(tokens) <= {*eos, 1000}, "only allowed tokens, no stop before 2"
