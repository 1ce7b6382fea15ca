"""An output of a byte-fallback tokenizer (SentencePiece's <0xNN> pieces: Llama 2, Mistral, Gemma) whose byte run is
not UTF-8 as a whole: HF's ByteFallback decoder makes every byte of such a run U+FFFD, so decoding the whole output
lost characters vLLM had already emitted ("é" then a stray 0x80: three U+FFFD). vLLM 0.26's detokenizer steps
tokenizers' DecodeStream, primed with the prompt, and restarts it where its prefix changes; the text, the stop
strings and the end (a held-back cut character) are checked here against that, restated, over random outputs."""

from __future__ import annotations

import random

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast

from batchllm.output_processor import CompletionState
from batchllm.sampling_params import SamplingParams

WORDS = ["▁", "▁a", "▁ok", "▁the", "▁The", "▁capital", "▁is", "▁caf", "é", "a", "b", "ok", "▁then", "▁na", "ï", "ve"]
PROMPTS = ["The capital is", "naïve café", "ok then a", "日本 is", "é"]
INTERESTING_BYTES = [0x41, 0x20, 0x80, 0x81, 0xA9, 0xBF, 0xC3, 0xC2, 0xE2, 0xE6, 0x97, 0xA5, 0xF0, 0x9F, 0x98, 0xFF]


def byte_fallback_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A Unigram vocabulary with the 256 <0xNN> pieces as ordinary pieces (not added tokens, as in Llama 2's) and
    the decoder of `style`: llama2 (Replace, ByteFallback, Fuse, Strip), gemma (no Strip, no dummy prefix) or
    metaspace (Llama 2's decoder after a Metaspace pre-tokenizer, prepend_scheme "first": Mistral v0.3's, and
    transformers' conversion of a tokenizer.model with legacy=False)."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *WORDS]
    tok = Tokenizer(models.Unigram([(p, -1.0 - i / 100) for i, p in enumerate(pieces)], unk_id=0, byte_fallback=True))
    if style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        replace = [normalizers.Replace(" ", "▁")]
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), *replace] if style == "llama2" else replace)
    strip = [] if style == "gemma" else [decoders.Strip(" ", 1, 0)]
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def vllm_output(tokenizer, prompt: list[int], output: list[int], params: SamplingParams):
    """vLLM 0.26's text for `output` (one token per step): FastIncrementalDetokenizer over DecodeStream (a new,
    unprimed stream on its "Invalid prefix" error) and check_stop_strings. Returns (text, stop string, tokens)."""
    skip, stops = params.skip_special_tokens, params.stop_strings
    stream, text = DecodeStream(ids=list(prompt), skip_special_tokens=skip), ""
    for count, token in enumerate(output, start=1):
        checked_to = len(text)
        try:
            piece = stream.step(tokenizer._tokenizer, token)
        except Exception as e:  # noqa: BLE001 - vLLM's own recovery, the error told by its message
            assert str(e).startswith("Invalid prefix encountered"), e
            stream = DecodeStream(skip_special_tokens=skip)
            piece = stream.step(tokenizer._tokenizer, token)
        text += piece or ""
        if params.min_tokens and count <= params.min_tokens:
            checked_to = len(text)
        new = len(text) - checked_to
        if not stops or count <= params.min_tokens or not new:
            continue
        for stop in stops:
            at = text.find(stop, 1 - new - len(stop))
            if at != -1:
                end = at + len(stop) if params.include_stop_str_in_output else at
                return text[:end], stop, count
    return text, None, len(output)


def batchllm_output(tokenizer, prompt: list[int], output: list[int], params: SamplingParams):
    """The same through CompletionState, as the facade drives it: (text, stop string, tokens)."""
    state = CompletionState(0, params, tokenizer, prompt)
    stop = None
    for token in output:
        stop = state.append(token, None)
        if stop is not None:
            break
    state.finish("stop" if stop is not None else "length", stop)
    return state.to_output().text, stop, len(state.token_ids)


