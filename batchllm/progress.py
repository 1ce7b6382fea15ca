"""The progress bar of a generate call, in tokens (house rule 9: tqdm only at the top).

Finished requests are a poor measure of a batch's progress: with prefix sharing and long prompts
the first request finishes late (the bar sat at 0 through the whole prefill, then raced with absurd
ETAs). The bar counts work instead: tokens done (prefill tokens computed + output tokens generated)
out of tokens planned (prefill after sharing + every request's decode budget). The caller lowers
the plan when a request stops before its budget (EOS, a stop string), so the ETA, which tqdm takes
from the token rate, stays honest; prompts done out of submitted and the input (prefill) and output
token rates are shown beside it.

Holds no state but its bar: the loop that owns it passes its counters at each update.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from tqdm.auto import tqdm


class TokenProgress:
    def __init__(self, desc: str, enabled: bool | Callable[..., Any], min_interval_s: float = 0.2) -> None:
        """enabled: vLLM's use_tqdm: a bar or none, or a callable that makes the bar (`functools.partial(tqdm,
        leave=False)`), called with the keywords vLLM calls it with (total, desc, dynamic_ncols, postfix): one
        written for vLLM takes no others."""
        self.enabled = bool(enabled)
        if callable(enabled):
            self.bar = enabled(total=0, desc=desc, dynamic_ncols=True, postfix="est. speed input: 0.00 toks/s, "
                                                                              "output: 0.00 toks/s")
        else:
            self.bar = tqdm(total=0, desc=desc, unit="tok", unit_scale=True, disable=not self.enabled,
                            dynamic_ncols=True)
        self.started = time.perf_counter()
        self.min_interval_s = min_interval_s
        self._last = float("-inf")

    def update(self, *, input_tokens: int, output_tokens: int, planned_tokens: int, requests_done: int,
               requests_total: int, force: bool = False) -> None:
        """Show the call's counters so far: tokens done = input_tokens + output_tokens, out of
        planned_tokens (raised to the tokens done when recomputation after a preemption overruns it)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        done = input_tokens + output_tokens
        self.bar.total = max(planned_tokens, done)
        self.bar.update(done - self.bar.n)
        elapsed = max(now - self.started, 1e-9)
        self.bar.set_postfix_str(f"{requests_done}/{requests_total} req, in {input_tokens / elapsed:.0f} tok/s, "
                                 f"out {output_tokens / elapsed:.0f} tok/s", refresh=True)

    def close(self) -> None:
        self.bar.close()
