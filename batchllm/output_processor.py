"""Detokenisation and stop strings for one completion. Writer: `LLM` (the facade) only; a completion's
`token_ids` is its engine request's output list, which the scheduler alone writes (`CompletionState`).

Stop strings are matched on the decoded text after every new token; only the tail that could hold
a new match is searched. When a stop string matches, the text is cut right before it (or after it
with include_stop_str_in_output) and the facade finishes the request in the scheduler.

Decoding the whole output after every token costs O(length) per token (a 300-token output: 17 ms
of host time per step of a 512-request batch, `benchmarks/host_overhead.py --stop`), so each token
first decodes only the last few tokens: a window whose text is longer than the search region by a
margin. Tokenizers' decoders act locally (byte-level BPE, metaspace, word-piece, space clean-up),
so the window's text ends with the same characters as the whole text, except for the first few
(a character cut by the window's start); a match in the search region is therefore in the window.
Only when a stop string appears in the window is the whole output decoded and searched exactly as
before (from the previous text's end less the longest stop and a margin): the cut is the same.

An output whose text holds U+FFFD is read as vLLM's incremental detokenizer reads it (`_TextStream`): HF's
ByteFallback decoder makes every byte of a byte-piece run that is not UTF-8 as a whole U+FFFD, where vLLM's stream
has already emitted the run's first characters. A window whose text holds U+FFFD is therefore always searched.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable

from batchllm.outputs import TokenLogprobs
from batchllm.request_output import CompletionOutput, Logprob
from batchllm.sampling_params import SamplingParams

# Decoding can rewrite a few trailing characters (a multi-byte character completed by the next
# token), so the search window reaches this far back beyond the longest stop string.
_REDECODE_MARGIN = 8
# Characters of a window's text beyond the search region: its first characters may differ from the
# whole text's (a multi-byte character cut by the window's start, a leading space dropped).
_WINDOW_SLACK = 16


def logprob_entry(token_id: int, logprobs: TokenLogprobs) -> dict[int, Logprob]:
    """vLLM's per-position dict, in vLLM's order: the chosen token first, with its own rank, then the top (or
    named) tokens ranked 1, 2, ...; the chosen one among them keeps its place at the front with the rank of its
    place in that list, as vLLM's dict overwrites it (the same rank for the top k, but for ties), so that the
    first value is the chosen token's, as code written for vLLM reads it."""
    entry = {token_id: Logprob(logprobs.sampled_logprob, logprobs.sampled_rank, None)}
    for rank, (tid, lp) in enumerate(zip(logprobs.top_token_ids, logprobs.top_logprobs)):
        entry[tid] = Logprob(lp, rank + 1, None)
    return entry


def prompt_logprobs_output(prompt_token_ids, logprobs: list[TokenLogprobs],
                           tokenizer) -> list[dict[int, Logprob] | None]:
    """`RequestOutput.prompt_logprobs`: None for the first prompt token (nothing predicts it), then
    one entry per following token (`logprobs[j - 1]` is token j's), decoded when there is a tokenizer."""
    out: list[dict[int, Logprob] | None] = [None]
    for token_id, lp in zip(prompt_token_ids[1:], logprobs):
        out.append(logprob_entry(int(token_id), lp))
    if tokenizer is not None:
        _decode_entries(out[1:], tokenizer)
    return out


def _decode_entries(entries: list[dict[int, Logprob]], tokenizer) -> None:
    """Each entry's `decoded_token` as vLLM 0.26 names it (`decoded_token_text`), the entries being consecutive
    positions (their first tokens, the sampled or prompt ones, are the context of the next), and `token_bytes`."""
    context: list[int] = []
    for entry in entries:
        for tid, lp in entry.items():
            lp.decoded_token = decoded_token_text(tokenizer, tid, context)
            lp.token_bytes = token_bytes(tokenizer, tid)
        context = [*context[-3:], next(iter(entry))]


