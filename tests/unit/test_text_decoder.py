"""`output_processor.text_decoder`: an output's text is decoded through the tokenizers backend directly (as vLLM's
detokenizer does), not through HF's `decode` wrapper, whose Python (`to_py_obj` walking the ids, argument handling)
cost ~5x the decode itself; the stream that replays an output holding U+FFFD decodes twice per token, so the
wrapper was ~40% of the host time per step of `benchmarks/host_overhead.py`. The text must stay HF's."""

from __future__ import annotations

import functools
import random

import pytest
import transformers.tokenization_utils_base as tokenization_base
from transformers import AutoTokenizer

from batchllm import output_processor
from batchllm.output_processor import CompletionState
from batchllm.sampling_params import SamplingParams
from tests.unit.test_byte_fallback_text import vllm_output


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def test_same_text_as_hf_decode(tokenizer):
    """Random ids over the whole vocabulary (byte pieces that are not UTF-8, special tokens), both skip values."""
    rng = random.Random(0)
    special = list(tokenizer.all_special_ids)
    for skip in (False, True):
        decode = output_processor.text_decoder(tokenizer, skip)
        for _ in range(300):
            ids = [rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(tokenizer))
                   for _ in range(rng.randrange(0, 12))]
            assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_customised_tokenizer_keeps_its_decode(tokenizer):
    """A tokenizer class that overrides `decode` (or cleans up spaces) is asked itself."""
    class Shouting(type(tokenizer)):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).upper()

    shouting = Shouting.__new__(Shouting)
    shouting.__dict__.update(tokenizer.__dict__)
    ids = tokenizer.encode("hello there", add_special_tokens=False)
    assert output_processor.text_decoder(shouting, False)(ids) == "HELLO THERE"


def test_streamed_text_does_not_call_hf_decode_per_token(tokenizer, monkeypatch):
    """An output of stray bytes (its text holds U+FFFD, so vLLM's stream is replayed token by token): its text
    is vLLM's (DecodeStream, primed with the prompt), and HF's `decode` wrapper runs a fixed number of times,
    not twice per output token."""
    byte_pieces = [tid for tid in range(256) if tokenizer.decode([tid]) == "\ufffd"]
    rng = random.Random(1)
    words = tokenizer.encode(" the cat sat on a mat", add_special_tokens=False)
    output = [rng.choice(byte_pieces) if rng.random() < 0.3 else rng.choice(words) for _ in range(200)]
    prompt = tokenizer.encode("Say something:", add_special_tokens=False)
    text, _, _ = vllm_output(tokenizer, prompt, output, SamplingParams(max_tokens=200))
    calls = []
    real = tokenization_base.to_py_obj
    monkeypatch.setattr(tokenization_base, "to_py_obj", lambda obj: calls.append(1) or real(obj))
    state = CompletionState(0, SamplingParams(max_tokens=200), tokenizer, prompt)
    for token in output:
        state.append(token, None)
    state.finish("length", None)
    assert "\ufffd" in tokenizer.decode(output)
    assert state.to_output().text == text
    assert len(calls) < 20, f"HF's decode ran {len(calls)} times for a 200-token output"


@pytest.mark.parametrize("style", ["byte-level", "llama2", "metaspace"])
def test_decode_stream_steps_as_the_restated_stream(style, tokenizer):
    """`_DecodeStreamText` (tokenizers' DecodeStream, one Rust call per token) gives `_TextStream`'s text after
    every token, primed or not, over random outputs of stray, lead and continuation bytes, words and specials;
    a primer whose text ends in a cut character keeps the restated stream (its start differs on purpose)."""
    from batchllm.output_processor import _DecodeStreamText, _prime, _text_stream, _TextStream
    from tests.unit.test_byte_fallback_text import INTERESTING_BYTES, WORDS, byte_fallback_tokenizer

    if style == "byte-level":
        from transformers.convert_slow_tokenizer import bytes_to_unicode
        alphabet = bytes_to_unicode()
        pieces = [alphabet[b] for b in INTERESTING_BYTES] + ["Ġok", "Ġthe", "caf", "Ã©", "<|im_end|>"]
    else:
        tokenizer = byte_fallback_tokenizer(style)
        pieces = [f"<0x{b:02X}>" for b in INTERESTING_BYTES] + WORDS + ["</s>"]
    ids = tokenizer.convert_tokens_to_ids(pieces)
    prompts = [None, tokenizer.encode("The capital is"), tokenizer.encode("é ok")]
    rng = random.Random(style)
    for case in range(300):
        output = [rng.choice(ids) for _ in range(rng.randint(1, 16))]
        prompt, skip = rng.choice(prompts), rng.random() < 0.5
        primer = _prime(prompt, tokenizer, skip)
        ours = _text_stream(tokenizer, skip, primer)
        assert isinstance(ours, _DecodeStreamText)
        restated = _TextStream(functools.partial(tokenizer.decode, skip_special_tokens=skip), primer)
        for count in range(len(output) + 1):
            assert ours.text(output, count) == restated.text(output, count), (case, output, prompt, skip, count)
    cut = tokenizer.encode("The capital is") + tokenizer.convert_tokens_to_ids(pieces[6:7])
    primer = _prime(cut, tokenizer, False)
    assert primer[1].endswith("\ufffd") and type(_text_stream(tokenizer, False, primer)) is _TextStream