def differs(tokenizer, prompt: list[int], output: list[int], params: SamplingParams) -> tuple | None:
    """(ours, vLLM's) where BatchLLM's (text, stop, tokens) is not vLLM's, else None."""
    ours, theirs = batchllm_output(tokenizer, prompt, output, params), vllm_output(tokenizer, prompt, output, params)
    return (ours, theirs) if ours != theirs else None


def random_output(rng: random.Random, tokenizer) -> list[int]:
    """Byte pieces (lead, continuation, stray and ASCII bytes), word pieces and now and then </s>."""
    ids = []
    for _ in range(rng.randint(1, 12)):
        roll = rng.random()
        if roll < 0.6:
            ids.append(tokenizer.convert_tokens_to_ids(f"<0x{rng.choice(INTERESTING_BYTES):02X}>"))
        elif roll < 0.95:
            ids.append(tokenizer.convert_tokens_to_ids(rng.choice(WORDS)))
        else:
            ids.append(tokenizer.eos_token_id)
    return ids


def byte_ids(tokenizer, *values: int) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"<0x{v:02X}>") for v in values]


@pytest.mark.parametrize("style", ["llama2", "gemma", "metaspace"])
def test_characters_before_a_stray_byte_stay_in_the_text(style):
    tokenizer = byte_fallback_tokenizer(style)
    prompt = tokenizer.encode("The capital is")
    ok, then = tokenizer.convert_tokens_to_ids(["▁ok", "▁then"])
    output = [ok, *byte_ids(tokenizer, 0xC3, 0xA9, 0x80), ok, then]  # "é", then 0x80 that no character takes
    assert "é" not in tokenizer.decode(output), "decoded whole, the run is U+FFFD for every byte"
    text, stop, _ = batchllm_output(tokenizer, prompt, output, SamplingParams())
    assert "é" in text and "\ufffd" not in text
    assert (text, stop) == vllm_output(tokenizer, prompt, output, SamplingParams())[:2]
    # a stop string across the kept character matches, as in vLLM's text
    stopped = SamplingParams(stop=["éok", "é ok"])
    assert batchllm_output(tokenizer, prompt, output, stopped) == vllm_output(tokenizer, prompt, output, stopped)
    assert batchllm_output(tokenizer, prompt, output, stopped)[1] is not None


@pytest.mark.parametrize("style", ["llama2", "gemma", "metaspace"])
def test_random_outputs_read_as_vllm_reads_them(style):
    """A differential test (seeded): text, matched stop and tokens kept equal vLLM's for every random output,
    with and without stop strings, min_tokens, include_stop_str_in_output and skip_special_tokens."""
    tokenizer = byte_fallback_tokenizer(style)
    rng = random.Random(f"byte-fallback-{style}")
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    choices = [dict(), dict(stop=["é", "\ufffd"]), dict(stop=["ok", " t"], include_stop_str_in_output=True),
               dict(stop=["a"], min_tokens=3), dict(skip_special_tokens=False, stop=["</s>b"])]
    mismatches = []
    for case in range(400):
        prompt, output, kwargs = rng.choice(prompts), random_output(rng, tokenizer), rng.choice(choices)
        params = SamplingParams(**kwargs)
        if pair := differs(tokenizer, prompt, output, params):
            mismatches.append((case, tokenizer.convert_ids_to_tokens(output), kwargs, *pair))
    assert not mismatches, mismatches[:5]


