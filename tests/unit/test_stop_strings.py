"""Stop strings searched through a window of the last tokens (output_processor.py) stop at the same
token, with the same cut text, as decoding and searching the whole output after every token."""

from __future__ import annotations

import random

import pytest

from batchllm.inputs import load_tokenizer
from batchllm.output_processor import _REDECODE_MARGIN, CompletionState, _without_a_cut_character
from batchllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return load_tokenizer(default_model_dir)


def full_decode_reference(tokenizer, params: SamplingParams, tokens: list[int]) -> tuple[int, str, str] | None:
    """The search before the window: decode everything after every token (less the tokens of a character not yet
    whole, as vLLM holds them back). (token index, stop, cut text)."""
    checked, longest = 0, max(len(s) for s in params.stop_strings)

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    for i in range(1, len(tokens) + 1):
        text = _without_a_cut_character(tokens[:i], decode)
        start = max(0, checked - longest - _REDECODE_MARGIN)
        found = [(text.find(s, start), s) for s in params.stop_strings if text.find(s, start) != -1]
        checked = len(text)
        if found:
            at, stop = found[0]  # the first stop in the list's order (vLLM's), not the earliest in the text
            return i - 1, stop, text[: at + len(stop)] if params.include_stop_str_in_output else text[:at]
    return None


def windowed(tokenizer, params: SamplingParams, tokens: list[int]) -> tuple[int, str, str] | None:
    state = CompletionState(0, params, tokenizer)
    for i, token in enumerate(tokens):
        stop = state.append(token, None)
        if stop is not None:
            return i, stop, state.stop_text
    return None


def random_stream(rng: random.Random, tokenizer, length: int) -> list[int]:
    """Tokens of mixed text: ASCII words, multi-byte characters split across tokens, emoji, runs
    of spaces and newlines, and (now and then) special tokens, which decode to nothing when skipped."""
    pieces = ["hello world", " the end.", "\n\n", "    ", "é à ü", "日本語のテキスト", "🙂🚀", "###", "Answer:",
              " <tag>", "x" * 40]
    tokens: list[int] = []
    while len(tokens) < length:
        if rng.random() < 0.1:
            tokens.append(rng.randrange(0, 17))  # SmolLM2's special tokens
        elif rng.random() < 0.3:
            tokens.append(rng.randrange(17, 49152))
        else:
            tokens.extend(tokenizer.encode(rng.choice(pieces), add_special_tokens=False))
    return tokens[:length]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("include", [False, True])
def test_windowed_stop_search_matches_decoding_everything(tokenizer, skip_special_tokens, include):
    rng = random.Random(f"{skip_special_tokens}-{include}")
    num_matched = 0
    for _ in range(60):
        tokens = random_stream(rng, tokenizer, rng.randrange(20, 160))
        text = tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)
        stops = []
        for _ in range(rng.randrange(1, 3)):  # substrings of the text (so that they match), or absent ones
            if rng.random() < 0.8 and len(text) > 2:
                start = rng.randrange(len(text) // 3, len(text) - 1)
                stops.append(text[start:start + rng.randrange(1, 14)])
            else:
                stops.append("never in the text \u2603")
        params = SamplingParams(stop=stops, skip_special_tokens=skip_special_tokens,
                                include_stop_str_in_output=include)
        expected = full_decode_reference(tokenizer, params, tokens)
        assert windowed(tokenizer, params, tokens) == expected, (tokens, stops)
        num_matched += expected is not None
    assert num_matched > 30  # the comparison covered stops that matched, not only misses


def test_a_token_completing_two_stops_ends_at_the_first_in_the_lists_order(tokenizer):
    """As vLLM's check_stop_strings: " Paris" completes both "is" and "ar"; the earliest in the text ("ar") was
    taken, where vLLM takes the first listed ("is")."""
    paris = tokenizer.encode(" Paris", add_special_tokens=False)
    assert len(paris) == 1
    for stops, include, expected in ((["is", "ar"], False, ("is", " Par")), (["is", "ar"], True, ("is", " Paris")),
                                     (["ar", "is"], False, ("ar", " P"))):
        state = CompletionState(0, SamplingParams(stop=stops, include_stop_str_in_output=include), tokenizer)
        assert (state.append(paris[0], None), state.stop_text) == expected


def test_no_stop_matches_inside_a_character_not_yet_whole(tokenizer):
    """vLLM's incremental detokenizer holds back text ending inside a multi-byte character: " " matched the space of
    the token " \xf0\x9f" (an emoji's first bytes) one token early, and U+FFFD, the decoder's stand-in for those
    bytes, matched though vLLM's text never holds it."""
    tokens = tokenizer.encode(" 🍕 pizza", add_special_tokens=False)
    assert tokenizer.decode(tokens[:1]).endswith("\ufffd"), "the emoji is split across tokens"
    emoji_end = next(i for i in range(1, len(tokens) + 1) if tokenizer.decode(tokens[:i]) == " 🍕")
    assert emoji_end > 1
    assert windowed(tokenizer, SamplingParams(stop=[" "]), tokens) == (emoji_end - 1, " ", "")
    assert windowed(tokenizer, SamplingParams(stop=["\ufffd"]), tokens) is None
    assert windowed(tokenizer, SamplingParams(stop=["🍕"], include_stop_str_in_output=True), tokens) == \
        (emoji_end - 1, "🍕", " 🍕")


def test_the_text_never_ends_in_a_replacement_character(tokenizer):
    """vLLM's detokenizer holds back every token whose text so far ends in U+FFFD and drops them when the request
    ends. Tokens ending inside a character were dropped here, but a stray continuation byte (0x80) and a cut emoji
    followed by skipped special tokens (whose own bytes ended the byte string) left '\ufffd\ufffd' and '\ufffd',
    which a stop=['\ufffd'] matched; vLLM's text is '' and its request ends by length."""
    stray, emoji_start = 218, 187  # SmolLM2's byte tokens 0x80 (a continuation byte) and 0xF0 (a 4-byte lead)
    assert tokenizer.decode([stray, stray]).endswith("\ufffd") and tokenizer.decode([emoji_start]) == "\ufffd"
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for tokens in ([stray, stray], [emoji_start, special, special]):
        state = CompletionState(0, SamplingParams(max_tokens=len(tokens)), tokenizer)
        for token in tokens:
            assert state.append(token, None) is None
        state.finish("length", None)
        assert state.to_output().text == "", tokens
        assert windowed(tokenizer, SamplingParams(stop=["\ufffd"]), tokens) is None, tokens
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    state = CompletionState(0, SamplingParams(), tokenizer)
    for token in hello + [stray] + hello:  # a stray byte inside the text stays, as vLLM emits it once text follows
        state.append(token, None)
    state.finish("length", None)
    assert state.to_output().text == "Hello\ufffdHello"
