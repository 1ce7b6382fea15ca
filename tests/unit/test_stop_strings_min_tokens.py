"""Stop strings against min_tokens, token by token (`output_processor.CompletionState`), with vLLM's rule:
none is looked for until the output is longer than min_tokens, and then only one that ends past the
first min_tokens tokens' text; one that starts inside that text and ends past it counts."""

from __future__ import annotations

import pytest

from batchllm.output_processor import CompletionState
from batchllm.sampling_params import SamplingParams

IDS = [19556, 30, 2260, 30, 9490, 30]  # SmolLM2: "Hello" "." " World" "." " Again" "."


@pytest.fixture(scope="module")
def tokenizer():
    from batchllm.inputs import prompt_processor_for

    tok = prompt_processor_for(None).tokenizer
    assert tok.decode(IDS) == "Hello. World. Again."
    return tok


def first_stop(tokenizer, **params) -> tuple[int, str | None, str]:
    """(tokens appended when a stop string matched, the stop, the text) for the tokens of IDS."""
    state = CompletionState(0, SamplingParams(**params), tokenizer)
    for n, token in enumerate(IDS, start=1):
        if (stop := state.append(token, None)) is not None:
            return n, stop, state.to_output().text
    return len(IDS), None, state.to_output().text


@pytest.mark.parametrize("min_tokens, expected", [
    (0, (2, ".", "Hello")),            # the first "." ends the output
    (1, (2, ".", "Hello")),            # 2 tokens > min_tokens 1
    (2, (4, ".", "Hello. World")),     # the first "." is within the first 2 tokens' text: the second counts
    (4, (6, ".", "Hello. World. Again")),
    (6, (6, None, "Hello. World. Again.")),
])
def test_a_stop_string_counts_past_min_tokens(tokenizer, min_tokens, expected):
    assert first_stop(tokenizer, stop=["."], min_tokens=min_tokens, max_tokens=10) == expected


def test_a_stop_string_begun_within_min_tokens_counts_where_it_ends_past_them(tokenizer):
    assert first_stop(tokenizer, stop=[". W"], min_tokens=2, max_tokens=10) == (3, ". W", "Hello")
    assert first_stop(tokenizer, stop=["o."], min_tokens=2, max_tokens=10) == (6, None, "Hello. World. Again.")