def decoded_token_text(tokenizer, token_id: int, context: list[int]) -> str:
    """A token's text alone, as vLLM 0.26's logprobs name it: its decoded text, with the leading spaces a
    SentencePiece (Metaspace) tokenizer's decode drops put back ("▁ok" is " ok"); a byte-fallback piece of a
    multi-byte character (decoded alone as U+FFFD) is "" until the piece that completes the character, which
    gets the whole character, read with up to 4 `context` tokens (the positions before, oldest first)."""
    text = tokenizer.decode([token_id])
    marker = _leading_space_marker(tokenizer)
    if marker is not None and not text.endswith("\ufffd"):  # (a lone marker piece decodes to "": it is " ")
        piece = tokenizer.convert_ids_to_tokens(token_id)
        markers = len(piece) - len(piece.lstrip(marker)) if isinstance(piece, str) else 0
        text = " " * max(0, markers - (len(text) - len(text.lstrip(" ")))) + text
    return _completed_character(tokenizer, token_id, context) if text.endswith("\ufffd") else text


def _completed_character(tokenizer, token_id: int, context: list[int]) -> str:
    """The text a byte-fallback token completes with the tokens before it (`context`, oldest first): "" while the
    character is still incomplete with up to 4 of them; else the text past the context's last whole tokens."""
    for num in range(1, min(len(context), 4) + 1):
        before = context[-num:]
        whole = tokenizer.decode(before + [token_id])
        if whole.endswith("\ufffd"):
            continue
        clean = len(before)  # the context's trailing byte pieces are this character's: their text is this token's
        while clean > 0 and tokenizer.decode([before[clean - 1]]).endswith("\ufffd"):
            clean -= 1
        prefix = tokenizer.decode(before[:clean]) if clean else ""
        common = 0
        for a, b in zip(prefix, whole):
            if a != b:
                break
            common += 1
        return whole[common:]
    return ""


