"""SamplingParams: how to pick each output token, and when to stop. Validated on construction.

Mirrors vLLM's `SamplingParams` field names and defaults, so that switching is a change of import.
"""

from __future__ import annotations

import copy
import enum
import functools
import logging
import math
import numbers
import reprlib
from dataclasses import dataclass, field, fields, replace
from typing import Any

from batchllm.structured import GuidedDecodingParams, StructuredOutputsParams, grammar_key

__all__ = ["BeamSearchParams", "GuidedDecodingParams", "RequestOutputKind", "SamplingParams", "StructuredOutputsParams"]

_GREEDY_EPS = 1e-5
_MIN_TEMPERATURE = 1e-2
"""vLLM's floor for a temperature above 0 (smaller ones are raised to it, with a warning)."""
MAX_N = 16384
"""Most completions per prompt, vLLM 0.26's (VLLM_MAX_N_SEQUENCES' default): n is a count of requests the engine
holds at once, so a typo such as 2**70 must be refused by name, not grow memory until the machine gives out."""
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds vLLM (a torch.Generator) accepts; here one is taken modulo 2^64 (`layers/seeded_noise.py`).
Completion k of an n > 1 request uses seed + k."""
MAX_TOP_K = 2**31 - 1
"""top_k travels to the device as an int64; anything this large already means the whole vocabulary."""
MAX_LOGPROB_TOKEN_IDS = 128
"""vLLM's cap on the length of SamplingParams.logprob_token_ids."""

_short = reprlib.Repr()  # error messages quote values without echoing megabytes or deep nesting
_short.maxstring = _short.maxother = 80
_short.maxlong = 40


INTEGER_FIELDS = ("n", "top_k", "seed", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
                  "truncate_prompt_tokens")
"""The scalar SamplingParams fields that hold integers."""


TRUNCATION_SIDES = (None, "left")
"""The truncation sides taken (vLLM's `truncation_side`): a truncated prompt keeps its last tokens."""
TRUNCATION_SIDE_NOTE = "a truncated prompt keeps its last truncate_prompt_tokens tokens ('left', vLLM's side for " \
                       "generation)"
"""Why another truncation side is refused (`LLM.generate`'s tokenization_kwargs, a plain line's field)."""


INTEGER_LIST_FIELDS = ("stop_token_ids", "allowed_token_ids", "logprob_token_ids")
"""The SamplingParams fields that hold lists of integers (token ids)."""


def integers_from_json(fields: dict) -> dict:
    """`fields` with each integer-valued float in an INTEGER_FIELDS field, or in an INTEGER_LIST_FIELDS list, as an
    int (4.0 -> 4), as vLLM's server (pydantic) reads a request: JSON writers such as pandas write an integer column
    with gaps as floats. Any other value (4.5, "4", true) is left for validation to refuse by name."""
    whole = {name: int(value) for name in INTEGER_FIELDS
             if type(value := fields.get(name)) is float and value.is_integer()}
    whole.update((name, [int(t) if type(t) is float and t.is_integer() else t for t in value])
                 for name in INTEGER_LIST_FIELDS
                 if isinstance(value := fields.get(name), list) and any(type(t) is float for t in value))
    return {**fields, **whole} if whole else fields


