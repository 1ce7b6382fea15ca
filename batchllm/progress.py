"""The progress bar of a generate call, in tokens (house rule 9: tqdm only at the top).

Finished requests are a poor measure of a batch's progress: with prefix sharing and long prompts
the first request finishes late (the bar sat at 0 through the whole prefill, then raced with absurd
ETAs). The bar counts work instead: tokens done (prefill tokens computed + output tokens generated)
out of tokens planned (prefill after sharing + every request's decode budget). The caller lowers
the plan when a request stops before its budget (EOS, a stop string), so the ETA, which tqdm takes
from the token rate, stays honest; prompts done out of submitted and the input (prefill) and output
token rates are shown beside it.

Where stderr is not a terminal (a log file, Slurm's output) a redrawn bar floods the log (tqdm writes the whole
bar again, after a \r, at every update: tens of MB over a long job), so the same counters go out instead as one
plain line every LOG_INTERVAL_S seconds and a last one at the end, as vLLM's run-batch logs its progress. A
notebook keeps tqdm's widget, and a terminal tqdm's bar.

Holds no state but its bar: the loop that owns it passes its counters at each update.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm.asyncio import tqdm as plain_tqdm
from tqdm.auto import tqdm

VLLM_DESC = "Processed prompts"
"""vLLM's label of its bar, which counts prompts: `LLM.generate`'s (and so bench's) progress_desc, which a bar maker
passed as use_tqdm gets, as vLLM gives it. This bar counts tokens: its own bar is labelled TOKENS_DESC instead."""
TOKENS_DESC = "tokens"

LOG_INTERVAL_S = 5.0
"""Seconds between two progress lines where stderr is no terminal (vLLM's run-batch logs its progress every 5 s)."""


def draws_in_place(stream: TextIO) -> bool:
    """Whether a tqdm bar on `stream` is redrawn in place: a terminal, or a notebook (tqdm.auto chose its widget,
    which writes nothing to the stream). Anything else, a file or a pipe, keeps every redraw."""
    if tqdm is not plain_tqdm:  # (tqdm.auto's notebook class)
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # (no isatty, or a closed stream)
        return False


class TokenProgress:
    def __init__(self, desc: str, enabled: bool | Callable[..., Any], min_interval_s: float = 0.2,
                 log_interval_s: float = LOG_INTERVAL_S, requests: int = 0) -> None:
        """enabled: vLLM's use_tqdm: a bar or none, or a callable that makes the bar (`functools.partial(tqdm,
        leave=False)`), called with the keywords vLLM calls it with (total: the call's `requests`, desc,
        dynamic_ncols, postfix; a factory that reads its total when called got 0): one written for vLLM takes no
        others; as vLLM's, that bar counts completions (done of submitted: n for a prompt of n > 1, as `requests`
        counts them) under vLLM's postfix of token rates. A bar of its own (enabled True) on a stderr that does
        not draw in place (`draws_in_place`) is no bar: `bar` is None and each update at least `log_interval_s`
        after the last line (the first one after the start), or forced, writes one line instead (`line`). Its own
        bar or lines are labelled `desc`, but TOKENS_DESC for vLLM's "Processed prompts" (`VLLM_DESC`): they count
        tokens."""
        self.enabled = bool(enabled)
        self.counts_completions = callable(enabled)
        self.desc = TOKENS_DESC if desc == VLLM_DESC and not self.counts_completions else desc
        self.bar = None
        self.started = time.perf_counter()
        if self.counts_completions:
            self.bar = enabled(total=requests, desc=desc, dynamic_ncols=True, postfix="est. speed input: 0.00 toks/s, "
                                                                              "output: 0.00 toks/s")
        elif self.enabled and not draws_in_place(sys.stderr):
            min_interval_s = log_interval_s
        elif self.enabled:  # (none when disabled: a disabled tqdm still makes its lock, which fixes multiprocessing's
            self.bar = tqdm(total=0, desc=self.desc, unit="tok", unit_scale=True,  # start method, and a monitor thread)
                            dynamic_ncols=True)
        self.min_interval_s = min_interval_s
        self._last = float("-inf") if self.bar is not None else self.started
        self._last_line: str | None = None

    def update(self, *, input_tokens: int, output_tokens: int, planned_tokens: int, requests_done: int,
               requests_total: int, force: bool = False) -> None:
        """Show the call's counters so far: tokens done = input_tokens + output_tokens, out of
        planned_tokens (raised to the tokens done when recomputation after a preemption overruns it); requests
        done of all: prompts, or completions for a vLLM bar (`counts_completions`)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < self.min_interval_s:
            return
        self._last = now
        done = input_tokens + output_tokens
        total = max(planned_tokens, done)
        elapsed = max(now - self.started, 1e-9)
        counts = (f"{requests_done}/{requests_total} req, in {input_tokens / elapsed:.0f} tok/s, "
                  f"out {output_tokens / elapsed:.0f} tok/s")
        if self.bar is None:
            self._write_line(line(self.desc, done, total, counts, elapsed))
            return
        if self.counts_completions:
            self.bar.total = requests_total
            self.bar.update(requests_done - self.bar.n)
            self.bar.set_postfix_str(f"est. speed input: {input_tokens / elapsed:.2f} toks/s, "
                                     f"output: {output_tokens / elapsed:.2f} toks/s", refresh=True)
            return
        self.bar.total = total
        self.bar.update(done - self.bar.n)
        self.bar.set_postfix_str(counts, refresh=True)

    def _write_line(self, text: str) -> None:
        """One progress line on stderr (as it is now: a caller may have redirected it), not the last one again
        (a forced update with nothing new)."""
        if text != self._last_line:
            self._last_line = text
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def line(desc: str, done: int, total: int, counts: str, elapsed: float) -> str:
    """A progress line with what the bar shows: `desc: 45% 1.23k/2.75k tok, 3/8 req, in 120 tok/s, out 35 tok/s
    [00:35<00:42]` (elapsed < remaining at the average rate so far; ? before any token)."""
    def fmt(n: int) -> str:
        return str(n) if n < 1000 else plain_tqdm.format_sizeof(n)

    remaining = plain_tqdm.format_interval((total - done) * elapsed / done) if done else "?"
    percent = 100 * done / total if total else 100
    return (f"{desc}: {percent:.0f}% {fmt(done)}/{fmt(total)} tok, {counts} "
            f"[{plain_tqdm.format_interval(elapsed)}<{remaining}]")


class CountLog:
    """A count as plain lines where stderr draws nothing in place (`draws_in_place`): `reading: 37988 lines [00:05,
    7597 lines/s]`, one line at least `interval_s` after the last (the first that long after the start) and, where
    any was written, one at the end. tqdm's counter there is one ever-growing line of \\r-joined redraws, and
    whatever is said next is glued onto it."""

    def __init__(self, desc: str, unit: str, interval_s: float = LOG_INTERVAL_S) -> None:
        self.desc, self.unit, self.interval_s = desc, unit, interval_s
        self.count = 0
        self.started = self._last = time.perf_counter()
        self._wrote = False

    def update(self, n: int = 1) -> None:
        self.count += n
        now = time.perf_counter()
        if now - self._last >= self.interval_s:
            self._write(now)

    def close(self) -> None:
        if self._wrote:
            self._write(time.perf_counter())

    def _write(self, now: float) -> None:
        elapsed = now - self.started
        rate = self.count / elapsed if elapsed > 0 else 0.0
        print(f"{self.desc}: {self.count}{self.unit} [{plain_tqdm.format_interval(elapsed)}, {rate:.0f}{self.unit}/s]",
              file=sys.stderr, flush=True)
        self._last, self._wrote = now, True