@functools.lru_cache(maxsize=8)
def _leading_space_marker(tokenizer) -> str | None:
    """The word-boundary marker of a tokenizer whose pre-tokenizer is SentencePiece's Metaspace (its decode drops a
    piece's leading marker), else None, as vLLM reads it from the tokenizer's JSON."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        pre = json.loads(backend.to_str()).get("pre_tokenizer") or {} if backend is not None else {}
    except Exception:  # noqa: BLE001 - a tokenizer whose JSON cannot be read: no marker
        return None
    for sub in [pre, *(pre.get("pretokenizers") or [] if pre.get("type") == "Sequence" else [])]:
        if sub.get("type") == "Metaspace":
            return sub.get("replacement", "\u2581")
    return None


@functools.lru_cache(maxsize=16)
def _plain_backend(tokenizer):
    """The Rust tokenizer (tokenizers' `Tokenizer`) of an HF fast tokenizer whose `decode` adds nothing to the
    backend's: no override of `decode` / `_decode`, no clean-up of tokenization spaces; else None."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        try:
            from transformers.tokenization_utils_tokenizers import TokenizersBackend as Fast
        except ImportError:  # transformers 4: the fast tokenizers' base
            from transformers import PreTrainedTokenizerFast as Fast
    except ImportError:
        return None
    plain = (isinstance(tokenizer, Fast) and type(tokenizer).decode is PreTrainedTokenizerBase.decode
             and type(tokenizer)._decode is Fast._decode and callable(getattr(backend, "decode", None))
             and not getattr(tokenizer, "clean_up_tokenization_spaces", True))
    return backend if plain else None


@functools.lru_cache(maxsize=16)
def text_decoder(tokenizer, skip_special_tokens: bool) -> Callable[[list[int]], str]:
    """`ids -> tokenizer.decode(ids, skip_special_tokens=...)`: the same text, called per token of an output
    whose text is searched for stop strings. For a plain HF fast tokenizer (`_plain_backend`) the backend's
    `decode` itself, as vLLM's detokenizer calls it: HF's wrapper (`to_py_obj` walking the list, argument
    handling) cost ~8 us a call against ~1.5 us for the decode. Invariant: the text is always
    `tokenizer.decode`'s for a list of ints; any other tokenizer (a test's stand-in, a slow or customised one)
    gets `tokenizer.decode` itself."""
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return functools.partial(backend.decode, skip_special_tokens=skip_special_tokens)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
"""A byte-fallback piece of a SentencePiece vocabulary (Llama 2, Mistral): one byte of a character."""


@functools.lru_cache(maxsize=1 << 17)
def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for: an added token's text; a piece through the byte-level BPE alphabet
    (GPT-2's, which Llama 3, Qwen and SmolLM2 use); a SentencePiece byte-fallback piece's byte, or its
    piece with the word boundary "▁" as a space (Llama 2, Mistral); else the UTF-8 of its decoded text."""
    added = _added_tokens(tokenizer).get(token_id)
    if added is not None:  # their text is not in the byte-level alphabet, whatever its characters
        return added.encode()
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        alphabet = _byte_level_alphabet(tokenizer)
        if alphabet is not None and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        if match := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        if "▁" in piece:
            return piece.replace("▁", " ").encode()
    return tokenizer.decode([token_id]).encode()


@functools.lru_cache(maxsize=8)
def _added_tokens(tokenizer) -> dict[int, str]:
    """Token id -> text of the tokens added to the vocabulary (special tokens, chat markers)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return {int(tid): str(getattr(token, "content", token)) for tid, token in added.items()}


@functools.lru_cache(maxsize=8)
def _byte_level_alphabet(tokenizer) -> dict[str, int] | None:
    """Character -> byte of the byte-level BPE alphabet where the tokenizer decodes through it, else None."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    try:  # the decoder's JSON (a Sequence of decoders lists each by its type)
        byte_level = decoder is not None and '"ByteLevel"' in str(decoder.__getstate__(), "utf-8")
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except (ImportError, TypeError, ValueError, AttributeError):  # another tokenizer library or version
        return None
    return {char: byte for byte, char in bytes_to_unicode().items()} if byte_level else None


@functools.lru_cache(maxsize=1 << 17)
def _token_text(tokenizer, token_id: int, skip_special_tokens: bool) -> str:
    """One token's text on its own (cached: its length is asked once per token of every output, `_stop_window`;
    whether it ends in U+FFFD once per prompt, `CompletionState._decode_ids`)."""
    return tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)


def _without_a_cut_character(token_ids: list[int], decode) -> str:
    """The text of `token_ids` (`decode` makes it) without its last tokens while their text ends in U+FFFD, as
    vLLM's incremental detokenizer holds back (and, once the request ends, drops) a token whose text so far ends
    in U+FFFD: one ending inside a multi-byte character (an output cut by max_tokens mid-emoji: a token " \xf0\x9f"
    shows neither its space nor the U+FFFD), a stray byte no character takes, and the tokens after such a cut that
    add no text (a skipped special token). Invariant: the text never ends in U+FFFD (the decoded text
    alone decides, as in vLLM)."""
    text = decode(token_ids)
    kept = len(token_ids)
    while text.endswith("\ufffd") and kept > 0:
        kept -= 1
        text = decode(token_ids[:kept])
    return text


_PRIME_TOKENS = (4, 24)
"""The fewest and most prompt tokens an output's text is decoded after (`_prime`, `CompletionState._decode_ids`),
as vLLM's detokenizer primes its stream with the prompt's end."""


@functools.lru_cache(maxsize=8)
def _alone_drops_a_leading_space(tokenizer) -> bool:
    """Whether a token decoded on its own loses the space that starts it (SentencePiece decoders: Llama 2's
    Strip, Mistral's Metaspace with prepend_scheme "first"), so an output's text must be decoded after the
    prompt's last tokens. Byte-level BPE (Llama 3, Qwen, SmolLM2) keeps it: its outputs decode alone."""
    ids = tokenizer.encode("a the", add_special_tokens=False)
    if len(ids) < 2:
        return False
    return tokenizer.decode(ids[1:]) != tokenizer.decode(ids)[len(tokenizer.decode(ids[:1])):]


def _prime(prompt_token_ids, tokenizer, skip_special_tokens: bool) -> tuple[list[int], str] | None:
    """The prompt's last tokens to decode an output after, and their text: the shortest suffix of
    `_PRIME_TOKENS` tokens whose text holds no U+FFFD (no character cut at its start), else the longest
    (a prompt holding U+FFFD itself); the whole prompt where it is shorter. None for an empty prompt.
    prompt_token_ids: a list or a 1-D integer array."""
    if prompt_token_ids is None or len(prompt_token_ids) == 0:
        return None
    fewest, most = _PRIME_TOKENS
    primer: tuple[list[int], str] | None = None
    for length in range(min(fewest, len(prompt_token_ids)), min(most, len(prompt_token_ids)) + 1):
        suffix = [int(t) for t in prompt_token_ids[-length:]]
        primer = suffix, tokenizer.decode(suffix, skip_special_tokens=skip_special_tokens)
        if "\ufffd" not in primer[1]:
            break
    return primer


class _TextStream:
    """vLLM 0.26's detokenizer over one output, for outputs whose text holds U+FFFD: FastIncrementalDetokenizer
    stepping tokenizers' DecodeStream (primed with the prompt), restated over `decode` (a list of ids -> text).
    Each step decodes the ids since the last emitted chunk's start (`_ids`, `_prefix` their text up to
    `_prefix_index`) with the new token; a text that is no longer (in UTF-8 bytes) than `_prefix` or ends in
    U+FFFD emits nothing (the token is held back), else the text past `_prefix` is emitted and the window moves
    on. A text that does not start with `_prefix` (a byte-fallback run that stops being UTF-8: "é" then a stray
    0x80 turns all three bytes into U+FFFD) restarts the stream at that token, as vLLM does on DecodeStream's
    "Invalid prefix" error. So characters already emitted stay in the text, where decoding the whole output
    (HF's ByteFallback: a run that is not UTF-8 as a whole is U+FFFD for every byte) would lose them.
    Invariants: the text only grows, token by token (`text(n)` is a prefix of `text(n + 1)`), and never ends
    in U+FFFD. One difference, on purpose: a primer whose text ends in a cut character starts the stream past
    its whole characters, where DecodeStream (its prefix then empty) emits the prompt's text into the output."""

    def __init__(self, decode, primer: tuple[list[int], str] | None) -> None:
        self._decode = decode
        self._ids: list[int] = list(primer[0]) if primer else []
        self._prefix = ""
        self._prefix_index = 0
        if primer:
            self._prefix = _without_a_cut_character(self._ids, decode)
            self._prefix_index = len(self._ids)
        self._text = ""
        self._lengths = [0]
        """Characters of the text after 0, 1, 2, ... tokens."""

    def text(self, token_ids: list[int], count: int) -> str:
        """The text of the first `count` of `token_ids` (the same list, only ever grown, at every call). The
        tokens not stepped yet are stepped in one loop and their pieces joined once (an output's whole
        replay, at its end, is ~1 us of Python per token around the tokenizer's step)."""
        lengths = self._lengths
        if len(lengths) <= count:
            step, pieces, total = self._step, [self._text], len(self._text)
            for token_id in token_ids[len(lengths) - 1:count]:
                piece = step(token_id)
                pieces.append(piece)
                total += len(piece)
                lengths.append(total)
            self._text = "".join(pieces)
        return self._text[:lengths[count]]

    def _step(self, token_id: int) -> str:
        """The text one more token emits (tokenizers' step_decode_stream, vLLM's restart on a changed prefix)."""
        if not self._prefix and self._ids:  # (DecodeStream's prefill, redone while its text is cut)
            prefix = self._decode(self._ids)
            if not prefix.endswith("\ufffd"):
                self._prefix, self._prefix_index = prefix, len(self._ids)
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if len(text.encode()) <= len(self._prefix.encode()) or text.endswith("\ufffd"):
            return ""
        if not text.startswith(self._prefix):
            self._ids, self._prefix, self._prefix_index = [], "", 0
            return self._step(token_id)
        new_text = text[len(self._prefix):]
        self._ids = self._ids[self._prefix_index:]
        self._prefix, self._prefix_index = self._decode(self._ids), len(self._ids)
        return new_text


class _DecodeStreamText(_TextStream):
    """`_TextStream` stepped by tokenizers' own DecodeStream (the Rust step vLLM's FastIncrementalDetokenizer calls:
    one call per token, where the restatement makes two decodes through Python). Used only where it is the same
    stream (`_text_stream`): a plain fast tokenizer and a primer whose text does not end in U+FFFD; DecodeStream
    primed with the primer's ids then takes the primer's text as its prefix at the first step (its prefill), the
    state `_TextStream` starts in, and each step is the one `_TextStream` restates, "Invalid prefix" restart
    included. Invariants: `_TextStream`'s."""

    def __init__(self, backend, skip_special_tokens: bool, primer: tuple[list[int], str] | None) -> None:
        from tokenizers.decoders import DecodeStream

        self._new_stream = functools.partial(DecodeStream, skip_special_tokens=skip_special_tokens)
        self._backend = backend
        self._rust = self._new_stream(ids=list(primer[0])) if primer else self._new_stream()
        self._text = ""
        self._lengths = [0]

    def _step(self, token_id: int) -> str:
        try:
            return self._rust.step(self._backend, token_id) or ""
        except Exception as error:  # tokenizers raises a plain Exception, told by its message
            if not str(error).startswith("Invalid prefix"):
                raise
            self._rust = self._new_stream()  # (vLLM's restart; an empty prefix cannot be invalid)
            return self._rust.step(self._backend, token_id) or ""


def _text_stream(tokenizer, skip_special_tokens: bool, primer: tuple[list[int], str] | None) -> _TextStream:
    """vLLM's incremental text of one output: through tokenizers' DecodeStream where that is the same stream
    (`_DecodeStreamText`), else the restated `_TextStream` over `tokenizer.decode`."""
    backend = _plain_backend(tokenizer)
    if backend is not None and (primer is None or not primer[1].endswith("\ufffd")):
        try:
            return _DecodeStreamText(backend, skip_special_tokens, primer)
        except (ImportError, TypeError):  # a tokenizers release without DecodeStream or its primer ids
            pass
    return _TextStream(text_decoder(tokenizer, skip_special_tokens), primer)


class CompletionState:
    def __init__(self, index: int, params: SamplingParams, tokenizer, prompt_token_ids=None,
                 token_ids: list[int] | None = None) -> None:
        """`prompt_token_ids`: where a tokenizer's pieces lose their leading space decoded alone, the output's
        text is decoded after the prompt's last tokens (vLLM's text: "The capital is" -> " Paris", not "Paris").
        `token_ids`: the engine request's output list (`Request.output_token_ids`), which the scheduler alone
        writes as each token comes back and this state reads (`append` adds nothing to it): so a completion
        that reads no token as it comes (`reads_every_token` false) costs nothing per token. None (tests):
        the state keeps its own list, which `append` grows."""
        self.index = index
        self.params = params
        self.tokenizer = tokenizer
        self._prompt_token_ids = prompt_token_ids
        self._primer: tuple[list[int], str] | None | bool = False
        """(prompt tokens, their text) to decode after; None: decode alone; False: not yet chosen."""
        self._stream: _TextStream | None = None
        """vLLM's incremental text, replayed once the output's text holds U+FFFD (`_text`)."""
        self._stream_from = 0
        """The fewest tokens whose text held U+FFFD: the stream's text is taken for as many or more."""
        self._own_tokens = token_ids is None
        self.token_ids: list[int] = [] if token_ids is None else token_ids
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.num_logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.num_logprobs is not None else None
        if not params.detokenize:  # (vLLM's detokenize=False: no text, no decoded logprob tokens)
            self.tokenizer = tokenizer = None
        self._watch_stops = bool(params.stop_strings) and tokenizer is not None
        self.reads_every_token = (self._watch_stops or self.logprobs is not None or params.grammar_key is not None
                                  or params.prompt_logprobs is not None)
        """Whether `append` must see each token as it comes (stop strings, logprobs, a grammar's check, the
        prompt logprobs that come with the first): otherwise only the end of the request matters (`finish`)."""
        self._decode_text = text_decoder(tokenizer, params.skip_special_tokens) if tokenizer is not None else None
        """`tokenizer.decode` with this output's skip_special_tokens (`text_decoder`)."""
        self._max_stop_len = max((len(s) for s in params.stop_strings), default=0)
        self.stop_text: str | None = None
        """Text cut at the matched stop string, once one matched."""
        self._min_tokens_text_len: int | None = None
        """Characters of the first min_tokens tokens (set at the first stop-string search past them)."""
        self.finish_reason: str | None = None
        self.error: str | None = None
        """Why the completion failed (finish_reason "error"), for its CompletionOutput.error."""
        self.stop_reason: int | str | None = None
        self.prompt_logprobs: list[TokenLogprobs] | None = None
        """Set once, with the first output token, when params.prompt_logprobs asked for them."""

    def append(self, token_id: int, logprobs: TokenLogprobs | None, stop_terminated: bool = False) -> str | None:
        """Add one generated token. Returns the stop string if it completed a match. As in vLLM, stop
        strings are looked for only once the output is longer than min_tokens, only where they end past
        the first min_tokens tokens' text, not in the text of an EOS or stop token that ended the output
        (`stop_terminated`; its text is left out) unless include_stop_str_in_output, and not in the text of
        tokens that end inside a multi-byte character until it is whole."""
        if self._own_tokens:
            self.token_ids.append(token_id)
        if logprobs is not None and self.logprobs is not None:
            self.logprobs.append(logprob_entry(token_id, logprobs))
            self.cumulative_logprob += logprobs.sampled_logprob
        if (not self._watch_stops or len(self.token_ids) <= self.params.min_tokens
                or (stop_terminated and not self.params.include_stop_str_in_output)
                or not self._stop_in_window()):
            return None
        # as vLLM's incremental detokenizer, text is not searched before its characters are whole: tokens that end
        # inside a multi-byte character are held back (" \xf0\x9f" of an emoji matches neither " " nor U+FFFD)
        text = self._text(len(self.token_ids))
        previous = len(self._text(len(self.token_ids) - 1))
        search_from = max(0, previous - self._max_stop_len - _REDECODE_MARGIN)
        if self.params.min_tokens:
            if self._min_tokens_text_len is None:
                self._min_tokens_text_len = len(self._text(self.params.min_tokens))  # (a cut character: not text)
        floor = self._min_tokens_text_len or 0
        for stop in self.params.stop_strings:  # the first in the list's order that the text holds, as vLLM's
            at = text.find(stop, max(search_from, floor - len(stop) + 1))
            if at != -1:
                self.stop_text = text[: at + len(stop)] if self.params.include_stop_str_in_output else text[:at]
                return stop
        return None

    def _stop_in_window(self) -> bool:
        """Whether a stop string occurs in the text of the last tokens: false only when no new
        match can be in the whole text (module docstring). The window holds the search region
        (the last token's text, the longest stop, the margin) and _WINDOW_SLACK characters more;
        it doubles while its text is shorter (tokens of a few bytes, skipped special tokens). A window text
        holding U+FFFD answers true: vLLM's stream may read those bytes otherwise (`_text`)."""
        tokens = self.token_ids
        need = (len(_token_text(self.tokenizer, tokens[-1], self.params.skip_special_tokens)) + self._max_stop_len
                + _REDECODE_MARGIN + _WINDOW_SLACK)
        window = need
        while window < len(tokens):
            text = self._decode_text(tokens[-window:])
            if len(text) >= need:
                return "\ufffd" in text or any(stop in text for stop in self.params.stop_strings)
            window *= 2
        return True  # the window is the whole output: search it exactly

    def _decode(self) -> str:
        return self._decode_ids(self.token_ids)

    def _text(self, count: int) -> str:
        """vLLM's text of the first `count` output tokens. Decoded whole (`_without_a_cut_character`) where that
        text holds no U+FFFD: the same text as vLLM's stream, at no extra cost. Text with U+FFFD (a byte-fallback
        run that is not UTF-8 as a whole) is replayed through vLLM's stream (`_TextStream`, primed with the
        prompt's last tokens), which keeps the characters it emitted before the bad byte. The stream is vLLM's
        text for any count: once it exists, it answers for the counts past the first that needed it (their text
        keeps that U+FFFD), so an output of stray bytes is not decoded whole again at every token."""
        if self._stream is not None and count >= self._stream_from:
            return self._stream.text(self.token_ids, count)
        text = _without_a_cut_character(self.token_ids[:count], self._decode_ids)
        if "\ufffd" not in text:
            return text
        if self._stream is None:
            skip = self.params.skip_special_tokens
            self._stream = _text_stream(self.tokenizer, skip, _prime(self._prompt_token_ids, self.tokenizer, skip))
            self._stream_from = count
        return self._stream.text(self.token_ids, count)

    def _decode_ids(self, token_ids: list[int]) -> str:
        """The text of output tokens `token_ids` (the output's first ones), as it reads after the prompt: decoded
        after the prompt's last tokens where alone a token would lose its leading space, or where the prompt ends
        inside a character (token ids cut mid-emoji), so that the text starts with the character its first bytes
        complete (alone, those bytes were U+FFFD: dropped, and the character appeared only with a later token)."""
        skip = self.params.skip_special_tokens
        if self._primer is False:
            prompt = self._prompt_token_ids
            wanted = prompt is not None and len(prompt) > 0 and (  # (a last token alone ending in U+FFFD may cut)
                _alone_drops_a_leading_space(self.tokenizer)
                or _token_text(self.tokenizer, int(prompt[-1]), skip).endswith("\ufffd"))
            self._primer = _prime(prompt, self.tokenizer, skip) if wanted else None
        if self._primer is None or not token_ids:
            return self._decode_text(list(token_ids))
        primer_ids, primer_text = self._primer
        text = self._decode_text(primer_ids + list(token_ids))
        head = primer_text  # the prompt's text, less the U+FFFD of a character it cuts (which the output completes)
        while not text.startswith(head) and head.endswith("\ufffd"):
            head = head[:-1]  # (one at a time: the U+FFFD of stray bytes before the cut stay the prompt's)
        if text.startswith(head):
            return text[len(head):]
        return self._decode_text(list(token_ids))  # the prompt's text changed: alone

    def leave_out_last_token(self) -> None:
        """The last token is not the completion's (its grammar refused it): from here on the state keeps its
        own list, without it (the request's list, which the scheduler wrote, keeps it)."""
        self.token_ids = self.token_ids[:-1]
        self._own_tokens = True

    def finish(self, reason: str, stop_reason: int | str | None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason

    @property
    def _ended_by_stop_token(self) -> bool:
        """Whether the last token is an EOS or stop_token_ids token that ended the output: as in vLLM,
        its text is left out of `text` (token_ids keep it) unless include_stop_str_in_output."""
        return (self.finish_reason == "stop" and not isinstance(self.stop_reason, str)
                and not self.params.include_stop_str_in_output and bool(self.token_ids))

    def to_output(self) -> CompletionOutput:
        if self.stop_text is not None:
            text = self.stop_text
        elif self.tokenizer is not None:
            text = self._text(len(self.token_ids) - 1 if self._ended_by_stop_token else len(self.token_ids))
        else:
            text = ""
        if self.logprobs is not None and self.tokenizer is not None:
            _decode_entries(self.logprobs, self.tokenizer)
        output = CompletionOutput(index=self.index, text=text, token_ids=list(self.token_ids),
                                  cumulative_logprob=self.cumulative_logprob, logprobs=self.logprobs,
                                  finish_reason=self.finish_reason, stop_reason=self.stop_reason)
        if self.error is not None:
            output.error = self.error
        return output