class RequestOutputKind(enum.Enum):
    """vLLM's: what a streaming RequestOutput holds. Offline, every RequestOutput `generate` returns is the
    finished request's, whichever kind is asked for (vLLM's offline `LLM` returns only final outputs too)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


VLLM_ONLY_FIELDS: dict[str, tuple[tuple, str]] = {
    "flat_logprobs": ((False,), "logprobs are vLLM's list of dicts"),
    "skip_clone": ((False, True), "without effect here"),
    "output_text_buffer_length": ((0,), "vLLM's internal field"),
    "routed_experts_prompt_start": ((0,), "the models here have no experts"),
    "thinking_token_budget": ((None,), "no reasoning parser here: end thinking with max_tokens or a stop string"),
    "repetition_detection": ((None,), "use repetition_penalty, or a stop string"),
}
"""vLLM 0.26 SamplingParams fields with no counterpart here: (the values taken, what to do instead of another)."""


@dataclass(slots=True)  # (one per line of a seeded job: ~300 bytes with slots, 1.6 KB with a __dict__)
class SamplingParams:
    n: int = 1
    """Number of completions per prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability mass reaches top_p (0 < top_p <= 1)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch; -1 is None, as in
    vLLM (not seeded)."""
    max_tokens: int | None = 16
    """Most tokens to generate; None: up to the model's context length, or to what the engine's KV cache holds
    where that is less (`Scheduler._max_total_tokens`)."""
    min_tokens: int = 0
    """Fewest tokens to generate before EOS or stop_token_ids may end the request."""
    stop: list[str] | str | None = None
    """Strings that end generation; the output is cut before them."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (kept in token_ids). Any integers, as vLLM 0.26 takes them: an id no token
    has (negative, or outside the vocabulary) can never be sampled, so it never ends anything (nor does min_tokens
    ban it: `sampler._apply_bans`)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    logprobs: int | None = None
    """Return this many top log-probabilities per generated token (plus the sampled token's); -1: the whole
    vocabulary, as in vLLM (`check_for_model` sets the model's vocabulary size)."""
    prompt_logprobs: int | None = None
    """Return, for every prompt token after the first, its log-probability and this many top
    alternatives (`RequestOutput.prompt_logprobs`; vLLM's semantics; -1: the whole vocabulary). With n > 1
    only the first completion computes them (they are the prompt's, the same for every completion)."""
    skip_special_tokens: bool = True
    """Drop special tokens from the returned text."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (in [-2, 2])."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated (in [-2, 2])."""
    repetition_penalty: float = 1.0
    """Tokens in the prompt or the output: positive logits divided by it, negative ones multiplied (> 0)."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids (JSON keys may be the ids as strings)."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be sampled."""
    bad_words: list[str] | None = None
    """Words that must not be generated: the last token of each is banned where it would complete it."""
    structured_outputs: StructuredOutputsParams | dict | None = None
    """Keep the output to a JSON schema, any JSON object, a regex, a choice or an EBNF grammar
    (`batchllm/structured.py`; needs the `batchllm[structured]` extra)."""
    guided_decoding: StructuredOutputsParams | dict | None = None
    """vLLM 0.10's name of structured_outputs: moved there on construction (and left None)."""
    detokenize: bool = True
    """False (vLLM's): no text; `text` is "" and logprobs carry no decoded tokens (stop strings need text)."""
    spaces_between_special_tokens: bool = True
    """vLLM's: False keeps spaces from between consecutive special tokens shown in the text (skip_special_tokens
    false). The output is decoded as a whole, which puts none there, so either value gives that text."""
    extra_args: dict | None = None
    """vLLM's arbitrary extra arguments for custom sampling code; kept, and read by nothing here (nor in vLLM)."""
    truncate_prompt_tokens: int | None = None
    """Keep only the prompt's last k tokens (vLLM's left truncation; at most max_model_len); -1: the last
    max_model_len - 1, so that one token can be generated (vLLM keeps max_model_len, which leaves none); None:
    no truncation, and a prompt the context cannot hold is refused (`inputs.PromptProcessor.validate_ids`)."""
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    """vLLM's; every output here is final whatever the kind (see RequestOutputKind)."""
    logprob_token_ids: list[int] | None = None
    """vLLM's: the logprobs of exactly these tokens (at most 128) at each generated position, in place of the top
    `logprobs` (with the sampled token's, as always; logprobs, if given, must equal their number): scoring labels
    without asking for the whole vocabulary. Each listed token's `rank` is its place in the list (the sampled
    token's too, where it is listed), as in vLLM."""
    skip_reading_prefix_cache: bool | None = None
    """vLLM's: true takes none of the KV an earlier call left (the KV cache, `LLM(enable_prefix_caching=...)`); the
    prompt's shared prefixes within the call are still computed once. vLLM sets it for prompt_logprobs, whose
    requests never take kept KV here either."""
    flat_logprobs: bool = False
    skip_clone: bool = False
    output_text_buffer_length: int = 0
    routed_experts_prompt_start: int = 0
    thinking_token_budget: int | None = None
    repetition_detection: Any = None
    """vLLM 0.26's fields with no counterpart here (`VLLM_ONLY_FIELDS`): taken at the values that ask for what runs
    here anyway, refused by name otherwise."""
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    _bad_words_token_ids: list[tuple[int, ...]] | None = field(default=None, init=False, repr=False, compare=False)
    _grammar_key: tuple[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._plain_python_values()
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("SamplingParams: give structured_outputs or guided_decoding (its vLLM 0.10 name), "
                                 "not both")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if type(self.seed) is int and self.seed == -1:  # vLLM's "no seed" (its server's default, too)
            self.seed = None
        if _is_number(self.temperature) and 0 < self.temperature < _MIN_TEMPERATURE:
            _warn_low_temperature(self.temperature)
            self.temperature = _MIN_TEMPERATURE  # as vLLM: a near-zero divisor of the logits makes inf or nan
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is True:  # vLLM's: True asks for the sampled (prompt) token's logprob and 1 more
                setattr(self, name, 1)
            elif getattr(self, name) is False:  # JSON's false (a table's boolean column): none asked
                setattr(self, name, None)
        self._validate()
        if self.temperature < _GREEDY_EPS:  # greedy: as vLLM, the filters of sampling are reset (they change nothing)
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        if isinstance(self.stop, str) or self.stop is None:  # as vLLM holds it: a list (`sp.stop.append(...)`)
            self.stop = [] if self.stop is None else [self.stop]
        if self.bad_words is None:
            self.bad_words = []
        self._stop_list = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
            try:
                self._grammar_key = grammar_key(self.structured_outputs)
            except ValueError as e:  # a schema given as text that is not JSON
                raise ValueError(f"SamplingParams.structured_outputs.json is not valid JSON: {e}") from None

    def _plain_python_values(self) -> None:
        """numpy's scalars and arrays as Python's (`max_tokens=np.int64(4)` from a table's column, token ids as an
        array), as prompts take numpy ids: an integer that is not a bool is an int, another real number a float, an
        array a list, logit_bias's integer keys ints. Anything else is left for `_validate` to judge."""
        for name in _init_field_names():
            value = getattr(self, name)
            if type(value) in _PLAIN_TYPES:
                continue
            if hasattr(value, "tolist"):  # a numpy scalar or array (np.bool_ becomes bool, judged as such)
                setattr(self, name, value.tolist())
        for name in ("stop_token_ids", "allowed_token_ids", "logprob_token_ids"):
            ids = getattr(self, name)
            if isinstance(ids, (list, tuple)) and any(type(t) is not int for t in ids):
                setattr(self, name, [_plain_int(t) for t in ids])
        if isinstance(self.logit_bias, dict) and any(type(k) is not int for k in self.logit_bias):
            self.logit_bias = {_plain_int(k): v.item() if hasattr(v, "item") else v
                               for k, v in self.logit_bias.items()}

    def _bad(self, name: str, rule: str) -> ValueError:
        """The error for field `name` breaking `rule`, naming its value."""
        return ValueError(f"SamplingParams.{name} {rule}, got {short_repr(getattr(self, name))}")

    def _validate(self) -> None:
        bad = self._bad
        for name in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise bad(name, "must be an integer")
        for name in ("temperature", "top_p", "min_p"):
            if not _is_number(getattr(self, name)):
                raise bad(name, "must be a number")
            if not _is_finite(getattr(self, name)):
                raise bad(name, "must be a finite number")
        if not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be in [1, {MAX_N}]")
        if not 0 <= self.temperature <= 2:
            raise bad("temperature", "must be in [0, 2]")  # (vLLM 0.26's range, OpenAI's too)
        if self.n > 1 and self.temperature < _GREEDY_EPS:  # n equal answers; vLLM raises the same
            raise bad("n", "must be 1 when using greedy sampling (temperature 0: the completions would be equal)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not -1 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"must be -1, 0 (disabled) or a positive integer up to {MAX_TOP_K}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        self._check_seed()
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be a positive integer or None")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        self._validate_stops_and_flags(bad)
        self._validate_logprob_token_ids(bad)
        self._validate_penalties(bad)
        for name, (accepted, instead) in VLLM_ONLY_FIELDS.items():
            value = getattr(self, name)
            if not among(value, accepted):
                raise bad(name, f"is not supported ({instead}): only {' or '.join(map(repr, accepted))}")

    def _validate_stops_and_flags(self, bad) -> None:
        """stop, stop_token_ids, logprobs, prompt_logprobs, truncate_prompt_tokens, the flags, extra_args and
        output_kind: their types and ranges (`bad`: `_validate`'s error naming the field)."""
        if self.stop is not None and not isinstance(self.stop, str):
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise bad("stop", "must be a string or a list of strings")
        if self.stop is not None and any(s == "" for s in ([self.stop] if isinstance(self.stop, str) else self.stop)):
            raise bad("stop", "must not contain an empty string")
        if self.stop_token_ids is not None and not (
                isinstance(self.stop_token_ids, (list, tuple)) and all(_is_int(t) for t in self.stop_token_ids)):
            raise bad("stop_token_ids", "must be a list of integers")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < -1):
            raise bad("logprobs", "must be a non-negative integer, -1 (the whole vocabulary) or None")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs) or self.prompt_logprobs < -1):
            raise bad("prompt_logprobs", "must be a non-negative integer, -1 (the whole vocabulary) or None")
        if self.truncate_prompt_tokens is not None and (
                not _is_int(self.truncate_prompt_tokens) or self.truncate_prompt_tokens < -1
                or self.truncate_prompt_tokens == 0):
            raise bad("truncate_prompt_tokens", "must be a positive integer, -1 (what the context holds) or None")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "detokenize",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.skip_reading_prefix_cache is not None and not isinstance(self.skip_reading_prefix_cache, bool):
            raise bad("skip_reading_prefix_cache", "must be true, false or None")
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise bad("extra_args", "must be an object (a dict) or None")
        if not isinstance(self.output_kind, RequestOutputKind):
            raise bad("output_kind", "must be a RequestOutputKind")
        if not self.detokenize and self.stop:
            raise bad("detokenize", f"must be true with stop strings (they are found in the text; stop={self.stop!r})")

    def _validate_logprob_token_ids(self, bad) -> None:
        ids = self.logprob_token_ids
        if ids is None:
            return
        if not _is_id_list(ids):
            raise bad("logprob_token_ids", "must be a list of non-negative integers (token ids) or None")
        if len(ids) > MAX_LOGPROB_TOKEN_IDS:
            raise bad("logprob_token_ids", f"has {len(ids)} token ids; at most {MAX_LOGPROB_TOKEN_IDS} (vLLM's limit)")
        if ids and self.logprobs is not None and self.logprobs != len(ids):
            raise bad("logprobs", f"must equal the number of logprob_token_ids ({len(ids)}) when both are given")

    @property
    def num_logprobs(self) -> int | None:
        """How many logprobs each generated position returns besides the sampled token's (vLLM's): `logprobs`,
        else the number of `logprob_token_ids`; None: no logprobs."""
        if self.logprobs is not None:
            return self.logprobs
        return len(self.logprob_token_ids) if self.logprob_token_ids else None

    def _validate_penalties(self, bad) -> None:
        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not _is_number(getattr(self, name)) or not _is_finite(getattr(self, name)):
                raise bad(name, "must be a finite number")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or not all(
                _token_key(k) and _is_number(v) and (_is_finite(v) or v == float("-inf"))
                for k, v in self.logit_bias.items()
            ):  # (-inf bans the token, as vLLM's processor adds it; +inf and NaN would make every logit NaN)
                raise bad("logit_bias", "must map token ids (integers >= 0) to finite numbers (or -inf, a ban)")
        if self.allowed_token_ids is not None and not (self.allowed_token_ids and _is_id_list(self.allowed_token_ids)):
            raise bad("allowed_token_ids", "must be a non-empty list of non-negative integers")
        if self.bad_words is not None:
            if not isinstance(self.bad_words, (list, tuple)) or not all(
                isinstance(w, str) and w.strip() for w in self.bad_words
            ):
                raise bad("bad_words", "must be a list of non-blank strings")
        if self.structured_outputs is not None:
            try:
                StructuredOutputsParams.coerce(self.structured_outputs)
            except (TypeError, ValueError) as e:
                raise ValueError(f"SamplingParams.{e}" if str(e).startswith("structured_outputs") else
                                 f"SamplingParams.structured_outputs: {e}") from None

    @property
    def has_adjustments(self) -> bool:
        """Penalties, biases or banned words: the sampler needs the request's tokens."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias or self.allowed_token_ids or self.bad_words)

    def update_from_tokenizer(self, tokenizer) -> None:
        """Tokenize `bad_words` (as vLLM: each word alone, and after a space when that gives
        another first token and as many tokens); called once by `LLM` before the request runs."""
        if not self.bad_words or self._bad_words_token_ids is not None:
            return
        if tokenizer is None:
            raise ValueError("SamplingParams.bad_words needs a tokenizer (skip_tokenizer_init is set)")
        ids: list[tuple[int, ...]] = []
        for word in self.bad_words:
            plain = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
            spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
            ids.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                ids.append(spaced)
        self._bad_words_token_ids = [t for t in ids if t]

    def check_for_model(self, vocab_size: int, tokenizer=None, grammars=None, max_logprobs: int = -1,
                        eos_token_ids=()) -> None:
        """What needs the model: token ids inside the vocabulary (logit_bias, allowed_token_ids and
        logprob_token_ids; not stop_token_ids, which vLLM 0.26 takes whatever they are: one outside never
        stops anything), logprobs and prompt_logprobs within the engine's `max_logprobs` (-1: no
        cap; a -1 of theirs, the whole vocabulary, becomes `vocab_size` here), allowed_token_ids leaving a
        token min_tokens does not ban (`eos_token_ids`: the engine's, which it bans with stop_token_ids),
        bad_words tokenized, and the structured-output grammar compiled (`grammars`: a `GrammarBackend`).
        Raises ValueError naming the field (StructuredOutputError for a grammar that does not compile)."""
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(self, name)
            whole = asked == -1
            if whole:
                asked = vocab_size
            if max_logprobs >= 0 and asked is not None and asked > max_logprobs:
                shown = f"-1 (the whole vocabulary, {vocab_size})" if whole else asked
                raise ValueError(f"SamplingParams.{name} = {shown} is more than max_logprobs ({max_logprobs}); "
                                 "raise it with --max-logprobs / LLM(max_logprobs=...) (-1: no cap)")
            if whole:
                setattr(self, name, vocab_size)
        for name, ids in (("logit_bias", self.logit_bias or {}), ("allowed_token_ids", self.allowed_token_ids or []),
                          ("logprob_token_ids", self.logprob_token_ids or [])):
            for t in ids:
                if t >= vocab_size:
                    raise ValueError(f"SamplingParams.{name}: token id {t} is outside the vocabulary [0, {vocab_size})")
        self.update_from_tokenizer(tokenizer)
        self._check_an_allowed_token_remains(eos_token_ids)
        if self._grammar_key is not None:
            if grammars is None:
                raise ValueError("SamplingParams.structured_outputs needs a tokenizer (skip_tokenizer_init is set)")
            grammars.compile(self._grammar_key)

    def _check_an_allowed_token_remains(self, eos_token_ids) -> None:
        """allowed_token_ids must keep a token the other bans leave: a bad word of one token is banned everywhere,
        and below min_tokens the engine bans the EOS ids and stop_token_ids too (vLLM's min_tokens). With none
        left every logit is -inf, and vLLM's sampler answers token 0, which is not allowed: refused, naming the
        options that ban them (bad_words tokenized first)."""
        if not self.allowed_token_ids:
            return
        allowed = set(self.allowed_token_ids)
        banned = {ids[0] for ids in self.bad_words_token_ids if len(ids) == 1}
        banned |= {int(t) for t, v in (self.logit_bias or {}).items() if v == float("-inf")}
        shown = _short.repr(sorted(allowed))
        if allowed <= banned:
            raise ValueError(f"SamplingParams.allowed_token_ids {shown} are all banned by bad_words or a -inf "
                             "logit_bias: no allowed token could be sampled; allow another token or lift those bans")
        stops = set(eos_token_ids) | set(self.stop_token_ids or ())
        if self.min_tokens and allowed <= stops | banned:
            words = " or bad_words" if allowed & banned else ""
            raise ValueError(
                f"SamplingParams.allowed_token_ids {shown} holds only stop tokens (EOS {sorted(set(eos_token_ids))} "
                f"or stop_token_ids){words}, which min_tokens = {self.min_tokens} bans until that many tokens are out: "
                "no allowed token could be sampled; allow a token that does not stop, or set min_tokens to 0")

    @property
    def grammar_key(self) -> tuple[str, str] | None:
        """The structured-output grammar as (kind, canonical text), or None."""
        return self._grammar_key

    @property
    def bad_words_token_ids(self) -> list[tuple[int, ...]]:
        return self._bad_words_token_ids or []

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    def clone(self) -> SamplingParams:
        """A deep copy, as vLLM's `SamplingParams.clone`."""
        return copy.deepcopy(self)

    def _check_seed(self) -> None:
        if self.seed is not None and not _is_int(self.seed):
            raise self._bad("seed", "must be an integer or None")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1):
            raise self._bad("seed", f"must be in [-2**63, 2**64 - n] (completion k of n uses seed + k; n = {self.n})")

    def with_seed(self, seed: int | None) -> SamplingParams:
        """This one with another seed, checked as the constructor checks it (-1: no seed); every other field's
        value is shared, not copied or checked again (this one's are checked). Small: a batch job's lines share
        one SamplingParams per distinct setting, and a seeded job makes one of these per line."""
        seeded = copy.copy(self)
        seeded.seed = None if type(seed) is int and seed == -1 else seed
        seeded._check_seed()
        return seeded

    def as_given(self) -> SamplingParams:
        """A copy built again from the fields as they are now: a field set after construction (`sp.stop =
        ...`, as vLLM's examples do to `get_default_sampling_params()`) is checked (ValueError) and its derived
        state (stop strings, grammar, converted logit_bias) rebuilt. Shallow: lists are shared, not changed."""
        return replace(self)

    def for_child(self, index: int) -> SamplingParams:
        """Parameters of completion `index` of an n > 1 request: n=1, and seed + index when seeded,
        so that the completions differ but each stays reproducible; prompt_logprobs only for
        completion 0 (the prompt's logprobs are computed once per prompt)."""
        seed = None if self.seed is None else self.seed + index
        if seed == -1:  # (-1 is "no seed" on the way in; seeds are taken modulo 2^64, so this is the same one)
            seed = SEED_MAX
        return replace(self, n=1, seed=seed, prompt_logprobs=self.prompt_logprobs if index == 0 else None)

    @classmethod
    def field_names(cls) -> list[str]:
        """The fields a request line or a Ray row may carry: output_kind, an enum of the Python API without
        effect offline, and vLLM's fields without a counterpart here (`VLLM_ONLY_FIELDS`) are left out."""
        return [f.name for f in fields(cls) if f.init and f.name != "output_kind" and f.name not in VLLM_ONLY_FIELDS]

    @staticmethod
    def from_optional(**fields: Any) -> SamplingParams:
        """vLLM's: SamplingParams from keywords where None means the default (its server builds them so),
        for n, presence_penalty, frequency_penalty, repetition_penalty, temperature and top_p; other
        fields as SamplingParams takes them."""
        defaults = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                    "temperature": 1.0, "top_p": 1.0}
        fields = {k: defaults[k] if v is None and k in defaults else v for k, v in fields.items()}
        if isinstance(fields.get("logit_bias"), dict):  # clamped to [-100, 100], as vLLM's
            fields["logit_bias"] = {k: min(100.0, max(-100.0, v)) if _is_number(v) else v
                                    for k, v in fields["logit_bias"].items()}
        return SamplingParams(**fields)


