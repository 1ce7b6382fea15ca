"""`held_signals.signals_held`: a tensor-parallel step on rank 0 is not interrupted between its collectives; the
signals that came during it reach their handlers once it ends (a second one at once)."""

import signal

import pytest

from batchllm.parallel.held_signals import signals_held


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """SIGINT with Python's KeyboardInterrupt handler, as an interactive Python has it: a process started with SIGINT
    ignored (a CI runner in the background, nohup) has SIG_IGN, which `signals_held` rightly leaves alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interrupt_waits_for_the_end_of_the_body():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the step")
    assert done == ["rest of the step"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_interrupt_stops_the_body_at_once():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
            done.append("rest of the step")
    assert done == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_python_handlers_get_the_held_signals_in_order_and_come_back():
    seen = []
    previous = {sig: signal.signal(sig, lambda signum, frame: seen.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        handler = signal.getsignal(signal.SIGINT)
        with signals_held():
            signal.raise_signal(signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGTERM]
        with signals_held():  # a second signal hands both over; a handler that does not raise lets the body go on
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
            assert seen == [signal.SIGTERM, signal.SIGTERM, signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def test_an_error_in_the_body_gives_the_handlers_back():
    with pytest.raises(ValueError):
        with signals_held():
            raise ValueError("step failed")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_handler_that_raises_on_the_first_signal_still_gets_the_second():
    """The CLI's handler raises `Interrupted` on a first signal and ends the process on a second: two signals held in
    one step were handed over as one (the raise ended the hand-over), so a third was needed to exit at once."""
    seen = []

    class Stop(BaseException):
        pass

    def handler(signum, frame):
        seen.append(signum)
        if len(seen) == 1:
            raise Stop

    previous = signal.signal(signal.SIGINT, handler)
    try:
        with pytest.raises(Stop):
            with signals_held():
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
        assert seen == [signal.SIGINT, signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_signal_held_in_a_step_that_then_fails_still_reaches_its_handler():
    """Slurm's scancel sends SIGTERM to every process: a follower dies at once, rank 0's collective fails, and its held
    SIGTERM was dropped with the step's error (exit 2, 'rank 1 killed', where the job should exit 143 as signalled)."""
    seen = []

    class Stop(BaseException):
        pass

    def handler(signum, frame):
        seen.append(signum)
        raise Stop

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Stop) as stopped:
            with signals_held():
                signal.raise_signal(signal.SIGTERM)
                raise RuntimeError("a follower died: the collective failed")
        assert seen == [signal.SIGTERM] and isinstance(stopped.value.__context__, RuntimeError)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_data_parallel_message_is_sent_and_read_whole_through_an_interrupt(monkeypatch):
    """The data-parallel parent's pipe messages: Ctrl-C inside a large job's write left a part of it in the pipe, which
    the worker then read on with the next call's messages (the next call hung for ever, or the worker died). The
    interrupt now comes after the message, sent or read whole."""
    from batchllm.parallel.data_parallel import DataParallelEngine

    done = []

    class Pipe:  # (a worker's end: the write, or the read, is interrupted part-way)
        def send(self, message):
            signal.raise_signal(signal.SIGINT)
            done.append(("sent", message))

        def recv(self):
            signal.raise_signal(signal.SIGINT)
            done.append("read")
            return ("done", 1, {})

    parent = object.__new__(DataParallelEngine)  # (no workers: the pipe alone)
    parent.conns = [Pipe()]
    with pytest.raises(KeyboardInterrupt):
        parent._sent(0, ("job", 1, "items"))
    assert done == [("sent", ("job", 1, "items"))]
    monkeypatch.setattr("multiprocessing.connection.wait", lambda conns, timeout: conns)  # (the pipe is ready)
    with pytest.raises(KeyboardInterrupt):
        parent._messages({0}, 1.0)
    assert done[-1] == "read"
