"""One LLM used by ordinary programs over its life (session 55's probe): overlapping calls (another thread, a
suspended `iter_generate`), a progress bar that fails, a queue whose bar cannot be made, the step log and the
process's GC settings over many calls. Each was an internal error, a lost output or state left behind."""

from __future__ import annotations

import gc
import threading

import pytest
import tqdm

from batchllm import LLM, SamplingParams
from batchllm.llm import _quiet_gc
from batchllm.progress import TokenProgress

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [17, 18]]


@pytest.fixture(scope="module")
def llm(tiny_model_factory):
    llm = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
    yield llm
    llm.shutdown()


def texts(outputs) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in outputs]


def greedy(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def staggered(llm):
    """A suspended iter_generate whose prompts end at different steps (max_tokens 2, 4, 6, 8)."""
    return llm.iter_generate(*llm._validate(PROMPTS, [greedy(k) for k in (2, 4, 6, 8)]), use_tqdm=False)


def newcomer_refused_while_held(llm, held: threading.Event, go: threading.Event, newcomer: list) -> list:
    """Run a generate of PROMPTS in another thread until it is `held` (by the caller's patch, which waits for `go`),
    check that a generate of `newcomer` from this thread is refused meanwhile, let it go, and return its outputs."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(texts(llm.generate(PROMPTS, greedy(), use_tqdm=False))))
    thread.start()
    try:
        assert held.wait(30)
        with pytest.raises(RuntimeError, match="another generate call is running on this LLM in another thread"):
            llm.generate(newcomer, greedy(), use_tqdm=False)
    finally:
        go.set()
        thread.join()
    return results


def test_a_call_while_another_executes_is_refused(llm, monkeypatch):
    """Two threads on one LLM: each call's steps took the other's requests ("a placeholder token, but the previous
    step sampled nothing", "scheduler produced an empty step with work pending"), and both calls failed."""
    reference = texts(llm.generate(PROMPTS, greedy(), use_tqdm=False))
    in_step, go = threading.Event(), threading.Event()
    step = llm._step

    def held_step(call):  # (the first step waits: the call executes in its thread meanwhile)
        if not in_step.is_set():
            in_step.set()
            assert go.wait(30)
        return step(call)

    monkeypatch.setattr(llm, "_step", held_step)
    assert newcomer_refused_while_held(llm, in_step, go, PROMPTS) == [reference], "the executing call is untouched"
    assert texts(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == reference, "free again once it ended"


def test_a_generate_between_two_of_its_outputs_is_not_taken_for_a_suspended_call(llm, monkeypatch):
    """generate reads its outputs from iter_generate, which marked the call suspended at each of them: another
    thread's call arriving between two outputs dropped the running generate, which raised "dropped" and gave
    nothing. It stays executing there, so the newcomer is refused, as the README says."""
    reference = texts(llm.generate(PROMPTS, greedy(), use_tqdm=False))
    between, go = threading.Event(), threading.Event()
    iter_generate = llm.iter_generate

    def paused_after_the_first_output(*args, **kwargs):
        outputs = iter_generate(*args, **kwargs)
        first = next(outputs)
        between.set()
        assert go.wait(30)
        yield first
        yield from outputs

    monkeypatch.setattr(llm, "iter_generate", paused_after_the_first_output)
    assert newcomer_refused_while_held(llm, between, go, PROMPTS[:1]) == [reference], (
        "the running generate finished whole")


def test_a_call_a_finished_thread_left_suspended_does_not_block_the_llm(llm):
    """A suspended iter_generate kept by a thread that has ended must not refuse every later call: it is dropped."""
    reference = texts(llm.generate(PROMPTS, greedy(), use_tqdm=False))
    left: list = []

    def leave_one_suspended():
        left.append(staggered(llm))
        next(left[0])

    thread = threading.Thread(target=leave_one_suspended)
    thread.start()
    thread.join()
    assert texts(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == reference
    with pytest.raises(RuntimeError, match="was dropped when a later one started on this LLM"):
        list(left[0])


def test_shutdown_drops_a_suspended_call_which_says_so_when_resumed_or_closes_quietly(tiny_model_factory):
    """shutdown() under a suspended iter_generate left it running over the dropped engine: resumed, it gave an
    output and then failed with "'NoneType' object has no attribute 'core'"; closed or collected, with another
    AttributeError. It is dropped as shutdown begins."""
    for resumed in (True, False):
        own = LLM(tiny_model_factory("llama"), device="cpu", dtype="float32", max_model_len=64)
        settings = gc.get_threshold()
        suspended = staggered(own)
        assert next(suspended)[0] == 0
        own.shutdown()
        assert gc.get_threshold() == settings, "the dropped call's quiet collector ended with the shutdown"
        if resumed:
            with pytest.raises(RuntimeError, match=r"was dropped when the LLM was shut down"):
                next(suspended)
        else:
            suspended.close()  # (no AttributeError from its clean-up)
        with pytest.raises(RuntimeError, match="this LLM was shut down"):
            own.generate(PROMPTS, greedy(), use_tqdm=False)


def test_a_suspended_call_is_dropped_by_a_later_one_and_says_so_when_resumed(llm):
    """A generate while an iter_generate was suspended raised KeyError, and the resumed iterator silently skipped
    the prompt whose output the failed call had taken."""
    reference = texts(llm.generate(PROMPTS, greedy(), use_tqdm=False))
    settings = gc.get_threshold()
    suspended = staggered(llm)
    assert next(suspended)[0] == 0
    assert texts(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == reference
    assert gc.get_threshold() == settings, "the dropped call's quiet collector ended with it, not when collected"
    with pytest.raises(RuntimeError, match="was dropped when a later one started on this LLM"):
        list(suspended)
    assert llm.llm_engine.get_num_unfinished_requests() == 0
    assert texts(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == reference


def test_a_progress_bar_that_fails_leaves_the_engine_clean(llm):
    """The cleanup ran after the bar's last update: one that raised left the call's requests in the engine, and the
    next generate failed with KeyError."""
    class FailingBar(tqdm.tqdm):  # (its stream went away)
        def set_postfix_str(self, *args, **kwargs):
            raise OSError("stream closed")

    reference = texts(llm.generate(PROMPTS, greedy(), use_tqdm=False))
    with pytest.raises(OSError, match="stream closed"):
        llm.generate(PROMPTS, greedy(), use_tqdm=FailingBar)
    assert llm.llm_engine.get_num_unfinished_requests() == 0
    assert texts(llm.generate(PROMPTS, greedy(), use_tqdm=False)) == reference


def test_a_queue_whose_bar_cannot_be_made_stays_queued(llm):
    """wait_for_completion emptied the queue before the bar was made: a bar that failed lost every queued prompt
    though none had run."""
    def no_display(**kwargs):
        raise RuntimeError("no display")

    ids = llm.enqueue(PROMPTS[:2], greedy())
    with pytest.raises(RuntimeError, match="no display"):
        llm.wait_for_completion(use_tqdm=no_display)
    outputs = llm.wait_for_completion(use_tqdm=False)
    assert [o.request_id for o in outputs] == ids and texts(outputs) == texts(llm.generate(PROMPTS[:2], greedy(),
                                                                                          use_tqdm=False))


def test_the_step_log_holds_the_last_call_only(llm):
    """The engine's step log grew by every step of every call over an LLM's life (a notebook, a service)."""
    for _ in range(3):
        llm.generate(PROMPTS, greedy(), use_tqdm=False)
    assert len(llm.engine.core.step_log) == llm.last_stats["num_steps"] > 0


def test_overlapping_quiet_gcs_restore_the_process_settings_once():
    """Two LLMs' calls in two threads overlap: the second saved the first's raised threshold as the one to restore,
    which then stayed for the rest of the process; a caller's own gc.freeze() was undone."""
    original = gc.get_threshold()
    first, second = _quiet_gc(), _quiet_gc()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold()[0] >= 50_000, "still in force while the second runs"
    second.__exit__(None, None, None)
    assert gc.get_threshold() == original
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with _quiet_gc():
            pass
        assert gc.get_freeze_count() > frozen // 2 > 0, "the caller's frozen objects stay frozen (a few may be freed)"
    finally:
        gc.unfreeze()


def test_a_disabled_progress_makes_no_bar():
    """use_tqdm=False made a disabled tqdm, which creates a multiprocessing lock (fixing the start method, so a
    later set_start_method("spawn") failed) and a monitor thread."""
    assert TokenProgress("Processed prompts", False).bar is None


def test_a_call_stopped_early_aborts_its_requests_with_the_collector_quiet(llm, monkeypatch):
    """Aborting what a stopped call left (Ctrl-C on a large job: every request not yet run) allocates per request;
    with the collector back at its thresholds, each young collection walks the whole heap (2.7 s against 1.9 s to
    the interrupt message at 300k lines, docs/benchmarks.md, session 55)."""
    thresholds = []
    finish = llm.engine.core.finish_requests

    def finish_requests(*args, **kwargs):
        thresholds.append(gc.get_threshold()[0])
        return finish(*args, **kwargs)

    monkeypatch.setattr(llm.engine.core, "finish_requests", finish_requests)
    running = staggered(llm)
    next(running)
    running.close()
    assert thresholds and thresholds[0] >= 50_000
    assert llm.llm_engine.get_num_unfinished_requests() == 0