def test_byte_level_outputs_read_as_vllm_reads_them(default_model_dir):
    """SmolLM2's byte-level BPE (Llama 3, Qwen alike): stray and cut bytes read as vLLM's stream reads them too."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from batchllm.inputs import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    alphabet = bytes_to_unicode()
    byte_tokens = [tokenizer.convert_tokens_to_ids(alphabet[b]) for b in INTERESTING_BYTES]
    words = tokenizer.encode(" ok the café a", add_special_tokens=False)
    rng = random.Random("byte-level")
    prompt = tokenizer.encode("The capital is")
    mismatches = []
    for case in range(200):
        output = [rng.choice(byte_tokens if rng.random() < 0.7 else words) for _ in range(rng.randint(1, 12))]
        params = SamplingParams(**rng.choice([dict(), dict(stop=["é", "\ufffd"]), dict(stop=["ok"], min_tokens=2)]))
        if pair := differs(tokenizer, prompt, output, params):
            mismatches.append((case, output, params.stop_strings, *pair))
    assert not mismatches, mismatches[:5]


def test_a_prompt_ending_inside_a_character_stays_out_of_the_text():
    """Prompt ids that end inside a character (a cut prompt given as ids): the output's text starts with the
    character its first bytes complete. DecodeStream (its prefix empty while the prompt's text ends in U+FFFD)
    would emit the whole prompt's text with it, "The capital isé ok": not followed, on purpose."""
    tokenizer = byte_fallback_tokenizer("llama2")
    prompt = tokenizer.encode("The capital is") + byte_ids(tokenizer, 0xC3)
    output = [*byte_ids(tokenizer, 0xA9), tokenizer.convert_tokens_to_ids("▁ok")]
    assert vllm_output(tokenizer, prompt, output, SamplingParams())[0] == "The capital isé ok"
    assert batchllm_output(tokenizer, prompt, output, SamplingParams()) == ("é ok", None, 2)
    # the completing bytes alone are the character: it was dropped (its bytes alone are U+FFFD) until a token
    # followed, and a stop string holding it matched a token late
    assert batchllm_output(tokenizer, prompt, output[:1], SamplingParams()) == ("é", None, 1)
    assert batchllm_output(tokenizer, prompt, output, SamplingParams(stop=["é"])) == ("", "é", 1)


def test_a_byte_level_prompt_ending_inside_a_character_stays_out_of_the_text(default_model_dir):
    """The same with SmolLM2's byte-level BPE, whose token " \\xf0\\x9f" holds a space and half an emoji: the text
    was "" after the token that completes the emoji, then " 😀 world" (the prompt's space with it), and a stop
    "😀" matched one token late."""
    from batchllm.inputs import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    ids = tokenizer.encode("Hello 😀 world", add_special_tokens=False)
    assert tokenizer.decode(ids[1:2]).endswith("\ufffd"), "the prompt's last token cuts the emoji"
    prompt, output = ids[:2], ids[2:4]
    assert batchllm_output(tokenizer, prompt, output[:1], SamplingParams()) == ("😀", None, 1)
    assert batchllm_output(tokenizer, prompt, output, SamplingParams()) == ("😀 world", None, 2)
    assert batchllm_output(tokenizer, prompt, output, SamplingParams(stop=["😀"])) == ("", "😀", 1)
    stop_kept = SamplingParams(stop=["😀"], include_stop_str_in_output=True)
    assert batchllm_output(tokenizer, prompt, output, stop_kept) == ("😀", "😀", 1)


def test_a_prompt_of_stray_bytes_stays_out_of_the_text(default_model_dir):
    """A prompt whose last tokens are bytes no character takes (ids 10-139 of a byte-level vocabulary): each is
    U+FFFD in the prompt's text and stays so with the output after it, so none is the output's (the output's text
    had begun with the prompt's 24 last U+FFFD); a stray byte before a cut character stays the prompt's too."""
    from batchllm.inputs import load_tokenizer

    tokenizer = load_tokenizer(default_model_dir)
    stray = list(range(120, 140))
    assert tokenizer.decode(stray).count("\ufffd") >= len(stray) // 2, "bytes no character takes"
    words = tokenizer.encode('{"answer": 1}', add_special_tokens=False)
    assert batchllm_output(tokenizer, stray, words, SamplingParams()) == ('{"answer": 1}', None, len(words))
    emoji = tokenizer.encode("Hello 😀 world", add_special_tokens=False)  # " \xf0\x9f" cuts the emoji
    prompt = emoji[:1] + [stray[-1]] + emoji[1:2]
    assert tokenizer.decode(prompt) == "Hello\ufffd \ufffd"
    assert batchllm_output(tokenizer, prompt, emoji[2:4], SamplingParams()) == ("😀 world", None, 2)