@functools.cache
def _warn_low_temperature(temperature: float) -> None:
    logging.getLogger("batchllm").warning(
        "temperature %s is less than %s, which may cause numerical errors (nan or inf); it is raised to %s, as vLLM "
        "does", temperature, _MIN_TEMPERATURE, _MIN_TEMPERATURE)


_PLAIN_TYPES = frozenset({type(None), bool, int, float, str, list, tuple, dict})


@functools.cache
def _init_field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(SamplingParams) if f.init)


def _plain_int(value: object) -> object:
    """A numpy (or other) integer as an int; anything else as it is."""
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id_list(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(t) and t >= 0 for t in value)


def _token_key(key: object) -> bool:
    """A logit_bias key: a token id, or its decimal text (JSON object keys are strings)."""
    if isinstance(key, str):
        return key.isdigit() and len(key) < 12
    return _is_int(key) and key >= 0


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    """NaN and the infinities are refused (NaN compares false to every bound, so range checks let it
    through); an integer too large for a float is not finite either."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def among(value: Any, values: tuple) -> bool:
    """`value` equals one of `values`, type included (True is not 1, nor 0 False)."""
    return any(type(value) is type(v) and value == v for v in values)


def in_field_terms(error: BaseException | str) -> str:
    """A SamplingParams error as a line or body names its fields: "SamplingParams.temperature must be ..." is
    "temperature must be ..." (the lines that give the field know it by that name)."""
    return str(error).replace("SamplingParams.", "")


def short_repr(value: object) -> str:
    """repr() for error messages: at most ~80 characters and 6 levels, and never raises."""
    try:
        return _short.repr(value)
    except (ValueError, RecursionError):  # an int past the digit limit, nesting past the stack
        return f"<a {type(value).__name__} that cannot be shown>"


@dataclass
class BeamSearchParams:
    """vLLM's beam search parameters."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | dict | None = None
    """vLLM's: every beam kept to a grammar (`batchllm/beam_search.py`, `BeamGrammar`)."""

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens", "ignore_eos", "temperature", "length_penalty",
                     "include_stop_str_in_output"):  # numpy scalars as Python's, as SamplingParams takes them
            value = getattr(self, name)
            if type(value) not in _PLAIN_TYPES and hasattr(value, "tolist"):
                setattr(self, name, value.tolist())
        if self.structured_outputs is not None:
            self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        if not _is_int(self.beam_width) or self.beam_width < 1:
            raise ValueError(f"BeamSearchParams.beam_width must be a positive integer, got {self.beam_width!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 0:  # (0: vLLM's search of no step, the prompt back)
            raise ValueError(f"BeamSearchParams.max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not _is_finite(value):
                raise ValueError(f"BeamSearchParams.{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"BeamSearchParams.temperature must be >= 0, got {self.temperature!r}")
