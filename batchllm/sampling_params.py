"""SamplingParams: how to pick each output token, and when to stop. Validated on construction.

Mirrors vLLM's `SamplingParams` field names and defaults, so that switching is a change of import.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass, field, fields, replace

_GREEDY_EPS = 1e-5
MAX_N = 1024
"""Most completions per prompt: n is a count of requests the engine holds at once, so a typo such as
2**70 must be refused by name, not grow memory until the machine gives out."""
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
"""The seeds a torch.Generator accepts; completion k of an n > 1 request uses seed + k."""
MAX_TOP_K = 2**31 - 1
"""top_k travels to the device as an int64; anything this large already means the whole vocabulary."""

_short = reprlib.Repr()  # error messages quote values without echoing megabytes or deep nesting
_short.maxstring = _short.maxother = 80
_short.maxlong = 40


@dataclass
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
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    max_tokens: int | None = 16
    """Most tokens to generate; None: up to the model's context length."""
    min_tokens: int = 0
    """Fewest tokens to generate before EOS or stop_token_ids may end the request."""
    stop: list[str] | str | None = None
    """Strings that end generation; the output is cut before them."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (kept in token_ids)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    logprobs: int | None = None
    """Return this many top log-probabilities per generated token (plus the sampled token's)."""
    skip_special_tokens: bool = True
    """Drop special tokens from the returned text."""
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._validate()
        if isinstance(self.stop, str):
            self._stop_list = [self.stop]
        else:
            self._stop_list = list(self.stop or [])
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if self.top_k == -1:
            self.top_k = 0

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {rule}, got {short_repr(getattr(self, name))}")

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
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not -1 <= self.top_k <= MAX_TOP_K:
            raise bad("top_k", f"must be -1, 0 (disabled) or a positive integer up to {MAX_TOP_K}")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "must be an integer or None")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1):
            raise bad("seed", f"must be in [-2**63, 2**64 - n] (completion k of n uses seed + k; n = {self.n})")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "must be a positive integer or None")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if self.stop is not None and not isinstance(self.stop, str):
            if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
                raise bad("stop", "must be a string or a list of strings")
        if self.stop is not None and any(s == "" for s in ([self.stop] if isinstance(self.stop, str) else self.stop)):
            raise bad("stop", "must not contain an empty string")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids
            ):
                raise bad("stop_token_ids", "must be a list of non-negative integers")
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "must be a non-negative integer or None")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    def for_child(self, index: int) -> "SamplingParams":
        """Parameters of completion `index` of an n > 1 request: n=1, and seed + index when seeded,
        so that the completions differ but each stays reproducible."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
    """NaN and the infinities are refused (NaN compares false to every bound, so range checks let it
    through); an integer too large for a float is not finite either."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def short_repr(value: object) -> str:
    """repr() for error messages: at most ~80 characters and 6 levels, and never raises."""
    try:
        return _short.repr(value)
    except (ValueError, RecursionError):  # an int past the digit limit, nesting past the stack
        return f"<a {type(value).__name__} that cannot be shown>"
