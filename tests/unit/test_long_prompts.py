"""A prompt far longer than the context is refused from its opening, never tokenized whole (inputs.py).

A 20 MB prompt line used to be tokenized whole before its refusal: 3.5 GB and 20 s on the default model.
"""

from __future__ import annotations

from functools import lru_cache

import pytest

from batchllm.inputs import OPENING_CHARS_PER_TOKEN, ContextLengthError, PromptProcessor, prompt_processor_for

CONTEXT = 64


@lru_cache(maxsize=1)
def default_processor() -> PromptProcessor:
    return prompt_processor_for(None, None, CONTEXT)


class RecordingTokenizer:
    """The default model's tokenizer, recording the longest text it was given."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.longest = 0

    def __call__(self, text, **kwargs):
        texts = [text] if isinstance(text, str) else text
        self.longest = max([self.longest, *map(len, texts)])
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def recording_processor() -> tuple[PromptProcessor, RecordingTokenizer]:
    base = default_processor()
    tokenizer = RecordingTokenizer(base.tokenizer)
    return PromptProcessor(tokenizer, base.vocab_size, CONTEXT, eos_token_ids=list(base.eos_token_ids)), tokenizer


def whole_token_count(text: str) -> int:
    processor = default_processor()
    return len(processor.tokenizer(text, add_special_tokens=processor._adds_special_tokens(text))["input_ids"])


def test_a_text_whose_opening_overfills_the_context_is_refused_from_the_opening():
    processor, tokenizer = recording_processor()
    text = "hello world " * 20_000  # 240,000 characters, 40,000 tokens

    with pytest.raises(ContextLengthError, match=r"prompt 3 has more than 64 tokens \(its first 1024 of 240000 "):
        processor.tokenize_prompt(text, 3)

    assert tokenizer.longest == OPENING_CHARS_PER_TOKEN * CONTEXT


def test_tokenize_many_refuses_the_long_text_and_tokenizes_the_others():
    processor, tokenizer = recording_processor()
    short = "What is the capital of France?"

    results = processor.tokenize_many(["hello world " * 20_000, short], [0, 1])

    assert isinstance(results[0], ContextLengthError) and "prompt 0 has more than 64 tokens" in str(results[0])
    assert list(results[1].token_ids) == default_processor().tokenize_prompt(short).token_ids
    assert tokenizer.longest == OPENING_CHARS_PER_TOKEN * CONTEXT


@pytest.mark.parametrize("text", [
    " " * 4_000,   # about 64 spaces a token: the opening cannot tell; the whole fits (63 tokens)
    " " * 5_000,   # ... and the whole does not (79 tokens)
    "a" * 1_100,   # just past the opening's length: 275 tokens
    "hello world " * 86, "hello world " * 90,  # shorter than the opening: tokenized whole as always
])
def test_the_opening_refuses_exactly_what_the_whole_text_would(text):
    processor, _ = recording_processor()
    fits = whole_token_count(text) < CONTEXT

    try:
        result = processor.tokenize_prompt(text)
    except ContextLengthError:
        assert not fits
    else:
        assert fits and len(result.token_ids) == whole_token_count(text)


def test_a_truncated_text_is_still_tokenized_whole_and_keeps_its_last_tokens():
    processor, tokenizer = recording_processor()
    text = "one two three " * 1_000

    kept = processor.tokenize_prompt(text, truncate=10).token_ids

    whole = default_processor().tokenizer(text)["input_ids"]
    assert kept == whole[-10:] and tokenizer.longest == len(text)


def test_a_long_text_the_tokenizer_refuses_costs_only_its_own_line():
    processor, _ = recording_processor()

    results = processor.tokenize_many(["bad \ud800 " + "hello world " * 20_000, "Hi"], [0, 1])

    assert "prompt 0: the tokenizer refused it" in str(results[0]) and len(results[1].token_ids) > 0
