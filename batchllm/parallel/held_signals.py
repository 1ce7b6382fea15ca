"""Signals held off a stretch of work that must not stop part-way: rank 0's tensor-parallel step (its collectives),
one message on a data-parallel worker's pipe (its framing). Torch-free: the data-parallel parent imports it."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals `signals_held` keeps out of its body."""


@contextlib.contextmanager
def signals_held():
    """Run the body (rank 0's whole step: its message and every collective it issues) with SIGINT and SIGTERM held
    where their handler is a Python one (KeyboardInterrupt: Ctrl-C, Jupyter's "interrupt kernel"; the CLI's
    `Interrupted`), then hand each held signal to that handler in the order they came: an interrupt then raises
    after the step, never between its collectives, where the followers would wait for ever for the rest of it.
    A second signal during the body hands them over at once (a step that hangs can still be interrupted; the
    followers are then out of step: `ModelRunner.step_cut_short`). Outside the main thread (handlers cannot be
    set there) and for signals handled by the OS (SIG_DFL, SIG_IGN) the body runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {sig: signal.getsignal(sig) for sig in HELD_SIGNALS}
    handlers = {sig: handler for sig, handler in handlers.items() if callable(handler)}
    held: list[int] = []

    def hand_over() -> None:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        pending = held[:]
        held.clear()
        for i, sig in enumerate(pending):
            try:
                handlers[sig](sig, sys._getframe(1))
            except BaseException:  # (the CLI's first signal raises `Interrupted`: the later ones must still count,
                for later in pending[i + 1:]:  # or a second Ctrl-C in one step would not end the process)
                    signal.raise_signal(later)
                raise

    def hold(signum, frame) -> None:
        held.append(signum)
        if len(held) > 1:
            hand_over()

    for sig in handlers:
        signal.signal(sig, hold)
    try:
        yield
    except BaseException:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for sig in held:  # (a step that failed because of the signal, e.g. a follower Slurm's SIGTERM killed too:
            signal.raise_signal(sig)  # the signal's own handler still runs, so the job exits as that signal says)
        raise
    hand_over()
